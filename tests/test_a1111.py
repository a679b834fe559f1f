"""The A1111 ``.pt`` format: what hyperlit writes, every historical layout it reads, and what it refuses.

Expected outputs come from the independent readers in ``a1111_reference`` (A1111's and ComfyUI's rules from the
spec), never from hyperlit's own reader.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from helpers import a1111_reference as ref
from helpers.hypernetworks import randomised
from torch import nn

from hyperlit.files import (
    HypernetworkFileError,
    a1111,
    comfyui,
    load_hypernetwork,
    read_file,
    save_hypernetwork,
    strip_dropout,
    to_file_content,
    write_file,
)
from hyperlit.files import safetensors as safetensors_codec
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig

METADATA_KEYS = {
    "step",
    "name",
    "layer_structure",
    "activation_func",
    "is_layer_norm",
    "weight_initialization",
    "sd_checkpoint",
    "sd_checkpoint_name",
    "activate_output",
    "use_dropout",
    "dropout_structure",
    "last_layer_dropout",
    "optional_info",
}


def assert_same_function(hn: Hypernetwork, pairs: ref.Pairs, widths: list[int], atol: float = 1e-6) -> None:
    """hyperlit's eval-mode outputs equal the reference's for every width (K and V), identity elsewhere."""
    hn.eval()
    assert sorted(pairs) == sorted(widths)
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for width in widths:
            x = torch.randn(2, 5, width, generator=generator) * 2
            k, v = hn.forward_kv(x)
            k_ref, v_ref = ref.apply_pairs(pairs, x)
            torch.testing.assert_close(k, k_ref, atol=atol, rtol=0)
            torch.testing.assert_close(v, v_ref, atol=atol, rtol=0)
            assert not torch.allclose(k, x, atol=1e-3)  # the modules do something
            assert not torch.allclose(k, v, atol=1e-3)  # K and V are not swapped copies
        other = torch.randn(2, 5, 7)
        assert torch.equal(hn.forward_kv(other)[0], other) and torch.equal(ref.apply_pairs(pairs, other)[1], other)


# --- the written .pt ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "last_layer_dropout"),
    [
        (dict(), False),
        (dict(layer_structure=[1, 2, 1], dropout_structure=[0, 0.3, 0]), True),
        (dict(layer_structure=[1, 2, 2, 1], activation="swish", dropout_structure=[0, 0.3, 0.3, 0]), True),
        (dict(layer_structure=[1, 2, 2, 1], activation="relu", dropout_structure=[0, 0.3, 0, 0]), False),
        (dict(layer_structure=[1, 2, 1], activation="tanh", layer_norm=True, activate_output=True), False),
    ],
)
def test_written_pt_layout(tmp_path: Path, options: dict, last_layer_dropout: bool) -> None:
    config = HypernetworkConfig(**options)
    hn = randomised(config, sizes=[12, 8])
    hn.step, hn.sd_checkpoint, hn.sd_checkpoint_name = 42, "abcdef0123", "v1-5-pruned"
    path = save_hypernetwork(hn, tmp_path / "written.pt")

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert type(raw) is dict
    width_keys = [key for key in raw if not isinstance(key, str)]
    assert width_keys == [12, 8] and all(type(key) is int for key in width_keys)
    assert set(raw) - set(width_keys) == METADATA_KEYS
    for width in width_keys:
        pair = raw[width]
        assert type(pair) is tuple and len(pair) == 2
        for state, module in zip(pair, hn.pairs[str(width)], strict=True):
            assert isinstance(state, dict)
            assert list(state) == list(module.state_dict())
            for key, tensor in state.items():
                assert type(tensor) is torch.Tensor  # not an nn.Parameter
                assert tensor.device.type == "cpu" and tensor.dtype == torch.float32
                assert torch.equal(tensor, module.state_dict()[key])
    dropout = config.dropout_probabilities()
    assert raw["activation_func"] == config.activation and raw["activation_func"] is not None
    assert raw["layer_structure"] == [float(x) for x in config.layer_structure]
    assert raw["dropout_structure"] == dropout and len(raw["dropout_structure"]) == len(raw["layer_structure"])
    assert raw["last_layer_dropout"] is last_layer_dropout
    assert raw["last_layer_dropout"] == (raw["dropout_structure"][-2] != 0)
    assert raw["use_dropout"] is any(p > 0 for p in dropout)
    assert raw["activate_output"] is config.activate_output and raw["is_layer_norm"] is config.layer_norm
    assert raw["weight_initialization"] == "Normal"
    assert raw["name"] == "written" and raw["step"] == 42 and type(raw["step"]) is int
    assert raw["sd_checkpoint"] == "abcdef0123" and raw["sd_checkpoint_name"] == "v1-5-pruned"
    assert raw["optional_info"] is None


def test_linear_activation_is_written_as_string(tmp_path: Path) -> None:
    path = save_hypernetwork(Hypernetwork(HypernetworkConfig(), sizes=[8]), tmp_path / "a.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["activation_func"] == "linear"


def test_written_pt_is_a_zip_every_a1111_accepts_and_mmap_reads(tmp_path: Path) -> None:
    config = HypernetworkConfig(
        layer_structure=[1, 2, 2, 1],
        activation="relu",
        layer_norm=True,
        activate_output=True,
        dropout_structure=[0, 0.1, 0.2, 0],
    )
    hn = randomised(config, sizes=[8, 12])
    path = save_hypernetwork(hn, tmp_path / "safe.pt")
    assert zipfile.is_zipfile(path)
    with zipfile.ZipFile(path) as archive:  # no byteorder / serialization id that A1111 < 07cf95c refuses
        assert sorted(n.split("/", 1)[1] for n in archive.namelist()) == [
            "data.pkl",
            *sorted(f"data/{i}" for i in range(len(archive.namelist()) - 2)),
            "version",
        ]
    (body,) = ref.a1111_safe_check(path)  # the oldest member-name check, then the restricted unpickler
    ref.a1111_safe_check(path, relaxed_zip_names=True)
    assert type(body) is dict and [k for k in body if type(k) is int] == [8, 12]
    assert body["activation_func"] == "relu" and body["dropout_structure"] == [0.0, 0.1, 0.2, 0.0]
    # A1111 / ComfyUI's weights-only torch.load read it, and so does ComfyUI's --mmap-torch-files (mmap=True).
    mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for width, (k_state, _) in hn.layer_state_dicts().items():
        assert all(torch.equal(mapped[width][0][key], t) for key, t in k_state.items())
    # the same content gives the same bytes (no random serialization id, fixed timestamps)
    again = save_hypernetwork(hn, tmp_path / "again.pt", name="safe")
    assert again.read_bytes() == path.read_bytes()


def test_restricted_unpickler_refuses_disallowed_globals(tmp_path: Path) -> None:
    state = {"linear.0.weight": torch.zeros(2, 2)}
    bad_values = {"path": Path("x"), "dtype16": torch.float16, "module": nn.ReLU()}
    for label, value in bad_values.items():
        path = tmp_path / f"{label}.pt"
        torch.save({8: (state, state), "extra": value}, path, _use_new_zipfile_serialization=False)
        with pytest.raises(ref.RefusedFile, match="forbidden"):
            ref.a1111_safe_check(path)
    good = tmp_path / "good.pt"
    torch.save({8: (state, state), "dtype": torch.float32}, good, _use_new_zipfile_serialization=False)
    ref.a1111_safe_check(good)
    # A default (zip) torch.save of the same content has `byteorder`, which the older releases refuse.
    zipped = tmp_path / "zipped.pt"
    torch.save({8: (state, state)}, zipped)
    assert "zipped/byteorder" in zipfile.ZipFile(zipped).namelist()
    with pytest.raises(ref.RefusedFile, match="bad file inside"):
        ref.a1111_safe_check(zipped)
    ref.a1111_safe_check(zipped, relaxed_zip_names=True)


# --- historical layouts --------------------------------------------------------------------------------------


def _save_raw(tmp_path: Path, name: str, raw: dict, zip_format: bool = True) -> Path:
    path = tmp_path / f"{name}.pt"
    torch.save(raw, path, _use_new_zipfile_serialization=zip_format)
    return path


def test_novelai_layout(tmp_path: Path) -> None:
    raw = ref.novelai_file(widths=(8, 12))
    path = _save_raw(tmp_path, "nai", raw, zip_format=False)
    hn = load_hypernetwork(path)
    assert hn.source_layout == a1111.LAYOUT_NOVELAI
    assert hn.config.layer_structure == [1, 2, 1] and hn.config.activation == "linear"
    assert hn.name == "nai" and hn.step == 0 and hn.sd_checkpoint is None
    assert [type(layer) for layer in hn.pairs["8"][0].linear] == [nn.Linear, nn.Linear]
    x = torch.randn(3, 8)
    for index, module in enumerate(hn.pairs["8"]):
        state = raw[8][index]
        expected = x + (x @ state["linear1.weight"].T + state["linear1.bias"]) @ state["linear2.weight"].T
        expected = expected + state["linear2.bias"]
        torch.testing.assert_close(module(x), expected, atol=1e-6, rtol=0)
    assert_same_function(hn, ref.a1111_load(path), [8, 12])


def test_oct_2022_layout_activates_after_both_linears(tmp_path: Path) -> None:
    raw = ref.oct2022_file(widths=(8, 12))
    assert "activate_output" not in raw
    path = _save_raw(tmp_path, "oct", raw)
    hn = load_hypernetwork(path)
    assert hn.source_layout == a1111.LAYOUT_OCT_2022
    assert hn.config.activate_output is True and hn.config.activation == "relu"
    assert [type(layer) for layer in hn.pairs["12"][1].linear] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU]
    assert hn.name == "oct" and hn.step == 1200
    assert hn.sd_checkpoint == "a9e2bd1b" and hn.sd_checkpoint_name == "model-v1"
    x = torch.randn(3, 12)
    state = raw[12][1]
    hidden = torch.relu(x @ state["linear.0.weight"].T + state["linear.0.bias"])
    expected = x + torch.relu(hidden @ state["linear.2.weight"].T + state["linear.2.bias"])
    torch.testing.assert_close(hn.pairs["12"][1](x), expected, atol=1e-6, rtol=0)
    assert_same_function(hn, ref.a1111_load(path), [8, 12])


@pytest.mark.parametrize(
    ("last_layer_dropout", "dropout", "linear_indices"),
    [(True, [0, 0.3, 0.3, 0.3, 0], [0, 3, 6, 9]), (False, [0, 0.3, 0.3, 0, 0], [0, 3, 6, 8])],
)
def test_nov_2022_layout_derives_dropout(
    tmp_path: Path, last_layer_dropout: bool, dropout: list[float], linear_indices: list[int]
) -> None:
    raw = ref.nov2022_file(last_layer_dropout, widths=(8,))
    assert "dropout_structure" not in raw
    assert ref.old_dropout_structure([1, 2, 4, 2, 1], True, last_layer_dropout) == dropout
    assert a1111.derive_dropout_structure([1, 2, 4, 2, 1], True, last_layer_dropout) == dropout
    path = _save_raw(tmp_path, "nov", raw)
    hn = load_hypernetwork(path)
    assert hn.source_layout == a1111.LAYOUT_NOV_2022
    assert hn.config.dropout_structure == dropout and hn.config.activate_output is False
    module = hn.pairs["8"][0]
    assert [i for i, layer in enumerate(module.linear) if isinstance(layer, nn.Linear)] == linear_indices
    assert [i for i, layer in enumerate(module.linear) if isinstance(layer, nn.Dropout)] == [
        i + 2 for i in linear_indices[:-1] if dropout[linear_indices.index(i) + 1] > 0
    ]
    assert isinstance(module.linear[1], nn.Hardswish)
    assert not isinstance(module.linear[-1], nn.Hardswish)  # activate_output False
    assert_same_function(hn, ref.a1111_load(path), [8])


def test_derived_dropout_examples_of_spec() -> None:
    derive = a1111.derive_dropout_structure
    assert derive([1, 2, 1], True, True) == [0, 0.3, 0]
    assert derive([1, 2, 1], True, False) == [0, 0, 0]
    assert derive([1, 2, 4, 2, 1], True, True) == [0, 0.3, 0.3, 0.3, 0]
    assert derive([1, 2, 4, 2, 1], True, False) == [0, 0.3, 0.3, 0, 0]
    assert derive([1, 2, 4, 2, 1], False, True) == [0, 0, 0, 0, 0]
    assert derive(None, True, True) == [0, 0.3, 0]
    for structure in ([1, 2, 1], [1, 2, 2, 1], [1, 2, 4, 4, 2, 1]):
        for lld in (True, False):
            assert derive(structure, True, lld) == ref.old_dropout_structure(structure, True, lld)


def test_current_layout_with_dropout_structure(tmp_path: Path) -> None:
    raw = ref.current_file(widths=(8, 12))
    path = _save_raw(tmp_path, "cur", raw)
    hn = load_hypernetwork(path)
    assert hn.source_layout == a1111.LAYOUT_CURRENT
    assert hn.name == "current"  # the stored name wins over the stem, as in A1111
    assert hn.step == 777 and hn.optional_info == "made by hand"
    assert hn.config.layer_norm and hn.config.activate_output and hn.config.dropout_structure == [0, 0.1, 0]
    assert [type(layer) for layer in hn.pairs["8"][0].linear] == [
        nn.Linear,
        nn.ReLU,
        nn.LayerNorm,
        nn.Dropout,
        nn.Linear,
        nn.ReLU,
        nn.LayerNorm,
    ]
    assert_same_function(hn, ref.a1111_load(path), [8, 12])


def test_kohya_layout_without_metadata(tmp_path: Path) -> None:
    raw = ref.kohya_file(widths=(8, 12))
    assert type(raw[8]) is list
    path = _save_raw(tmp_path, "kohya", raw)
    hn = load_hypernetwork(path)
    assert hn.source_layout == a1111.LAYOUT_NO_METADATA
    assert hn.config.activation == "linear" and hn.config.layer_structure == [1, 2, 1]
    assert hn.name == "kohya"
    assert_same_function(hn, ref.a1111_load(path), [8, 12])
    assert_same_function(hn, ref.comfyui_load(path), [8, 12])


def test_numeric_string_width_keys(tmp_path: Path) -> None:
    raw = ref.numeric_string_file(widths=(8, 12))
    path = _save_raw(tmp_path, "strings", raw)
    hn = load_hypernetwork(path)
    assert hn.sizes == [8, 12]
    assert ref.a1111_load(path) == {}  # A1111 silently skips string keys ...
    assert_same_function(hn, ref.a1111_load(path, accept_numeric_strings=True), [8, 12])
    assert_same_function(hn, ref.comfyui_load(path), [8, 12])  # ... ComfyUI reads them
    # Saving normalises them to int keys.
    raw_out = torch.load(save_hypernetwork(hn, tmp_path / "normalised.pt"), weights_only=True)
    assert [k for k in raw_out if type(k) is int] == [8, 12]


def test_fp16_tensors_in_a_file_load_as_fp32(tmp_path: Path) -> None:
    raw = ref.kohya_file(widths=(8,))
    half = {8: tuple({k: v.half() for k, v in state.items()} for state in raw[8])}
    path = _save_raw(tmp_path, "half", half)
    hn = load_hypernetwork(path)
    assert all(p.dtype == torch.float32 for p in hn.parameters())
    assert_same_function(hn, ref.a1111_load(path), [8])


# --- A1111 and ComfyUI compute what hyperlit computes ------------------------------------------------------

AGREEING_CONFIGS = [
    dict(layer_structure=[1, 2, 1], activation="linear"),
    dict(layer_structure=[1, 2, 2, 1], activation="relu"),
    dict(layer_structure=[1, 1.5, 1], activation="swish", activate_output=True),
    dict(layer_structure=[1, 2, 1], activation="tanh", layer_norm=True, activate_output=True),
    dict(layer_structure=[1, 2, 2, 1], activation="linear", layer_norm=True),
    dict(layer_structure=[1, 2, 2, 1], activation="elu", dropout_structure=[0, 0.3, 0.3, 0]),
    dict(layer_structure=[1, 2, 1], activation="mish", dropout_structure=[0, 0.2, 0], activate_output=True),
    dict(layer_structure=[1, 1.5, 1], activation="softsign"),
    dict(
        layer_structure=[1, 2, 1],
        activation="swish",
        layer_norm=True,
        activate_output=True,
        dropout_structure=[0, 0.3, 0],
    ),
    dict(layer_structure=[1, 2, 2, 1], activation="sigmoid", activate_output=True),
    dict(layer_structure=[1, 2, 1], activation="leakyrelu", layer_norm=False),
    dict(layer_structure=[1, 2, 4, 2, 1], activation="relu", dropout_structure=[0, 0.3, 0.3, 0, 0]),
    dict(layer_structure=[1, 2, 2, 1], activation="linear", layer_norm=True, dropout_structure=[0, 0.1, 0, 0]),
]


@pytest.mark.parametrize("options", AGREEING_CONFIGS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_written_files_load_the_same_in_a1111_and_comfyui(tmp_path: Path, options: dict) -> None:
    config = HypernetworkConfig(**options)
    hn = randomised(config, sizes=[8, 12])
    path = save_hypernetwork(hn, tmp_path / "agree.pt")
    widths = [8, 12]
    assert_same_function(hn, ref.a1111_load(path), widths)
    assert_same_function(load_hypernetwork(path), ref.a1111_load(path), widths)
    comfy_dropout = [m for pair in ref.comfyui_load(path).values() for mod in pair for m in mod.modules()
                     if isinstance(m, nn.Dropout)]  # fmt: skip
    verdict = comfyui.verdict(read_file(path))
    assert verdict.dropout_layers == len(comfy_dropout)  # the rule, against the reference
    assert verdict == comfyui.verdict(to_file_content(hn))  # the file as written, and the content written
    if not comfy_dropout:
        assert verdict == comfyui.ComfyUIVerdict(True, 0, "")
        assert_same_function(hn, ref.comfyui_load(path), widths)
        return
    # ComfyUI keeps its Dropout layers active at inference: flagged, and the inference copy computes A1111's function
    assert not verdict.same_function and "Dropout" in verdict.reason and "eval" in verdict.reason
    copy = write_file(tmp_path / "agree.comfyui.pt", strip_dropout(to_file_content(hn)))
    assert_same_function(hn, ref.comfyui_load(copy), widths)


def test_layer_norm_without_activate_output_differs_in_comfyui(tmp_path: Path) -> None:
    """ComfyUI's divergence (layer_norm + non-linear activation without activate_output) is real, and flagged."""
    config = HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", layer_norm=True)
    hn = randomised(config, sizes=[8])
    assert comfyui.verdict(to_file_content(hn)) == comfyui.ComfyUIVerdict(
        False,
        0,
        "ComfyUI builds Linear, ReLU, LayerNorm, Linear, ReLU, LayerNorm where A1111 builds Linear, ReLU, LayerNorm, "
        "Linear, LayerNorm (width 8 K); with layer_norm and a non-linear activation ComfyUI adds an activation after "
        "the last Linear unless activate_output is true",
    )
    path = save_hypernetwork(hn, tmp_path / "diverge.pt")
    assert_same_function(hn, ref.a1111_load(path), [8])
    x = torch.randn(4, 8)
    comfy_k = ref.apply_pairs(ref.comfyui_load(path), x)[0]
    assert not torch.allclose(comfy_k, hn.eval().forward_kv(x)[0], atol=1e-3)


