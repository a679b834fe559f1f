"""Audit (issue 14, mutmut survivors of hyperlit.files): edges of the .pt reader, the .pt.optim companion, the
.safetensors writer, strip_dropout and the torch-file reader.

Files are built by hand (raw dicts saved with torch.save, bytes edited where a device tag must change); expected
values are the A1111 rules written out, never hyperlit's own reader.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from helpers import a1111_reference as ref
from helpers.hypernetworks import randomised
from safetensors.torch import load_file

from hyperlit.files import (
    HypernetworkFileError,
    a1111,
    load_hypernetwork,
    read_file,
    save_hypernetwork,
    strip_dropout,
    to_file_content,
    write_file,
)
from hyperlit.files.torch_file import load_torch_file
from hyperlit.hypernetwork import ACTIVATIONS, Hypernetwork, HypernetworkConfig


def kohya_pair(width: int, seed: int = 0) -> list[OrderedDict]:
    keys = ref.linear_keys(0, width, 2 * width) + ref.linear_keys(1, 2 * width, width)
    return [ref.random_state(keys, seed), ref.random_state(keys, seed + 1)]


def saved(tmp_path: Path, raw: object, name: str = "hn.pt") -> Path:
    path = tmp_path / name
    torch.save(raw, path)
    return path


def refusal(path: Path) -> str:
    with pytest.raises(HypernetworkFileError) as info:
        load_hypernetwork(path)
    return str(info.value)


# --- the .pt reader -------------------------------------------------------------------------------------


def test_pt_refusals_name_the_file_and_the_problem(tmp_path: Path) -> None:
    pair = kohya_pair(8)
    cases = {
        "list.pt": ([1, 2], "not a hypernetwork file: the top-level object is a list, not a dict"),
        "float-key.pt": ({1.5: pair}, "top-level key 1.5 (float) is neither a width nor a metadata name"),
        "twice.pt": ({8: pair, "8": pair}, "width 8 appears twice (as '8')"),
        "holds.pt": ({8: "weights"}, "width 8 holds str; expected a (K, V) pair of state dicts"),
        "k.pt": ({8: ["k", pair[1]]}, "width 8 K entry is not a state dict of tensors"),
        "v.pt": ({8: [pair[0], {"linear.0.weight": [1.0, 2.0]}]}, "width 8 V entry is not a state dict of tensors"),
        "activation.pt": ({8: pair, "activation_func": "swishy"},
                          f"activation_func 'swishy' is not supported; allowed: {', '.join(sorted(ACTIVATIONS))}"),
    }  # fmt: skip
    for name, (raw, message) in cases.items():
        path = saved(tmp_path, raw, name)
        assert refusal(path) == f"{path}: {message}"
    differ = {8: [pair[0], OrderedDict(list(pair[1].items())[:2])]}
    path = saved(tmp_path, differ, "differ.pt")
    assert refusal(path).endswith("; they must have the same keys and shapes")


def test_width_one_metadata_first_and_extra_entries_after_k_and_v(tmp_path: Path) -> None:
    pair = kohya_pair(1)
    raw = {"name": "first", 1: [*pair, {"ignored": torch.zeros(1)}]}  # metadata before the widths
    hn = load_hypernetwork(saved(tmp_path, raw))
    assert hn.sizes == [1] and hn.name == "first"
    assert torch.equal(hn.pairs["1"][0].linear[0].weight, pair[0]["linear.0.weight"])
    assert torch.equal(hn.pairs["1"][1].linear[1].bias, pair[1]["linear.1.bias"])


def test_a_layer_norm_weight_stored_first_is_not_taken_for_the_first_linear(tmp_path: Path) -> None:
    # LayerNorm weights are 1-D "*.weight" keys: the width check must use the first 2-D one
    raw = ref.current_file(widths=(8,))
    raw[8] = tuple(OrderedDict([("linear.2.weight", s["linear.2.weight"]), *s.items()]) for s in raw[8])
    path = saved(tmp_path, raw)
    pairs = ref.a1111_load(path)
    hn = load_hypernetwork(path)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hn.forward_kv(x)[0], ref.apply_pairs(pairs, x)[0])


def test_empty_state_dicts_are_refused_as_not_fitting(tmp_path: Path) -> None:
    path = saved(tmp_path, {8: [{}, {}]})
    message = refusal(path)
    assert message.startswith(f"{path}: width 8 K module does not fit the structure [1, 2, 1]"), message


def test_a_novelai_width_anywhere_marks_the_file_novelai(tmp_path: Path) -> None:
    raw = {**ref.novelai_file(widths=(8,)), **ref.kohya_file(widths=(12,))}  # the NovelAI width comes first
    assert a1111.read_pt(saved(tmp_path, raw)).layout == a1111.LAYOUT_NOVELAI


def test_missing_metadata_takes_a1111_defaults(tmp_path: Path) -> None:
    pair = kohya_pair(8)
    only_structure = a1111.parse("s.pt", {12: kohya_pair(12), 8: pair, "layer_structure": [1, 2, 2, 1]})
    assert only_structure.config.dropout_structure is None  # use_dropout missing means False
    assert only_structure.config.sizes == [8, 12]
    assert only_structure.layout == a1111.LAYOUT_OCT_2022
    assert only_structure.config.weight_init == "Normal"
    # use_dropout without last_layer_dropout: Dropout(0.3) after every hidden Linear but the last
    derived = a1111.parse("d.pt", {8: pair, "layer_structure": [1, 2, 2, 1], "use_dropout": True})
    assert derived.config.dropout_structure == [0.0, 0.3, 0.0, 0.0]
    assert a1111.parse("a.pt", {8: pair, "activation_func": "relu"}).layout == a1111.LAYOUT_OCT_2022
    zeros = a1111.parse("z.pt", {8: pair, "dropout_structure": [0, 0, 0]})
    assert zeros.config.dropout_structure is None and zeros.layout == a1111.LAYOUT_CURRENT
    unknown = a1111.parse("u.pt", {8: pair, "weight_initialization": "Orthogonal", "custom": "kept"})
    assert unknown.config.weight_init == "Normal"  # A1111 falls back to Normal for unknown names
    assert unknown.extra == {"custom": "kept"}
    assert a1111.parse("n.pt", {8: pair}).extra == {}


@pytest.mark.parametrize(("step", "expected"), [(12, 12), (12.0, 12), ("12", 0), ("x", 0), (True, 0), (None, 0)])
def test_step_is_kept_only_when_it_is_a_number(step, expected) -> None:
    assert a1111.parse("s.pt", {8: kohya_pair(8), "step": step}).step == expected


def test_derive_dropout_structure_defaults_to_a1111s_1_2_1() -> None:
    assert a1111.derive_dropout_structure(None, True, True) == [0.0, 0.3, 0.0]
    assert a1111.derive_dropout_structure(None, True, False) == [0.0, 0.0, 0.0]


# --- .pt.optim --------------------------------------------------------------------------------------------


def test_optim_file_defaults_and_its_legacy_serialization(tmp_path: Path) -> None:
    hn = randomised(HypernetworkConfig(), sizes=[8])
    path = save_hypernetwork(hn, tmp_path / "opt.pt")
    state = {"state": {}, "param_groups": [{"lr": 0.1, "params": []}]}
    target = a1111.write_optim(path, state)
    assert target == tmp_path / "opt.pt.optim"
    assert not zipfile.is_zipfile(target)  # torch's legacy format: no zip `byteorder` member for old A1111 to refuse
    payload = torch.load(target, weights_only=True)
    assert payload["optimizer_name"] == "AdamW"
    assert a1111.read_optim(path) == ("AdamW", state)
    # an .optim written without a name (older A1111) reads as AdamW
    torch.save({"hash": payload["hash"], "optimizer_state_dict": state}, target)
    assert a1111.read_optim(path) == ("AdamW", state)


def test_ignored_optim_files_are_named_in_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = save_hypernetwork(randomised(HypernetworkConfig(), sizes=[8]), tmp_path / "opt.pt")
    target = tmp_path / "opt.pt.optim"
    right_hash = a1111.sha256_prefix(path)
    cases = [
        (b"not a torch file", f"ignored, not a readable optimizer state: {target} is not a readable torch file"),
        ({"hash": right_hash}, f"{target}: ignored, it holds no optimizer_state_dict"),
        ({"hash": "0" * 10, "optimizer_state_dict": {}},
         f"{target}: ignored, it was saved for another version of opt.pt (hash differs)"),
    ]  # fmt: skip
    for content, message in cases:
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            torch.save(content, target)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hyperlit.files.a1111"):
            assert a1111.read_optim(path) is None
        assert [r.getMessage() for r in caplog.records][0].startswith(message)


def test_sha256_prefix_of_a_file_larger_than_one_block(tmp_path: Path) -> None:
    import hashlib

    data = bytes(range(256)) * 9000  # 2.3 MB: three 1 MiB blocks
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert a1111.sha256_prefix(path) == hashlib.sha256(data).hexdigest()[:10]
    assert a1111.sha256_prefix(path, length=16) == hashlib.sha256(data).hexdigest()[:16]


# --- .safetensors ---------------------------------------------------------------------------------------


def test_safetensors_stores_fp32_and_round_trips_empty_and_set_metadata(tmp_path: Path) -> None:
    hn = randomised(HypernetworkConfig(), sizes=[8]).to(torch.bfloat16)
    content = to_file_content(hn)
    for states in content.layers.values():  # a content holding bf16 tensors, as a bf16 training run has
        for state in states:
            for key in state:
                state[key] = state[key].to(torch.bfloat16)
    path = write_file(tmp_path / "plain.safetensors", content)
    assert {t.dtype for t in load_file(path).values()} == {torch.float32}
    back = read_file(path)
    assert (back.sd_checkpoint, back.sd_checkpoint_name, back.optional_info) == (None, None, None)

    content.sd_checkpoint, content.sd_checkpoint_name, content.optional_info = "abc123", "sd15", "made by hand"
    back = read_file(write_file(tmp_path / "set.safetensors", content))
    assert (back.sd_checkpoint, back.sd_checkpoint_name, back.optional_info) == ("abc123", "sd15", "made by hand")


# --- strip_dropout --------------------------------------------------------------------------------------


def test_strip_dropout_keeps_the_width_order_and_names_its_input(tmp_path: Path) -> None:
    config = HypernetworkConfig(layer_structure=[1, 2, 2, 1], dropout_structure=[0, 0.3, 0.3, 0])
    hn = randomised(config, sizes=[12, 8])
    content = to_file_content(hn)
    content.config.sizes = [8, 12]  # as a .pt reads: sorted, while the layers keep the file's order
    stripped = strip_dropout(content)
    assert list(stripped.layers) == [12, 8] and stripped.config.sizes == [12, 8]
    assert stripped.config.dropout_structure is None
    broken = to_file_content(hn)
    del broken.layers[8][1]["linear.0.bias"]
    with pytest.raises(HypernetworkFileError) as info:
        strip_dropout(broken)
    assert str(info.value).startswith("input: width 8 V module does not fit the structure")


# --- the torch-file reader ------------------------------------------------------------------------------


def test_a_file_saved_on_a_gpu_loads_on_the_cpu(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(3.0)}, buffer)
    path = tmp_path / "gpu.pt"
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):  # the storage's location tag, as a CUDA save writes it
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            dst.writestr(info, data)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)  # the file really is tagged for a GPU
    loaded = load_torch_file(path)
    assert loaded["w"].device.type == "cpu" and torch.equal(loaded["w"], torch.arange(3.0))


def test_hypernetwork_loaded_from_a_pt_is_the_file_content(tmp_path: Path) -> None:
    hn = randomised(HypernetworkConfig(), sizes=[8], name="x")
    loaded = load_hypernetwork(save_hypernetwork(hn, tmp_path / "named.pt"))
    assert isinstance(loaded, Hypernetwork) and loaded.name == "named" and not loaded.training


def test_pt_stores_fp32_and_keeps_optional_info(tmp_path: Path) -> None:
    content = to_file_content(randomised(HypernetworkConfig(), sizes=[8]))
    for states in content.layers.values():
        for state in states:
            for key in state:
                state[key] = state[key].to(torch.bfloat16)
    content.optional_info = "made by hand"
    path = write_file(tmp_path / "bf16.pt", content)
    raw = torch.load(path, weights_only=True)
    assert {t.dtype for t in raw[8][0].values()} | {t.dtype for t in raw[8][1].values()} == {torch.float32}
    assert raw["optional_info"] == "made by hand" and a1111.read_pt(path).optional_info == "made by hand"


# --- the torch-file reader's messages -------------------------------------------------------------------


def test_refused_code_message_in_full(tmp_path: Path) -> None:
    import builtins

    class Code:
        def __reduce__(self) -> tuple:
            return (builtins.exec, ("x = 1",))

    path = tmp_path / "code.ckpt"
    torch.save({"w": torch.ones(1), "code": Code()}, path)
    with pytest.raises(ValueError) as info:
        load_torch_file(path, label="model.path=code.ckpt")
    pattern = (
        r"model\.path=code\.ckpt holds pickled objects beyond tensors \((builtins\.)?exec\): code or objects that "
        r"weights_only loading does not allow; the file was refused, nothing in it ran"
    )
    assert re.fullmatch(pattern, str(info.value)), str(info.value)


def test_other_load_errors_are_summarised_on_one_line_without_unsafe_advice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "odd.pt"
    path.write_bytes(b"something")
    errors = {
        "bad  header\n" + "x" * 300: "f.pt is not a readable torch file (truncated, corrupt or another format): "
        "RuntimeError: bad header " + "x" * 189,  # whitespace collapsed, 200 characters kept
        "retry with weights_only=False": "f.pt is not a readable torch file (truncated, corrupt or another format)",
    }
    for text, message in errors.items():

        def fail(*args, text=text, **kwargs):
            raise RuntimeError(text)

        monkeypatch.setattr(torch, "load", fail)
        with pytest.raises(ValueError) as info:
            load_torch_file(path, label="f.pt")
        assert str(info.value) == message


# --- .safetensors: hand-made files ------------------------------------------------------------------------


def crafted(tmp_path: Path, filename: str, tensors: dict | None = None, **metadata: str | None) -> Path:
    """A .safetensors with a real file's tensors and metadata, then `tensors` added and `metadata` changed
    (None removes a key)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = save_hypernetwork(randomised(HypernetworkConfig(), sizes=[8, 12]), tmp_path / "good.safetensors")
    with safe_open(str(good), "pt") as handle:
        meta = dict(handle.metadata())
    all_tensors = {**load_file(good), **(tensors or {})}
    for key, value in metadata.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path = tmp_path / filename
    save_file(all_tensors, str(path), metadata=meta)
    return path


