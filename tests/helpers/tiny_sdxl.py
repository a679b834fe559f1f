"""Test helper: a tiny SDXL-shaped model (two text encoders, text_time UNet) from the shipped tiny_sdxl configs,
written as a diffusers folder or as a single file in Stability's sgm key layout. Random weights, no download."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from hyperlit.models.family import FAMILIES
from hyperlit.models.single_file import FrozenParts

SDXL_FAMILY = FAMILIES["sdxl"]
TINY_SDXL = FAMILIES["tiny_sdxl"].config_dir
TOKENIZER = FAMILIES["tiny"].config_dir / "tokenizer"
SCHEDULER = TINY_SDXL / "scheduler" / "scheduler_config.json"


def build_parts(config_dir: Path = TINY_SDXL, seed: int = 0, meta: bool = False) -> FrozenParts:
    """Networks built from a diffusers-layout config folder; on the meta device (no memory) if `meta`."""
    with torch.random.fork_rng(devices=[]), torch.device("meta" if meta else "cpu"):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2"))
    return FrozenParts(unet.eval(), vae.eval(), te1.eval(), te2.eval())


def write_tokenizers(root: Path) -> Path:
    """tokenizer/ and tokenizer_2/ (the second pads with '!', id 0, as Stability's release does)."""
    shutil.copytree(TOKENIZER, root / "tokenizer", dirs_exist_ok=True)
    shutil.copytree(TOKENIZER, root / "tokenizer_2", dirs_exist_ok=True)
    cfg_path = root / "tokenizer_2" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["pad_token"] = "!"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return root


def write_folder(root: Path, seed: int = 0) -> Path:
    """A diffusers SDXL-layout folder of the tiny model at `root`."""
    parts = build_parts(seed=seed)
    parts.unet.save_pretrained(root / "unet")
    parts.vae.save_pretrained(root / "vae")
    parts.text_encoder.save_pretrained(root / "text_encoder")
    parts.text_encoder_2.save_pretrained(root / "text_encoder_2")
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    shutil.copy(SCHEDULER, root / "scheduler" / "scheduler_config.json")
    write_tokenizers(root)
    return root
