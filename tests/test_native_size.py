"""Native sizes: data.resolution (and previews, generate) default to the base model's training size."""

from __future__ import annotations

import pytest
import torch
from helpers.config import compose_config

from hyperlit.models import FAMILIES, ModelSpec
from hyperlit.tasks import TASKS
from hyperlit.tasks.hypernetwork.build import native_size


@pytest.mark.parametrize(
    ("family", "prediction_type", "size"),
    [
        ("tiny", None, 64),
        ("sd15", None, 512),
        ("sd15", "epsilon", 512),
        ("sd21", None, 768),
        ("sd21", "v_prediction", 768),
        ("sd21", "epsilon", 512),  # SD 2.x 512 "base"
        ("sdxl", None, 1024),
    ],
)
def test_family_table(family: str, prediction_type: str | None, size: int) -> None:
    assert FAMILIES[family].native_resolution(prediction_type) == size


def spec(family: str, prediction_type: str) -> ModelSpec:
    return ModelSpec(FAMILIES[family], "tiny", None, None, None, None, torch.float32, 0, prediction_type, 1)


def test_null_resolution_becomes_the_native_size_and_a_set_one_is_kept() -> None:
    data = compose_config("train", ["data=folder", "data.path=/x"]).data
    assert data.resolution is None  # the shipped default
    assert native_size(data, spec("sd21", "epsilon")) == {"resolution": 512}
    assert native_size(data, spec("sd21", "v_prediction")) == {"resolution": 768}
    data.resolution = 320
    assert native_size(data, spec("sd15", "epsilon")) == {}


def test_the_tiny_run_trains_at_64_decided_before_the_model_loads(train_cfg, tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")  # listed, not decoded: the build reads no image and no weights
    cfg = train_cfg("data=folder", f"data.path={folder}", "data.val_count=0")
    parts = TASKS["hypernetwork"](cfg)  # build only: the weights load later, in parts.load_module()
    assert parts.datamodule.opts.resolution == 64


def test_make_shards_precomputes_latents_at_the_models_native_size() -> None:
    from types import SimpleNamespace

    from hyperlit.cli import native_or_512

    assert native_or_512(SimpleNamespace(family=FAMILIES["tiny"], prediction_type="epsilon")) == 64
    assert native_or_512(SimpleNamespace(family=FAMILIES["sd21"], prediction_type="v_prediction")) == 768
    assert native_or_512(None) == 512