def test_safetensors_refusals_name_the_file_and_the_problem(tmp_path: Path) -> None:
    import json

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(HypernetworkFileError) as info:
        read_file(missing)
    assert str(info.value) == f"{missing}: no such file"
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(HypernetworkFileError) as info:
        read_file(junk)
    assert str(info.value).startswith(f"{junk}: not a readable safetensors file: ")

    cases = {
        "format.safetensors": ({}, {"format": "other"},
                               "not a hyperlit hypernetwork (metadata 'format' is 'other', expected "
                               "'hyperlit-hypernetwork')"),
        "config.safetensors": ({}, {"config": "{\"activation\": \"swishy\"}"},
                               "the 'config' metadata is not valid: hypernet.activation: 'swishy' is not supported"),
        "sizes.safetensors": ({}, {"config": json.dumps({"sizes": [8, 16]})},
                              "config sizes [8, 16] do not match the stored widths [8, 12]"),
        "path.safetensors": ({"8.2.linear.0.weight": torch.zeros(1)}, {},
                             "tensor '8.2.linear.0.weight' is not '<width>.<0|1>.<key>'"),
        "width.safetensors": ({"x.0.linear.0.weight": torch.zeros(1)}, {},
                              "tensor 'x.0.linear.0.weight' is not '<width>.<0|1>.<key>'"),
    }  # fmt: skip
    for name, (tensors, metadata, message) in cases.items():
        path = crafted(tmp_path, name, tensors, **metadata)
        with pytest.raises(HypernetworkFileError) as info:
            read_file(path)
        assert str(info.value).startswith(f"{path}: {message}"), str(info.value)


