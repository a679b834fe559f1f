"""Independent oracles for the audit tests (issue 14): written from the spec, not by calling the code under test."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import torch

from hyperlit.data.paths import repo_root


def expected_fixed_prompts(folder: Path, name: str, template: str = "style_filewords") -> list[str]:
    """Spec §4.4: the template line is drawn once per image by ``random.Random("prompt:<sha256 of the file
    bytes>")``, then [filewords] <- the caption file, [name] <- the network name; in file-name order."""
    lines = [ln.strip() for ln in (repo_root() / "conf" / "templates" / f"{template}.txt").read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    prompts = []
    for img in sorted(Path(folder).glob("*.png")):
        line = random.Random(f"prompt:{hashlib.sha256(img.read_bytes()).hexdigest()}").choice(lines)
        prompts.append(line.replace("[filewords]", img.with_suffix(".txt").read_text()).replace("[name]", name))
    return prompts


@torch.no_grad()
def sd1_context(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """SD 1.x conditioning straight from transformers: pad/truncate to 77 tokens, the last layer's output (with
    the final layer norm, as CLIPTextModel returns it)."""
    ids = tokenizer(list(captions), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return text_encoder(ids.input_ids).last_hidden_state.float()
