"""Which checkpoint a run resumes from, and the refusal of one that was trained with another config.

``ckpt_path`` is a file, ``last`` (the run dir's newest readable checkpoint: what a resubmitted job or a torchrun
restart needs) or null (a fresh run; under SLURM, like ``last``, so a requeued job continues by itself). Every
checkpoint hyperlit writes carries the run's resolved config (:class:`ConfigInCheckpoint`); a resume whose config
differs in a key that changes the result is refused before any weights load, naming the keys.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from hyperlit.distributed import launcher

log = logging.getLogger(__name__)

CONFIG_KEY = "hyperlit_config"  # where the run's resolved config lives in a Lightning checkpoint

# Keys that never change the trained weights: where files go, what is logged and how often files are written.
# `train.max_steps` may grow on resume (training longer is what a resume is often for). Every other key must match.
RESULT_NEUTRAL = (
    "ckpt_path",
    "paths",
    "hydra",
    "logger",
    "tags",
    "group",
    "optimized_metric",
    "hparams_search",
    "train.max_steps",
    "trainer.max_steps",
    "trainer.default_root_dir",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "callbacks.progress",
    "callbacks.checkpoint",
    "callbacks.export",
    "callbacks.preview",
    "callbacks.validation",
    "callbacks.vae_check",  # reads the data and writes a panel before step 1: the weights never see it
    "data.cache_dir",
    # the range test of train.learning_rate=auto runs only when a run starts: a resumed run reuses the rate stored
    # in the checkpoint, so its sweep settings cannot change what the resume computes
    "train.lr_auto",
)


@dataclass
class SavedCheckpoint:
    """A readable Lightning checkpoint: where it is, the optimizer step it holds, the config it was trained with."""

    path: Path
    global_step: int
    config: dict | None  # None: written before hyperlit stored configs


def read_checkpoint(path: Path) -> SavedCheckpoint | None:
    """The checkpoint at ``path``, or None when it is not a complete Lightning checkpoint (cut off, foreign)."""
    try:
        # mmap: only the small entries are read, never the tensors (VAE checkpoints are large)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any unreadable file is "not a checkpoint"; the caller says so
        return None
    if not isinstance(state, Mapping) or not {"global_step", "state_dict", "loops"} <= set(state):
        return None
    config = state.get(CONFIG_KEY)
    return SavedCheckpoint(Path(path), int(state["global_step"]), config if isinstance(config, dict) else None)


def checkpoint_files(output_dir: Path, checkpoint_dir: Path) -> list[Path]:
    """Lightning's checkpoints of a run: ModelCheckpoint's folder and the SLURM ``hpc_ckpt_N.ckpt`` files."""
    found = [*checkpoint_dir.glob("*.ckpt"), *output_dir.glob("hpc_ckpt_*.ckpt")]
    return sorted({p for p in found if p.is_file()})


def newest_checkpoint(output_dir: Path, checkpoint_dir: Path) -> SavedCheckpoint | None:
    """The readable checkpoint with the most optimizer steps (the newer file on a tie); None when there is none."""
    readable = []
    for path in checkpoint_files(output_dir, checkpoint_dir):
        saved = read_checkpoint(path)
        if saved is None:
            log.warning("ckpt_path=last: %s is not a complete checkpoint; skipped", path)
        else:
            readable.append((saved.global_step, path.stat().st_mtime, saved))
    return max(readable, key=lambda item: item[:2])[2] if readable else None


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay whole values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _neutral(key: str) -> bool:
    return any(key == n or key.startswith(f"{n}.") for n in RESULT_NEUTRAL)


def differing_keys(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys that change the result and differ: key -> (checkpoint's value, this run's value); absent is '<unset>'."""
    old, new = flatten(saved), flatten(current)
    missing = "<unset>"
    return {
        key: (old.get(key, missing), new.get(key, missing))
        for key in sorted(set(old) | set(new))
        if not _neutral(key) and old.get(key, missing) != new.get(key, missing)
    }


def check_same_config(saved: SavedCheckpoint, current: Mapping[str, Any], asked: str) -> None:
    if saved.config is None:
        log.info("ckpt_path: %s holds no config (an older checkpoint); its settings are not checked", saved.path)
        return
    differ = differing_keys(saved.config, current)
    if differ:
        listed = ", ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in differ.items())
        raise ValueError(
            f"ckpt_path={asked}: {saved.path} was trained with another config; these keys change the result and "
            f"differ (checkpoint -> now): {listed}; resume with the checkpoint's values, or train into a new run "
            "dir (hydra.run.dir)"
        )


def resolved_config(cfg: DictConfig) -> dict:
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    return config


def resume_path(cfg: DictConfig) -> str | None:
    """The checkpoint file this run resumes from (None: a fresh run), checked against the config; reads no weights."""
    asked = cfg.get("ckpt_path")
    output_dir = Path(str(cfg.paths.output_dir))
    checkpoint_dir = Path(str(OmegaConf.select(cfg, "callbacks.checkpoint.dirpath", default=None) or ""))
    if not str(checkpoint_dir) or str(checkpoint_dir) == ".":
        checkpoint_dir = output_dir / "checkpoints"
    if asked is None and launcher() != "slurm":
        return None
    if asked is None or str(asked) == "last":
        saved = newest_checkpoint(output_dir, checkpoint_dir)
        name = "last" if asked is not None else "null (SLURM: the job's newest checkpoint)"
        if saved is None:
            if asked is not None:
                log.info("ckpt_path=last: no checkpoint in %s yet; starting fresh", output_dir)
            return None
        log.info("ckpt_path=%s: resuming from %s (step %d)", name, saved.path, saved.global_step)
    else:
        path = Path(str(asked))
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={asked}: no such checkpoint file")
        saved = read_checkpoint(path)
        if saved is None:
            raise ValueError(
                f"ckpt_path={asked}: not a complete Lightning checkpoint (cut off, or another kind of file)"
            )
    check_same_config(saved, resolved_config(cfg), str(asked if asked is not None else "null"))
    return str(saved.path)


class ConfigInCheckpoint(pl.Callback):
    """Stores the run's resolved config in every checkpoint, so a resume can be checked against it."""

    def __init__(self, config: dict) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config