def test_safetensors_with_unexpected_tensor_names_is_refused_cleanly(tmp_path: Path) -> None:
    # keys that are not linear.<n>.weight|bias reach the strict load and are named there, not a crash before
    for name, extra in (("short.safetensors", "8.0.extra"), ("odd.safetensors", "8.0.linear.0.extra")):
        path = crafted(tmp_path, name, {extra: torch.zeros(1)})
        message = refusal(path)
        assert message.startswith(f"{path}: width 8 K module does not fit the structure"), message
        assert "Unexpected key(s)" in message


def test_safetensors_metadata_defaults(tmp_path: Path) -> None:
    import json

    auto = crafted(tmp_path, "auto.safetensors", config=json.dumps({"sizes": "auto"}))
    assert list(read_file(auto).layers) == [8, 12]  # no width order stored: sorted
    bare = crafted(tmp_path, "bare.safetensors", name=None, step=None)
    content = read_file(bare)
    assert (content.name, content.step) == ("bare", 0)
    odd_step = crafted(tmp_path, "odd.safetensors", name="stored", step="x")
    content = read_file(odd_step)
    assert (content.name, content.step) == ("stored", 0)
    assert read_file(crafted(tmp_path, "step.safetensors", step="42")).step == 42


def test_the_weights_only_protection_holds_when_the_environment_asks_to_drop_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    marker = tmp_path / "ran"

    class WritesMarker:
        def __reduce__(self) -> tuple:
            return (builtins.exec, (f"open({str(marker)!r}, 'w').write('x')",))

    path = tmp_path / "code.ckpt"
    torch.save({"w": torch.ones(1), "code": WritesMarker()}, path)
    # torch's switch for loads that do not pass weights_only explicitly; ours always does
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError, match="refused"):
        load_torch_file(path)
    assert not marker.exists()


