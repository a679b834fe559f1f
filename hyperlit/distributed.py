"""Multi-process runs: which launcher started us, config checks before the model loads, rank helpers.

Lightning does the distributed work (DDP, cluster detection, process groups). What this module adds is the
"errors at the door" part: a launch that cannot work (a multirun with the re-launching ``ddp`` strategy,
``num_nodes``/``devices`` that disagree with torchrun or SLURM) fails with a message saying what to change,
before any weights load, instead of hanging at "Initializing distributed".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

log = logging.getLogger(__name__)

# Strategies whose launcher re-executes ``sys.argv`` for local ranks >= 1 (Lightning's _SubprocessScriptLauncher).
RELAUNCHING_STRATEGIES = ("ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")


def launcher() -> str | None:
    """Who created this process: ``torchrun``, ``slurm`` (srun), ``lightning`` (a child of Lightning's
    ``ddp`` launcher) or None (started by hand; Lightning may still re-launch it)."""
    if TorchElasticEnvironment.detect():  # Lightning's own detection order: torchelastic before SLURM
        return "torchrun"
    if SLURMEnvironment.detect():
        return "slurm"
    if "LOCAL_RANK" in os.environ:
        return "lightning"
    return None


def env_rank() -> int:
    """Global rank before the Trainer exists, read in the order Lightning's ``rank_zero_only`` uses (0 if unset).

    Under torchrun and srun this is already the global rank; children of Lightning's own launcher only know
    their LOCAL_RANK, which equals the global rank on one node.
    """
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def is_global_zero() -> bool:
    return env_rank() == 0


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    digits = value.split("(")[0].split(",")[0]  # SLURM writes e.g. "2(x3)" for uneven allocations
    return int(digits) if digits.isdigit() else None


def processes_per_node(devices: Any, accelerator: Any = "auto") -> int | None:
    """How many processes ``trainer.devices`` asks for on each node; None when only the hardware can tell."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        if devices > 0:
            return devices
        if devices == -1 and str(accelerator) != "cpu":
            import torch

            return torch.cuda.device_count() or None
        return None
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    if text.lstrip("-").isdigit():
        return processes_per_node(int(text), accelerator)
    return None


def strategy_name(strategy: Any) -> str:
    """``trainer.strategy`` as a name: the string, or the class name of a ``_target_`` mapping."""
    if isinstance(strategy, Mapping):
        target = str(strategy.get("_target_", ""))
        name = target.rsplit(".", 1)[-1]
        if name == "DDPStrategy" and strategy.get("start_method", "popen") == "popen":
            return "ddp"
        return name or "custom"
    return str(strategy if strategy is not None else "auto")


def relaunches(strategy: Any, devices: Any, num_nodes: int, accelerator: Any = "auto") -> bool:
    """True when Lightning would re-execute the command line to start this node's other processes."""
    name = strategy_name(strategy)
    per_node = processes_per_node(devices, accelerator)
    several = per_node is None or per_node > 1
    if name in RELAUNCHING_STRATEGIES:
        return several or num_nodes > 1
    # "auto" picks "ddp" (the re-launching one) for several devices outside notebooks.
    return name == "auto" and per_node is not None and per_node > 1


def check_launch(trainer_cfg: Mapping[str, Any], multirun: bool | None = None) -> None:
    """Errors at the door for multi-process launches; ``trainer_cfg`` is ``cfg.trainer``.

    ``multirun`` defaults to Hydra's mode when a Hydra app is running.
    """
    strategy = trainer_cfg.get("strategy", "auto")
    devices = trainer_cfg.get("devices", "auto")
    accelerator = trainer_cfg.get("accelerator", "auto")
    num_nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    if num_nodes < 1:
        raise ValueError(f"trainer.num_nodes: {num_nodes} is not allowed; use 1 or more")
    per_node = processes_per_node(devices, accelerator)
    if per_node is not None and per_node < 1:
        raise ValueError(f"trainer.devices: {devices!r} is not allowed; use a positive number, a list or 'auto'")
    started_by = launcher()
    if multirun is None:
        multirun = _hydra_multirun()
    if multirun and started_by is None and relaunches(strategy, devices, num_nodes, accelerator):
        raise ValueError(
            f"trainer.strategy={strategy_name(strategy)} with trainer.devices={devices} cannot run inside a Hydra "
            "multirun (-m / hparams_search): Lightning's ddp launcher re-executes the command line, so every "
            "child would start the whole sweep again. Use trainer.strategy=ddp_spawn for a local multirun, or "
            "run one job per process group: hydra/launcher=slurm (tasks_per_node = trainer.devices), torchrun, "
            "or a wandb agent per job (see docs/scaling.md)"
        )
    if started_by == "torchrun":
        _check_torchrun(devices, per_node, num_nodes)
    elif started_by == "slurm":
        _check_slurm(devices, per_node, num_nodes)


def _check_torchrun(devices: Any, per_node: int | None, num_nodes: int) -> None:
    world = _int_env("WORLD_SIZE")
    local_world = _int_env("LOCAL_WORLD_SIZE")
    if per_node is not None and local_world is not None and per_node != local_world:
        raise ValueError(
            f"trainer.devices={devices}: torchrun started {local_world} process(es) per node "
            f"(--nproc_per_node={local_world}); set trainer.devices={local_world} or --nproc_per_node={per_node}"
        )
    if world is not None and local_world and world // local_world != num_nodes:
        raise ValueError(
            f"trainer.num_nodes={num_nodes}: torchrun started {world} process(es), {local_world} per node, i.e. "
            f"{world // local_world} node(s); set trainer.num_nodes={world // local_world} or "
            f"--nnodes={num_nodes}"
        )


