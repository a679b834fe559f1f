"""SDXL hypernetworks end to end: a tiny SDXL-shaped model trained through train.py with aspect buckets, the UNet
fed the time_ids of the crops actually made, and files A1111's reference loader reads at SDXL's widths."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from helpers.a1111_reference import a1111_load, a1111_safe_check, apply_pairs
from helpers.tiny_sdxl import SDXL_FAMILY, build_parts, write_folder
from PIL import Image

from hyperlit import files
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
from hyperlit.models import load_components
from hyperlit.runner import build_run, fit
from hyperlit.tasks.hypernetwork.build import resolve_sizes

pytestmark = pytest.mark.slow


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_sdxl_widths_file_is_read_by_the_a1111_reference_loader(tmp_path):
    """auto sizes on the full-size SDXL UNet (meta device) are 2048/640/1280; the file A1111 reads computes ours."""
    sizes = resolve_sizes(HypernetworkConfig(), build_parts(SDXL_FAMILY.config_dir, meta=True).unet)
    assert sizes == [2048, 640, 1280]
    config = HypernetworkConfig(activation="swish", layer_structure=[1, 2, 1])
    hn = Hypernetwork(config, sizes=sizes, name="xl_style")
    with torch.no_grad():  # A1111 initialises the last layer near zero; move it so the test sees the weights
        for p in hn.parameters():
            p.normal_(0, 0.02)
    hn.sd_checkpoint, hn.sd_checkpoint_name = "0123456789", "sd_xl_base_1.0"
    path = files.save_hypernetwork(hn, tmp_path / "xl_style.pt")
    a1111_safe_check(path)
    pairs = a1111_load(path)
    assert sorted(pairs) == [640, 1280, 2048]
    hn.eval()
    for width in sizes:
        context = torch.randn(1, 77 if width == 2048 else 16, width)
        want_k, want_v = apply_pairs(pairs, context)
        k, v = hn.forward_kv(context)
        torch.testing.assert_close(k, want_k, atol=1e-6, rtol=0)
        torch.testing.assert_close(v, want_v, atol=1e-6, rtol=0)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["sd_checkpoint"] == "0123456789" and raw["sd_checkpoint_name"] == "sd_xl_base_1.0"


def _images(folder, sizes):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a shape number {i}")
    return folder


def test_train_tiny_sdxl_end_to_end_with_buckets(train_cfg, tmp_path):
    model = write_folder(tmp_path / "tiny_sdxl")
    data = _images(tmp_path / "data", [(64, 64), (80, 64), (128, 40), (40, 128), (96, 72), (64, 64)])
    cfg = train_cfg(
        "model=sdxl", "model.family=tiny_sdxl", f"model.path={model}", "model.dtype=float32",
        "data=folder_sdxl", f"data.path={data}", "data.resolution=64", "data.bucket_step=32", "data.batch_size=2",
        "hypernet.name=xl", "callbacks.export.save_every=2", "callbacks.preview.every=2",
        steps=4,
    )  # fmt: skip
    fresh = load_components(family="tiny_sdxl", path=str(model))
    before = [_digest(m) for m in fresh.modules()]
    built = build_run(cfg)
    assert built.module.hypernetwork.sizes == [80, 64, 96]  # cross, then self widths (as 2048, 640, 1280)

    seen: list[torch.Tensor] = []

    def spy(_module, _args, kwargs):
        if torch.is_grad_enabled():  # training steps only (previews sample under no_grad with their own sizes)
            seen.append(kwargs["added_cond_kwargs"]["time_ids"].detach().clone())

    handle = built.module.components.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        loss = fit(built, cfg)
    finally:
        handle.remove()
    assert loss is not None and np.isfinite(loss)

    # time_ids fed to the UNet are the (original, crop, bucket) of the placements the data pipeline made
    expected = {r.placement.sizes() for r in built.datamodule.last_encoded.records}
    assert len({s[4:] for s in expected}) > 1  # several buckets were used
    trained_rows = {tuple(int(x) for x in row) for batch in seen for row in batch}
    assert len(seen) == 4 and trained_rows <= expected and len(trained_rows) > 1

    out = tmp_path / "run"
    for name in ("xl-2.pt", "xl-4.pt", "xl.pt"):
        assert (out / "hypernetworks" / name).is_file(), name
    assert sorted(p.name for p in (out / "images").glob("*.png")) == ["xl-0.png", "xl-2.png", "xl-4.png"]
    comps = built.module.components
    assert [_digest(m) for m in comps.modules()] == before  # frozen means frozen, both text encoders included

    final = out / "hypernetworks" / "xl.pt"
    a1111_safe_check(final)
    pairs = a1111_load(final)
    trained = built.module.hypernetwork.eval()
    assert sorted(pairs) == [64, 80, 96]
    for width in trained.sizes:
        context = torch.randn(2, 5, width)
        want_k, want_v = apply_pairs(pairs, context)
        k, v = trained.forward_kv(context)
        torch.testing.assert_close(k, want_k, atol=1e-6, rtol=0)
        torch.testing.assert_close(v, want_v, atol=1e-6, rtol=0)
    loaded = files.load_hypernetwork(final)
    assert loaded.sd_checkpoint == comps.checkpoint_hash == fresh.checkpoint_hash
    assert loaded.sd_checkpoint_name == "tiny_sdxl"