# --- file names, conversion to and from a Hypernetwork ------------------------------------------------------


def test_unknown_extensions_are_refused_naming_the_allowed_ones(tmp_path: Path) -> None:
    for name, shown in (("hn.bin", "'.bin'"), ("hn", "'(none)'")):
        with pytest.raises(HypernetworkFileError) as info:
            read_file(tmp_path / name)
        assert str(info.value) == (
            f"{tmp_path / name}: extension {shown} is not a hypernetwork format; allowed: .pt, .safetensors"
        )


def test_file_content_carries_the_networks_metadata_and_width_order(tmp_path: Path) -> None:
    hn = randomised(HypernetworkConfig(), sizes=[12, 8], name="style")
    hn.optional_info, hn.step = "notes", 40
    content = to_file_content(hn)
    assert (content.name, content.optional_info, content.step) == ("style", "notes", 40)
    assert content.config.sizes == [12, 8] and list(content.layers) == [12, 8]
    assert hn.config.sizes == "auto"  # the network's own config is not changed
    stored = read_file(write_file(tmp_path / "file.safetensors", content, name="given"))
    assert stored.name == "given"
    state = {"state": {}, "param_groups": [{"lr": 0.1, "params": []}]}
    path = save_hypernetwork(hn, tmp_path / "opt.pt", optimizer_state=state)
    assert a1111.read_optim(path) == ("AdamW", state)