def test_comfyui_refuses_activations_it_does_not_know(tmp_path: Path) -> None:
    config = HypernetworkConfig(activation="gelu")
    path = save_hypernetwork(randomised(config, sizes=[8]), tmp_path / "gelu.pt")
    assert comfyui.verdict(read_file(path)) == comfyui.ComfyUIVerdict(
        False, 0, "ComfyUI does not load activation 'gelu'"
    )
    with pytest.raises(ref.ComfyUIUnsupported):
        ref.comfyui_load(path)
    assert_same_function(load_hypernetwork(path), ref.a1111_load(path), [8])


# --- pickles that would run code ---------------------------------------------------------------------------


def write_marker(path: str) -> None:
    Path(path).write_text("pwned")


class RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RunsFunction:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (write_marker, (str(self.marker),))


class RunsExec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('x')",))


@pytest.mark.parametrize(
    ("payload", "global_name"), [(RunsShell, "system"), (RunsFunction, "write_marker"), (RunsExec, "exec")]
)
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_that_would_run_code_is_refused(
    tmp_path: Path, payload: type, global_name: str, zip_format: bool
) -> None:
    state = OrderedDict(ref.random_state(ref.linear_keys(0, 8, 16) + ref.linear_keys(1, 16, 8), 0))
    # Prove the payload is live: an unrestricted load does run it.
    probe_marker = tmp_path / "probe-marker"
    probe = tmp_path / "probe.pt"
    torch.save({8: (state, state), "name": payload(probe_marker)}, probe, _use_new_zipfile_serialization=zip_format)
    torch.load(probe, weights_only=False)
    assert probe_marker.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({8: (state, state), "name": payload(marker)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(HypernetworkFileError) as info:
        load_hypernetwork(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "refused" in message and global_name in message, message
    assert not marker.exists()
    with pytest.raises(ref.RefusedFile, match="forbidden"):
        ref.a1111_safe_check(path, relaxed_zip_names=True)
    assert not marker.exists()


# --- bad input ---------------------------------------------------------------------------------------------


def _kohya_pair(d: int = 8, seed: int = 0) -> tuple:
    return tuple(ref.kohya_file(widths=(d,), seed=seed)[d])


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase the error must contain)."""
    files: dict[str, tuple[Path, str]] = {}

    def save(name: str, obj: object, phrase: str, zip_format: bool = True) -> None:
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
        files[name] = (path, phrase)

    good = save_hypernetwork(randomised(HypernetworkConfig(), sizes=[64]), tmp_path / "good.pt")
    for zip_format in (True, False):
        name = f"truncated-{'zip' if zip_format else 'legacy'}"
        full = tmp_path / f"full-{name}.pt"
        torch.save(torch.load(good, weights_only=True), full, _use_new_zipfile_serialization=zip_format)
        path = tmp_path / f"{name}.pt"
        path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        files[name] = (path, "not a readable torch file")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    files["empty"] = (empty, "empty")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file at all\n" * 10)
    files["garbage"] = (garbage, "not a readable torch file")
    files["missing"] = (tmp_path / "missing.pt", "no such file")
    save("tensor", torch.zeros(3), "not a hypernetwork file")
    save("no-widths", {"step": 3, "name": "x", "layer_structure": [1, 2, 1]}, "no width entries")
    k_state, v_state = _kohya_pair()
    v_wrong = ref.random_state(ref.linear_keys(0, 8, 24) + ref.linear_keys(1, 24, 8), 1)
    save("kv-mismatch", {8: (k_state, v_wrong)}, "K and V modules differ")
    save("zero-width", {0: (k_state, v_state)}, "not a width")
    save("negative-width", {-3: (k_state, v_state)}, "not a width")
    save("float-width", {8.0: (k_state, v_state)}, "neither a width nor a metadata name")
    save("tensor-width", {torch.tensor(8): (k_state, v_state)}, "neither a width nor a metadata name")
    save("bool-width", {True: (k_state, v_state)}, "not a width")
    save("not-a-pair", {8: k_state}, "expected a (K, V) pair")
    save(
        "unknown-activation",
        {8: (k_state, v_state), "activation_func": "swooshy"},
        "activation_func 'swooshy' is not supported",
    )
    save("structure-mismatch", {8: (k_state, v_state), "layer_structure": [1, 2, 2, 1]}, "does not fit the structure")
    save("layer-norm-mismatch", {8: (k_state, v_state), "is_layer_norm": True}, "does not fit the structure")
    save("width-mismatch", {12: (k_state, v_state)}, "does not match its first Linear")
    save("bad-structure-meta", {8: (k_state, v_state), "layer_structure": [2, 2, 1]}, "layer_structure")
    return files


BAD_FILE_NAMES = [
    "truncated-zip",
    "truncated-legacy",
    "empty",
    "garbage",
    "missing",
    "tensor",
    "no-widths",
    "kv-mismatch",
    "zero-width",
    "negative-width",
    "float-width",
    "tensor-width",
    "bool-width",
    "not-a-pair",
    "unknown-activation",
    "structure-mismatch",
    "layer-norm-mismatch",
    "width-mismatch",
    "bad-structure-meta",
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    files = _bad_files(tmp_path_factory.mktemp("bad"))
    assert sorted(files) == sorted(BAD_FILE_NAMES)
    return files


@pytest.mark.parametrize("name", BAD_FILE_NAMES)
def test_bad_file_is_a_clear_error(bad_files: dict, name: str) -> None:
    path, phrase = bad_files[name]
    with pytest.raises(HypernetworkFileError) as info:
        load_hypernetwork(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert phrase in message, message


@pytest.mark.parametrize(
    "name",
    [
        "truncated-zip",
        "empty",
        "tensor",
        "kv-mismatch",
        "tensor-width",
        "unknown-activation",
        "structure-mismatch",
        "missing",
    ],
)
def test_cli_inspect_reports_bad_file_without_traceback(
    bad_files: dict, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from hyperlit import cli

    path, phrase = bad_files[name]
    assert cli.main(["inspect", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("hyperlit inspect: error: ")
    assert str(path) in captured.err and phrase in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert captured.out == ""


# --- atomic write ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_failed_write_leaves_existing_file_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    target = tmp_path / f"net{suffix}"
    save_hypernetwork(randomised(HypernetworkConfig(), sizes=[8], seed=1), target)
    before = target.read_bytes()

    def half_written(_obj: object, path: object, *args: object, **kwargs: object) -> None:
        Path(path).write_bytes(b"partial bytes")
        raise OSError("disk full")

    if suffix == ".pt":
        monkeypatch.setattr(a1111, "save_a1111_zip", half_written)
    else:
        monkeypatch.setattr(
            safetensors_codec, "save_file", lambda tensors, path, metadata=None: half_written(None, path)
        )
    with pytest.raises(OSError, match="disk full"):
        save_hypernetwork(randomised(HypernetworkConfig(), sizes=[8], seed=2), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


# --- .pt.optim ---------------------------------------------------------------------------------------------


def _optimizer_after_one_step(hn: Hypernetwork, x_width: int) -> torch.optim.AdamW:
    optimizer = torch.optim.AdamW(hn.parameters(), lr=1e-3)
    hn.train()
    for parameter in hn.parameters():  # every parameter gets optimizer state; untouched ones keep exp_avg 0
        parameter.grad = torch.zeros_like(parameter)
    k, _ = hn.forward_kv(torch.randn(4, x_width))
    k.square().sum().backward()  # gradients reach only the K module of that width
    optimizer.step()
    return optimizer


def test_optim_file_hash_name_and_parameter_order(tmp_path: Path) -> None:
    config = HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", layer_norm=True)
    hn = randomised(config, sizes=[12, 8])
    optimizer = _optimizer_after_one_step(hn, 12)
    path = save_hypernetwork(hn, tmp_path / "opt.pt", optimizer_state=optimizer.state_dict(), optimizer_name="AdamW")
    optim_file = tmp_path / "opt.pt.optim"
    assert optim_file.is_file()
    payload = torch.load(optim_file, weights_only=True)
    assert payload["optimizer_name"] == "AdamW"
    assert payload["hash"] == hashlib.sha256(path.read_bytes()).hexdigest()[:10]

    # A1111's .optim order: per size in insertion order, K params then V params, each Linear/LayerNorm weight, bias.
    expected_shapes = []
    for d in (12, 8):
        for _path in ("K", "V"):
            expected_shapes += [(2 * d, d), (2 * d,), (2 * d,), (2 * d,), (d, 2 * d), (d,), (d,), (d,)]
    state = payload["optimizer_state_dict"]["state"]
    assert sorted(state) == list(range(len(expected_shapes)))
    assert [tuple(state[i]["exp_avg"].shape) for i in range(len(expected_shapes))] == expected_shapes
    # Only width 12's K module had gradients: it is the first block of 8 entries.
    touched = [bool(state[i]["exp_avg"].abs().sum() > 0) for i in range(len(expected_shapes))]
    assert touched[:8] == [True] * 8 and not any(touched[8:])

    name, loaded_state = a1111.read_optim(path)
    assert name == "AdamW"
    for i in range(len(expected_shapes)):
        assert torch.equal(loaded_state["state"][i]["exp_avg"], state[i]["exp_avg"])
    # It resumes an optimizer over the loaded network's parameters.
    fresh = torch.optim.AdamW(load_hypernetwork(path).parameters(), lr=1e-3)
    fresh.load_state_dict(loaded_state)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg_sq"], state[0]["exp_avg_sq"])


def test_optim_file_ignored_when_pt_changed(tmp_path: Path) -> None:
    hn = randomised(HypernetworkConfig(), sizes=[8])
    optimizer = _optimizer_after_one_step(hn, 8)
    path = save_hypernetwork(hn, tmp_path / "opt.pt", optimizer_state=optimizer.state_dict(), optimizer_name="SGD")
    assert a1111.read_optim(path)[0] == "SGD"
    hn.step = 1  # a different .pt, the old .optim stays beside it
    write_file(path, to_file_content(hn))
    assert (tmp_path / "opt.pt.optim").is_file()
    assert a1111.read_optim(path) is None
    assert a1111.read_optim(tmp_path / "never-written.pt") is None


def test_no_optim_file_without_state_or_for_safetensors(tmp_path: Path) -> None:
    hn = randomised(HypernetworkConfig(), sizes=[8])
    save_hypernetwork(hn, tmp_path / "plain.pt")
    save_hypernetwork(hn, tmp_path / "plain.safetensors", optimizer_state={"state": {}, "param_groups": []})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.pt", "plain.safetensors"]
