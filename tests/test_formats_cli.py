"""Round trips through .pt and .safetensors, and the `hyperlit inspect` / `hyperlit convert` console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import a1111_reference as ref
from helpers import hypernetworks

from hyperlit import cli, files
from hyperlit.files import a1111, load_hypernetwork, save_hypernetwork
from hyperlit.files.safetensors import LAYOUT_SAFETENSORS
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig

VENV_BIN = Path(sys.executable).parent
SUBPROCESS_ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

CONFIG = dict(
    layer_structure=[1, 2, 2, 1],
    activation="relu",
    activate_output=True,
    layer_norm=True,
    dropout_structure=[0.0, 0.25, 0.1, 0.0],
    weight_init="XavierNormal",
    multiplier=1.0,
)


def randomised(config: HypernetworkConfig, sizes: list[int], seed: int = 0) -> Hypernetwork:
    hn = hypernetworks.randomised(config, sizes, seed, name="original-name")
    hn.step = 1234
    hn.sd_checkpoint = "0123abcdef"
    hn.sd_checkpoint_name = "v1-5-pruned-emaonly"
    return hn


def eval_outputs(hn: Hypernetwork, widths: list[int]) -> list[torch.Tensor]:
    hn.eval()
    generator = torch.Generator().manual_seed(7)
    outputs = []
    with torch.no_grad():
        for width in widths:
            x = torch.randn(2, 5, width, generator=generator)
            outputs.extend(hn.forward_kv(x))
    return outputs


def assert_identical(a: Hypernetwork, b: Hypernetwork) -> None:
    widths = a.sizes
    assert b.sizes == widths
    for out_a, out_b in zip(eval_outputs(a, widths), eval_outputs(b, widths), strict=True):
        assert torch.equal(out_a, out_b)
    for (key_a, p_a), (key_b, p_b) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert key_a == key_b and torch.equal(p_a, p_b)


def assert_same_metadata(loaded: Hypernetwork, original: Hypernetwork, stem: str) -> None:
    assert loaded.name == stem
    assert loaded.step == original.step
    assert loaded.sd_checkpoint == original.sd_checkpoint
    assert loaded.sd_checkpoint_name == original.sd_checkpoint_name
    for key in ("layer_structure", "activation", "activate_output", "layer_norm", "dropout_structure", "weight_init"):
        assert getattr(loaded.config, key) == getattr(original.config, key), key
    assert loaded.config.use_dropout is True


@pytest.fixture
def original() -> Hypernetwork:
    return randomised(HypernetworkConfig(**CONFIG), sizes=[12, 8])  # not sorted: the order must survive


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip(tmp_path: Path, original: Hypernetwork, suffix: str) -> None:
    path = save_hypernetwork(original, tmp_path / f"my-net{suffix}")
    loaded = load_hypernetwork(path)
    assert not loaded.training
    assert_identical(original, loaded)
    assert_same_metadata(loaded, original, "my-net")
    assert loaded.source_layout == (a1111.LAYOUT_CURRENT if suffix == ".pt" else LAYOUT_SAFETENSORS)
    # Saving what was loaded reproduces the same file content.
    again = save_hypernetwork(loaded, tmp_path / f"my-net-2{suffix}")
    assert_identical(original, load_hypernetwork(again))


def test_safetensors_holds_no_pickle(tmp_path: Path, original: Hypernetwork) -> None:
    from safetensors import safe_open

    path = save_hypernetwork(original, tmp_path / "net.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    assert {"12.0.linear.0.weight", "8.1.linear.10.bias"} <= keys and "8.1.linear.7.bias" not in keys  # 7: Dropout
    assert metadata["format"] == "hyperlit-hypernetwork" and metadata["name"] == "net"
    assert json.loads(metadata["config"])["sizes"] == [12, 8]


def test_convert_in_process_pt_safetensors_pt(
    tmp_path: Path, original: Hypernetwork, capsys: pytest.CaptureFixture[str]
) -> None:
    source = save_hypernetwork(original, tmp_path / "source.pt")
    middle, back = tmp_path / "middle.safetensors", tmp_path / "back.pt"
    assert cli.main(["convert", str(source), str(middle)]) == 0
    assert cli.main(["convert", str(middle), str(back)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {middle} ({LAYOUT_SAFETENSORS})" in out and f"wrote {back} ({a1111.LAYOUT_CURRENT})" in out
    for path, stem in ((middle, "middle"), (back, "back")):
        loaded = load_hypernetwork(path)
        assert_identical(original, loaded)
        assert_same_metadata(loaded, original, stem)
    # ComfyUI rebuilds from the stored key order (here up to linear.10), so that order must survive the trip
    # (compared in eval mode: ComfyUI itself keeps this file's Dropout active, see test_client_files.py).
    for pairs in (ref.a1111_load(back), ref.comfyui_load(back, eval_mode=True)):
        x = torch.randn(2, 12)
        k, v = load_hypernetwork(back).forward_kv(x)
        k_ref, v_ref = ref.apply_pairs(pairs, x)
        torch.testing.assert_close(k, k_ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(v, v_ref, atol=1e-6, rtol=0)
    # The .pt that went through safetensors is the same A1111 dict, apart from the name.
    raw_source = torch.load(source, weights_only=True)
    raw_back = torch.load(back, weights_only=True)
    assert list(raw_source) == list(raw_back)
    for key, value in raw_source.items():
        if key == "name":
            assert (value, raw_back[key]) == ("source", "back")
        elif isinstance(key, int):
            for state_a, state_b in zip(value, raw_back[key], strict=True):
                assert list(state_a) == list(state_b)
                assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
        else:
            assert raw_back[key] == value, key


def test_convert_historical_file_writes_current_layout(tmp_path: Path) -> None:
    source = tmp_path / "oct.pt"
    torch.save(ref.oct2022_file(widths=(8,)), source)
    target = tmp_path / "oct-current.pt"
    assert cli.main(["convert", str(source), str(target)]) == 0
    raw = torch.load(target, weights_only=True)
    assert raw["activate_output"] is True and raw["dropout_structure"] == [0.0, 0.0, 0.0]
    x = torch.randn(3, 8)
    for pairs in (ref.a1111_load(source), ref.a1111_load(target)):
        torch.testing.assert_close(
            ref.apply_pairs(pairs, x)[0], load_hypernetwork(source).forward_kv(x)[0], atol=1e-6, rtol=0
        )


def test_convert_as_subprocess_with_console_script(tmp_path: Path, original: Hypernetwork) -> None:
    source = save_hypernetwork(original, tmp_path / "sub.pt")
    target = tmp_path / "sub.safetensors"
    script = VENV_BIN / "hyperlit"
    assert script.is_file()
    done = subprocess.run(
        [str(script), "convert", str(source), str(target)],
        capture_output=True,
        text=True,
        env=SUBPROCESS_ENV,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert target.is_file()
    loaded = load_hypernetwork(target)
    assert_identical(original, loaded)
    assert_same_metadata(loaded, original, "sub")


def test_convert_strip_dropout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = HypernetworkConfig(layer_structure=[1, 2, 2, 1], activation="swish", dropout_structure=[0, 0.3, 0.3, 0])
    hn = randomised(config, sizes=[8, 12])
    source = save_hypernetwork(hn, tmp_path / "with-dropout.pt")
    source_keys = list(torch.load(source, weights_only=True)[8][0])
    assert source_keys == [f"linear.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]
    target = tmp_path / "stripped.pt"
    assert cli.main(["convert", "--strip-dropout", str(source), str(target)]) == 0
    capsys.readouterr()

    raw = torch.load(target, weights_only=True)
    for width in (8, 12):
        for state in raw[width]:
            assert list(state) == [f"linear.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    assert raw["use_dropout"] is False and raw["last_layer_dropout"] is False
    assert raw["dropout_structure"] == [0.0, 0.0, 0.0, 0.0]
    assert raw["activation_func"] == "swish" and raw["layer_structure"] == [1.0, 2.0, 2.0, 1.0]
    stripped = load_hypernetwork(target)
    assert not any(isinstance(m, torch.nn.Dropout) for m in stripped.modules())
    for out_a, out_b in zip(eval_outputs(hn, [8, 12]), eval_outputs(stripped, [8, 12]), strict=True):
        torch.testing.assert_close(out_a, out_b, atol=1e-6, rtol=0)
    # A1111 and ComfyUI readers see the same function in the stripped file, with no Dropout at all.
    for pairs in (ref.a1111_load(target), ref.comfyui_load(target)):
        modules = [m for pair in pairs.values() for module in pair for m in module.modules()]
        assert modules and not any(isinstance(m, torch.nn.Dropout) for m in modules)
        x = torch.randn(3, 12)
        torch.testing.assert_close(ref.apply_pairs(pairs, x)[1], hn.eval().forward_kv(x)[1], atol=1e-6, rtol=0)


def _inspect_json(path: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert cli.main(["inspect", "--json", str(path)]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_json_reports_everything(
    tmp_path: Path, original: Hypernetwork, capsys: pytest.CaptureFixture[str]
) -> None:
    path = save_hypernetwork(original, tmp_path / "inspected.pt")
    info = _inspect_json(path, capsys)
    expected_parameters = 2 * sum(
        (d * 2 * d + 2 * d)
        + 2 * (2 * d)  # Linear d->2d, LayerNorm(2d)
        + (2 * d * 2 * d + 2 * d)
        + 2 * (2 * d)  # Linear 2d->2d, LayerNorm(2d)
        + (2 * d * d + d)
        + 2 * d  # Linear 2d->d, LayerNorm(d)
        for d in (12, 8)
    )
    assert expected_parameters == original.parameter_count()
    assert info == {
        "name": "inspected",
        "layout": a1111.LAYOUT_CURRENT,
        "widths": [12, 8],
        "layer_structure": [1, 2, 2, 1],
        "activation": "relu",
        "activate_output": True,
        "layer_norm": True,
        "dropout_structure": [0.0, 0.25, 0.1, 0.0],
        "weight_init": "XavierNormal",
        "parameters": expected_parameters,
        "step": 1234,
        "sd_checkpoint": "0123abcdef",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
        "optional_info": None,
        "comfyui_same_function": False,  # trained with dropout: ComfyUI keeps Dropout active at inference
        "comfyui_note": (
            "ComfyUI builds Dropout(0.3) layers for this file (use_dropout true) and never switches them to eval "
            "mode, so they drop activations at every generation: random, different outputs each time (A1111 "
            "evaluates with dropout off); give ComfyUI the inference copy inspected.comfyui.pt (written next to the "
            "final .pt, or: hyperlit convert --strip-dropout)"
        ),
        "clients": "A1111 (models/hypernetworks, <hypernet:name:1>) and ComfyUI (HypernetworkLoader); hyperlit",
    }
    # The table form shows the same figures.
    assert cli.main(["inspect", str(path)]) == 0
    table = capsys.readouterr().out
    assert f"{expected_parameters:,}" in table and "0123abcdef" in table and a1111.LAYOUT_CURRENT in table


@pytest.mark.parametrize(
    ("builder", "layout", "expected"),
    [
        (
            lambda: ref.novelai_file(widths=(8,)),
            a1111.LAYOUT_NOVELAI,
            dict(activation="linear", activate_output=True, dropout_structure=[0.0, 0.0, 0.0], step=0),
        ),
        (
            lambda: ref.oct2022_file(widths=(8,)),
            a1111.LAYOUT_OCT_2022,
            dict(activation="relu", activate_output=True, step=1200, sd_checkpoint="a9e2bd1b"),
        ),
        (
            lambda: ref.nov2022_file(True, widths=(8,)),
            a1111.LAYOUT_NOV_2022,
            dict(activation="swish", activate_output=False, dropout_structure=[0.0, 0.3, 0.3, 0.3, 0.0]),
        ),
        (
            lambda: ref.nov2022_file(False, widths=(8,)),
            a1111.LAYOUT_NOV_2022,
            dict(dropout_structure=[0.0, 0.3, 0.3, 0.0, 0.0], layer_structure=[1, 2, 4, 2, 1]),
        ),
        (
            lambda: ref.current_file(widths=(8,)),
            a1111.LAYOUT_CURRENT,
            dict(
                layer_norm=True,
                dropout_structure=[0.0, 0.1, 0.0],
                name="current",
                optional_info="made by hand",
                weight_init="KaimingNormal",
                comfyui_same_function=False,
            ),
        ),  # dropout stays active in ComfyUI
        (
            lambda: ref.kohya_file(widths=(8,)),
            a1111.LAYOUT_NO_METADATA,
            dict(activation="linear", layer_structure=[1, 2, 1], name="hist"),
        ),
        (lambda: ref.numeric_string_file(widths=(8,)), a1111.LAYOUT_NO_METADATA, dict(widths=[8])),
    ],
    ids=["novelai", "oct-2022", "nov-2022-lld", "nov-2022", "current", "kohya", "string-keys"],
)
def test_inspect_historical_layouts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], builder, layout: str, expected: dict
) -> None:
    raw = builder()
    path = tmp_path / "hist.pt"
    torch.save(raw, path)
    info = _inspect_json(path, capsys)
    assert info["layout"] == layout
    assert info["widths"] == [8]
    parameters = sum(
        t.numel()
        for key, pair in raw.items()
        if not isinstance(key, str) or key.isdigit()
        for state in pair
        for t in state.values()
    )
    assert info["parameters"] == parameters
    for key, value in expected.items():
        assert info[key] == value, key


def test_layout_names_are_distinct() -> None:
    names = [
        a1111.LAYOUT_NOVELAI,
        a1111.LAYOUT_NO_METADATA,
        a1111.LAYOUT_OCT_2022,
        a1111.LAYOUT_NOV_2022,
        a1111.LAYOUT_CURRENT,
        LAYOUT_SAFETENSORS,
    ]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(
    ("argv_builder", "phrase"),
    [
        (lambda d, pt: ["convert", str(pt), str(pt)], "same file"),
        (lambda d, pt: ["convert", str(d / "absent.pt"), str(d / "out.pt")], "no such file"),
        (lambda d, pt: ["convert", str(pt), str(d / "out.ckpt")], "not a hypernetwork format"),
        (lambda d, pt: ["inspect", str(d / "net.bin")], "not a hypernetwork format"),
        (lambda d, pt: ["inspect", str(d / "foreign.safetensors")], "not a hyperlit hypernetwork"),
    ],
    ids=["same-file", "missing", "bad-extension-out", "bad-extension-in", "foreign-safetensors"],
)
def test_cli_errors_exit_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv_builder, phrase: str
) -> None:
    from safetensors.torch import save_file

    pt = save_hypernetwork(Hypernetwork(HypernetworkConfig(), sizes=[8]), tmp_path / "net.pt")
    (tmp_path / "net.bin").write_bytes(pt.read_bytes())
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    argv = argv_builder(tmp_path, pt)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"hyperlit {argv[0]}: error: ")
    assert phrase in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out.ckpt").exists()


def test_malformed_safetensors_names_the_file(tmp_path: Path, original: Hypernetwork) -> None:
    from safetensors.torch import load_file, save_file

    good = save_hypernetwork(original, tmp_path / "good.safetensors")
    with open(good, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    tensors = load_file(good)
    tensors["stray"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=header["__metadata__"])
    with pytest.raises(files.HypernetworkFileError, match="tensor 'stray' is not") as info:
        load_hypernetwork(bad)
    assert str(info.value).startswith(str(bad))


def test_every_written_file_gets_the_permissions_of_a_plain_open(tmp_path):
    """safetensors' writer creates 0600 files; outputs must be readable like any file the user's umask allows."""
    from hyperlit.hypernetwork import HypernetworkConfig

    plain = tmp_path / "plain"
    plain.write_bytes(b"")  # what open() gives under this umask: the oracle
    hn = hypernetworks.randomised(HypernetworkConfig(), [8], seed=0)
    for name in ("a.pt", "a.hyperlit.safetensors"):
        written = files.save_hypernetwork(hn, tmp_path / name)
        assert os.stat(written).st_mode & 0o777 == os.stat(plain).st_mode & 0o777, name