# --- the .pt zip container --------------------------------------------------------------------------------


def local_extra(data: bytes, member: zipfile.ZipInfo) -> tuple[bytes, int]:
    """(extra field of the member's local header, offset where its bytes start): the header is 30 bytes, then the
    name and the extra field."""
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
    start = member.header_offset + 30 + name_length
    return data[start : start + extra_length], start + extra_length


def test_pt_members_have_fixed_dates_and_tensor_data_aligned_like_torch(tmp_path: Path) -> None:
    reference = io.BytesIO()
    torch.save({"w": torch.ones(3)}, reference)
    with zipfile.ZipFile(reference) as archive:  # torch's own padding field: id "FB", size, "Z" bytes
        tensor_member = next(i for i in archive.infolist() if "/data/" in i.filename)
    torch_extra, torch_start = local_extra(reference.getvalue(), tensor_member)
    assert torch_extra[:2] == b"FB" and set(torch_extra[4:]) == {ord("Z")} and torch_start % 64 == 0

    path = save_hypernetwork(randomised(HypernetworkConfig(), sizes=[8, 12]), tmp_path / "hn.pt")
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
    assert sum("/data/" in m.filename for m in members) == 16  # 2 widths x (K, V) x 2 Linears x (weight, bias)
    for member in members:
        assert member.date_time == (1980, 1, 1, 0, 0, 0)  # the zip epoch: same content, same bytes
        extra, start = local_extra(data, member)
        assert start % 64 == 0, member.filename  # mmap maps the tensors in place
        assert extra[:2] == b"FB" and int.from_bytes(extra[2:4], "little") == len(extra) - 4
        assert set(extra[4:]) <= {ord("Z")}