def _check_slurm(devices: Any, per_node: int | None, num_nodes: int) -> None:
    nodes = _int_env("SLURM_NNODES") or _int_env("SLURM_JOB_NUM_NODES")
    tasks = _int_env("SLURM_NTASKS_PER_NODE")
    if tasks is None and _int_env("SLURM_NTASKS") and nodes:
        tasks = _int_env("SLURM_NTASKS") // nodes  # type: ignore[operator]
    if nodes is not None and nodes != num_nodes:
        raise ValueError(
            f"trainer.num_nodes={num_nodes}: the SLURM job has {nodes} node(s) (#SBATCH --nodes={nodes}); set "
            f"trainer.num_nodes={nodes} or --nodes={num_nodes}"
        )
    if per_node is not None and tasks is not None and per_node != tasks:
        raise ValueError(
            f"trainer.devices={devices}: the SLURM job runs {tasks} task(s) per node "
            f"(#SBATCH --ntasks-per-node={tasks}); set trainer.devices={tasks} or --ntasks-per-node={per_node}"
        )


def _hydra_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return False
    if not HydraConfig.initialized():
        return False
    return HydraConfig.get().mode == RunMode.MULTIRUN


def config_digest(config: Mapping[str, Any]) -> str:
    """A stable hash of a resolved config (plain containers), to compare what every rank runs."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RankAgreement(L.Callback):
    """Fails every rank together when the ranks do not run the same config into the same output folder.

    Processes started by torchrun or srun each compose their own config: a ``${now:...}`` run dir that ticked
    over between them, or a sweep value that reached only some ranks, would otherwise give several output
    folders or silently different training. Lightning's own launcher forwards the parent's run dir.
    """

    def __init__(self, config: Mapping[str, Any], output_dir: str | None) -> None:
        self.digest = config_digest(config)
        self.output_dir = output_dir

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size == 1:
            return
        mine = (self.output_dir, self.digest)
        reference = trainer.strategy.broadcast(mine, src=0)
        agree = trainer.strategy.reduce_boolean_decision(mine == reference, all=True)
        if agree:
            return
        if mine[0] != reference[0]:
            detail = (
                f"rank {trainer.global_rank} writes to {mine[0]}, rank 0 to {reference[0]}. Give every process the "
                "same run dir, e.g. hydra.run.dir=outputs/$SLURM_JOB_ID (or any fixed path) on the command line"
            )
        elif mine != reference:
            detail = (
                f"rank {trainer.global_rank} composed a different config than rank 0 (digest {mine[1]} vs "
                f"{reference[1]}); pass the same overrides to every process"
            )
        else:
            detail = "another rank's run dir or config differs from rank 0 (see that rank's error)"
        raise RuntimeError(f"the {trainer.world_size} processes of this run disagree: {detail}")


def slurm_environment() -> SLURMEnvironment | None:
    """Lightning's SLURM environment with auto-requeue on SIGUSR1 (``#SBATCH --signal=SIGUSR1@90``) when srun
    started this process, else None (torchrun inside SLURM stays torchrun, as Lightning decides)."""
    if launcher() != "slurm":
        return None
    return SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1)


def init_elastic_process_group(strategy: Any) -> bool:
    """Under torchrun, start the process group on a store namespace of this attempt; True if it did.

    Every attempt of a torchrun job (``--max-restarts``) reaches the same agent store, and torch leaves the previous
    attempt's gloo addresses in it: a restarted rank can read a dead peer's address and fail with "connectFullMesh
    failed ... Connection refused" (seen with torch 2.13, gloo). A prefix per attempt keeps them apart; Lightning
    then finds the group initialised and uses it.
    """
    import torch.distributed as dist

    if launcher() != "torchrun" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return False
    world = _int_env("WORLD_SIZE") or 1
    if world < 2:
        return False
    backend = getattr(strategy, "process_group_backend", None)
    backend = backend or ("nccl" if strategy.root_device.type == "cuda" else "gloo")
    server = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"hyperlit/attempt_{attempt}", server)
    dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world)
    return True


def run_name() -> str:
    """The run dir's name below ``paths.log_dir``: the same for every process of a job and every attempt of it.

    ``slurm-<job id>`` under srun (a requeued job keeps its id, so it finds its checkpoints), ``torchrun-<run id>``
    under torchrun (restarts keep the rendezvous id), otherwise ``<date>/<time>``.
    """
    started_by = launcher()
    if started_by == "slurm":
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID", "job")
        return f"slurm-{job}"
    if started_by == "torchrun" and os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    return datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


def register_resolvers() -> None:
    """``${hyperlit.rank_zero:VALUE}`` is VALUE on global rank 0 and null elsewhere (read from the launcher's env);
    ``${hyperlit.run_name:}`` is :func:`run_name`, computed once per process like Hydra's ``${now:}``.

    conf/train.yaml uses the first for ``hydra.output_subdir``: under torchrun or srun every rank is a full Hydra
    app, and only rank 0 should write ``.hydra/`` into the shared run dir. conf/hydra/default.yaml uses the second.
    """
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("hyperlit.rank_zero"):
        OmegaConf.register_new_resolver("hyperlit.rank_zero", lambda value=None: value if is_global_zero() else None)
    if not OmegaConf.has_resolver("hyperlit.run_name"):
        OmegaConf.register_new_resolver("hyperlit.run_name", run_name, use_cache=True)


register_resolvers()  # at import: train.py imports hyperlit.runner (and so this) before Hydra composes
