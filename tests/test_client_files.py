"""The same file, the same result in every client: ComfyUI's dropout, snapshot names, which file each client reads,
and the `.pt` container that A1111's oldest safety check accepts and `torch.load(mmap=True)` reads."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from helpers.a1111_reference import a1111_load, a1111_safe_check, apply_pairs, comfyui_load

from hyperlit import cli, files
from hyperlit.runner import build_run, fit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory):
    from helpers.config import compose_config

    tmp = tmp_path_factory.mktemp("dropout_run")
    cfg = compose_config("train", [
        f"paths.output_dir={tmp / 'run'}", "logger=none", f"data.cache_dir={tmp / 'cache'}", "train.max_steps=4",
        "~callbacks.progress", "trainer.enable_progress_bar=false", "callbacks.preview.every=0",
        "callbacks.preview.at_end=false", "callbacks.export.save_every=2", "hypernet=swish_121_dropout",
        "hypernet.name=style", "hypernet.layer_structure=[1,2,2,1]", "hypernet.dropout_structure=[0,0.3,0.3,0]",
        "callbacks.ema.enabled=false",  # the files are checked against the live weights
    ])  # fmt: skip
    built = build_run(cfg)
    fit(built, cfg)
    return tmp / "run" / "hypernetworks", built.module.hypernetwork


def test_snapshots_store_the_base_name_as_a1111(dropout_run):
    folder, _ = dropout_run
    for file in ("style-2.pt", "style-4.pt", "style.pt"):
        raw = torch.load(folder / file, map_location="cpu", weights_only=True)
        assert raw["name"] == "style", file


def test_dropout_run_exports_an_inference_copy_for_comfyui(dropout_run):
    folder, trained = dropout_run
    final, copy = folder / "style.pt", folder / "style.comfyui.pt"
    assert copy.is_file()
    raw = torch.load(copy, map_location="cpu", weights_only=True)
    assert raw["use_dropout"] is False and raw["last_layer_dropout"] is False and raw["name"] == "style"
    trained.eval()
    for width in trained.sizes:
        context = torch.randn(2, 7, width, generator=torch.Generator().manual_seed(width))
        want_k, want_v = trained.forward_kv(context)  # the training file's eval-mode function
        a1111_k, _ = apply_pairs(a1111_load(final), context)
        torch.testing.assert_close(a1111_k, want_k, atol=1e-6, rtol=0)
        k, v = apply_pairs(comfyui_load(copy), context)  # modules in training mode, as ComfyUI leaves them
        torch.testing.assert_close(k, want_k, atol=1e-6, rtol=0)
        torch.testing.assert_close(v, want_v, atol=1e-6, rtol=0)
    # the training file itself in ComfyUI: Dropout in training mode makes every call differ
    comfy_final = comfyui_load(folder / "style.pt")
    context = torch.randn(1, 77, trained.sizes[0])
    first, second = apply_pairs(comfy_final, context)[0], apply_pairs(comfy_final, context)[0]
    assert not torch.equal(first, second)


def test_comfyui_dropout_rule_is_comfyuis(tmp_path):
    """ComfyUI places Dropout after the Linear at position i of the weight-key list unless i is last, or penultimate
    without last_layer_dropout: a [1, 2, 1] file with dropout [0, 0.3, 0] (last_layer_dropout true) gets one, and
    inspect flags it; with dropout only after the output Linear it gets none."""
    from hyperlit.files import comfyui
    from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig

    for dropout, expected in (([0, 0.3, 0], 2), ([0, 0, 0.2], 0)):
        hn = Hypernetwork(HypernetworkConfig(activation="swish", dropout_structure=dropout), sizes=[8])
        path = files.save_hypernetwork(hn, tmp_path / "plain.pt")
        modules = [m for pair in comfyui_load(path).values() for mod in pair for m in mod.modules()]
        assert sum(isinstance(m, torch.nn.Dropout) for m in modules) == expected
        verdict = comfyui.verdict(files.read_file(path))
        assert (verdict.dropout_layers, verdict.same_function) == (expected, expected == 0)


def test_inspect_says_comfyui_differs_for_dropout_files(dropout_run, capsys):
    folder, _ = dropout_run
    assert cli.main(["inspect", "--json", str(folder / "style.pt")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["comfyui_same_function"] is False
    assert "Dropout" in info["comfyui_note"] and "eval" in info["comfyui_note"]
    assert "style.comfyui.pt" in info["comfyui_note"] or "--strip-dropout" in info["comfyui_note"]
    assert cli.main(["inspect", "--json", str(folder / "style.comfyui.pt")]) == 0
    assert json.loads(capsys.readouterr().out)["comfyui_same_function"] is True


def test_safetensors_export_is_named_for_hyperlit(dropout_run, capsys):
    folder, trained = dropout_run
    assert (folder / "style.hyperlit.safetensors").is_file() and not (folder / "style.safetensors").exists()
    assert cli.main(["inspect", "--json", str(folder / "style.hyperlit.safetensors")]) == 0
    clients = json.loads(capsys.readouterr().out)["clients"]
    assert "hyperlit" in clients and "not" in clients
    # files written under the old name still read
    old = folder.parent / "old.safetensors"
    old.write_bytes((folder / "style.hyperlit.safetensors").read_bytes())
    loaded = files.load_hypernetwork(old)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.state_dict().items())


def test_pt_files_are_a_zip_every_a1111_accepts_and_mmap_reads(dropout_run):
    folder, trained = dropout_run
    for file in ("style.pt", "style-2.pt", "style.comfyui.pt"):
        path = folder / file
        assert zipfile.is_zipfile(path)
        a1111_safe_check(path)  # the oldest member-name check: no byteorder / serialization_id
        a1111_safe_check(path, relaxed_zip_names=True)
        mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        assert mapped["name"] == "style"
    mapped = torch.load(folder / "style.pt", weights_only=True, mmap=True)
    for width, (k_state, _) in trained.layer_state_dicts().items():
        for key, tensor in k_state.items():
            assert torch.equal(mapped[width][0][key], tensor.cpu())
