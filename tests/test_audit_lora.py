"""hyperlit.lora, part by part, against references computed another way (issue 31, round two).

No base model loads here: the fits run on synthetic moments and a small diffusers `Attention`, the files are written
from hand-made fits, the command runs with its model-dependent steps replaced by stand-ins. The end-to-end checks
(diffusers reading the files, the LoRA reproducing the hypernetwork) are in tests/test_lora.py.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from hyperlit import cli
from hyperlit.lora import command, tagged
from hyperlit.lora.command import ToLoraOptions, ToLoraResult, format_report
from hyperlit.lora.convert import Conversion, key_style, touched_layers, write_conversion
from hyperlit.lora.export import KeyStyle, lora_state_dict, write_lora
from hyperlit.lora.fit import FitSettings, LayerFit, LayerReport, ProjectionLoRA, fit_layer, stream_of
from hyperlit.lora.inputs import TEXT, HeldOut, LayerInputs, Moments
from hyperlit.lora.keys import diffusers_key, kohya_name, sgm_path
from hyperlit.lora.tagged import TaggedLora, addnet_hash, check_tagged_loras, lora_hashes, loras_applied, short_hash
from hyperlit.models import FAMILIES
from hyperlit.prompt_tags import LoraTag

TINY = FAMILIES["tiny"]


# --- the text table of `hyperlit to-lora`


def layer_report(name: str, **changes: object) -> LayerReport:
    values = dict(
        name=name,
        kind="self",
        width=32,
        full_rank=32,
        rank_k=3,
        rank_v=2,
        energy_k=0.99916,
        energy_v=0.5,
        error_k=0.000123,
        error_v=12345.0,
        effect_error_k=0.1,
        effect_error_v=0.2,
    )
    values.update(changes)
    return LayerReport(**values)


def column(text: str, width: int, right: bool) -> str:
    """`text` padded with spaces to `width` characters, on the left when `right` aligned."""
    pad = " " * max(0, width - len(text))
    return pad + text if right else text + pad


def test_report_table_is_the_documented_columns_then_the_bad_fits_then_the_sizes():
    reports = [
        layer_report("down_blocks.0.attentions.0.transformer_blocks.0.attn1"),
        layer_report(
            "mid.attn2",
            kind="cross",
            width=48,
            rank_k=12,
            rank_v=0,
            energy_k=1.0,
            energy_v=0.25,
            error_k=0.5,
            error_v=0.0,
            effect_error_k=0.2501,
            effect_error_v=0.0,
        ),
        layer_report("up.attn1", effect_error_k=0.25, effect_error_v=0.26),
    ]
    result = ToLoraResult(Path("out") / "x.safetensors", reports, size=1234567, source_size=89)
    lines = format_report(result).split("\n")
    header = " ".join(
        [
            column("layer", 58, False),
            column("kind", 5, False),
            column("width", 5, True),
            column("rank k/v", 9, True),
            column("energy k/v", 13, True),
            column("err k/v", 15, True),
            column("effect err k/v", 15, True),
        ]
    )
    first = " ".join(
        [
            column(reports[0].name, 58, False),
            "self ",
            "   32",
            column("3/2", 9, True),
            column("0.9992/0.5000", 13, True),
            column("1.2e-04/1.2e+04", 15, True),
            column("0.10/0.20", 15, True),
        ]
    )
    second = " ".join(
        [
            column("mid.attn2", 58, False),
            "cross",
            "   48",
            column("12/0", 9, True),
            column("1.0000/0.2500", 13, True),
            column("5.0e-01/0.0e+00", 15, True),
            column("0.25/0.00", 15, True),
        ]
    )
    assert lines[0] == header and lines[1] == first and lines[2] == second
    assert lines[3].startswith("up.attn1 ") and lines[3].endswith("0.25/0.26")
    # 0.2501 and 0.26 are above a quarter of the change, 0.25 itself is not
    assert lines[4] == (
        "warning: 2 layer(s) fit badly (held-out error above 25% of the hypernetwork's change): mid.attn2, up.attn1; "
        "a higher --rank / --energy or more --data may help"
    )
    assert lines[5] == f"wrote {Path('out') / 'x.safetensors'} (1,234,567 bytes; the hypernetwork file is 89 bytes)"
    assert len(lines) == 6


def test_a_report_without_bad_fits_has_no_warning():
    result = ToLoraResult(Path("l.safetensors"), [layer_report("a", effect_error_k=0.25, effect_error_v=0.25)], 10, 2)
    lines = format_report(result).split("\n")
    assert len(lines) == 3 and lines[2] == "wrote l.safetensors (10 bytes; the hypernetwork file is 2 bytes)"


@pytest.mark.parametrize(("k", "v", "bad"), [(0.25, 0.25, False), (0.2500001, 0.0, True), (0.0, 0.2500001, True)])
def test_a_layer_fits_badly_when_either_effect_error_is_above_a_quarter(k, v, bad):
    assert layer_report("a", effect_error_k=k, effect_error_v=v).fits_badly is bad


# --- key names


def sgm_blocks(levels: int, layers_per_block: int) -> dict[str, str]:
    """diffusers attention block -> sgm block, by walking Stability's block lists in order."""
    table: dict[str, str] = {}
    index = 0  # input_blocks.0 is conv_in
    for level in range(levels):
        for j in range(layers_per_block):
            index += 1
            table[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"
        index += 1  # the level's downsampler
    index = -1
    for level in range(levels):
        for j in range(layers_per_block + 1):
            index += 1
            table[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{index}.1"
    table["mid_block.attentions.0"] = "middle_block.1"
    return table


@pytest.mark.parametrize("layers_per_block", [1, 2, 3])
def test_sgm_paths_follow_stabilitys_block_numbering(layers_per_block):
    for diffusers_block, sgm_block in sgm_blocks(3, layers_per_block).items():
        inner = "transformer_blocks.1.attn2.to_v"
        assert sgm_path(f"{diffusers_block}.{inner}", layers_per_block) == f"{sgm_block}.{inner}"


def test_sdxl_names_as_kohya_writes_them():
    # Names from kohya's SDXL LoRA files (sgm layout), for diffusers' down_blocks.1 / up_blocks.0 / mid_block.
    assert kohya_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", True, 2) == (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k"
    )
    assert kohya_name("up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_out.0", True, 2) == (
        "lora_unet_output_blocks_2_1_transformer_blocks_9_attn2_to_out_0"
    )
    assert kohya_name("mid_block.attentions.0.transformer_blocks.0.attn1.to_v", True, 2) == (
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_v"
    )
    assert kohya_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", False, 2) == (
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"
    )
    assert diffusers_key("mid_block.attentions.0.x") == "unet.mid_block.attentions.0.x"


@pytest.mark.parametrize(
    "path", ["conv_in", "down_blocks.0.resnets.0.conv1", "mid_block.attentions.1.x", "xdown_blocks.0.attentions.0.a"]
)
def test_a_path_outside_the_attention_blocks_is_refused_by_name(path):
    with pytest.raises(ValueError, match=rf"^{path}: not an attention-block module path of a diffusers UNet$"):
        sgm_path(path, 2)


# --- the file's tensors


def projection(out: int, inner: int, rank: int, seed: int) -> ProjectionLoRA:
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(out, rank, generator=g, dtype=torch.float64)
    down = torch.randn(inner, rank, generator=g, dtype=torch.float64).T  # a transposed view: not contiguous
    return ProjectionLoRA(up, down)


def two_fits(with_bias: bool = True) -> list[LayerFit]:
    """Layer a: K rank 2, V rank 3, an out bias; layer b: K none, V rank 1, no bias."""
    bias = torch.arange(6, dtype=torch.float64) + 0.5 if with_bias else None
    return [
        LayerFit(
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
            projection(6, 5, 2, 1),
            projection(6, 5, 3, 2),
            bias,
            layer_report("a"),
            to_out_in=6,
        ),
        LayerFit(
            "mid_block.attentions.0.transformer_blocks.0.attn2",
            None,
            projection(4, 7, 1, 3),
            None,
            layer_report("b"),
            to_out_in=4,
        ),
    ]


def test_kohya_tensors_scale_by_one_alpha_so_that_each_change_is_exact():
    fits = two_fits()
    tensors = lora_state_dict(fits, KeyStyle("kohya"), torch.float64)
    a = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_"
    b = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_"
    expected = {f"{a}{p}.{t}" for p in ("to_k", "to_v") for t in ("lora_down.weight", "lora_up.weight", "alpha")}
    expected |= {f"{b}to_v.{t}" for t in ("lora_down.weight", "lora_up.weight", "alpha")} | {f"{a}to_out_0.diff_b"}
    assert set(tensors) == expected
    for prefix, lora in ((f"{a}to_k", fits[0].k), (f"{a}to_v", fits[0].v), (f"{b}to_v", fits[1].v)):
        alpha = tensors[f"{prefix}.alpha"]
        assert alpha.shape == () and float(alpha) == 3.0  # the largest rank, for every module
        down, up = tensors[f"{prefix}.lora_down.weight"], tensors[f"{prefix}.lora_up.weight"]
        assert torch.equal(down, lora.down)
        # what A1111, ComfyUI and diffusers apply: (alpha / rank) up @ down
        assert torch.allclose(float(alpha) / down.shape[0] * (up @ down), lora.delta(), rtol=1e-12, atol=1e-12)
    assert torch.equal(tensors[f"{a}to_out_0.diff_b"], fits[0].out_bias)


def test_sdxl_kohya_tensors_use_sgm_names():
    fits = two_fits()
    tensors = lora_state_dict(fits, KeyStyle("kohya", sgm=True, layers_per_block=1), torch.float64)
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_k.alpha" in tensors
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_out_0.diff_b" in tensors
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v.lora_up.weight" in tensors


def test_diffusers_tensors_carry_the_bias_as_a_zero_rank_one_lora_and_zero_biases_elsewhere():
    fits = two_fits()
    tensors = lora_state_dict(fits, KeyStyle("diffusers", sgm=True), torch.float64)
    a = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1."
    b = "unet.mid_block.attentions.0.transformer_blocks.0.attn2."
    expected = {f"{a}{p}.lora_{t}" for p in ("to_k", "to_v", "to_out.0") for t in ("A.weight", "B.weight", "B.bias")}
    expected |= {f"{b}to_v.lora_{t}" for t in ("A.weight", "B.weight", "B.bias")}
    assert set(tensors) == expected
    for key, lora in ((f"{a}to_k", fits[0].k), (f"{a}to_v", fits[0].v), (f"{b}to_v", fits[1].v)):
        assert torch.equal(tensors[f"{key}.lora_A.weight"], lora.down)
        assert torch.equal(tensors[f"{key}.lora_B.weight"], lora.up)
        assert torch.equal(tensors[f"{key}.lora_B.bias"], torch.zeros(lora.up.shape[0], dtype=torch.float64))
    assert torch.equal(tensors[f"{a}to_out.0.lora_A.weight"], torch.zeros(1, 6, dtype=torch.float64))
    assert torch.equal(tensors[f"{a}to_out.0.lora_B.weight"], torch.zeros(6, 1, dtype=torch.float64))
    assert torch.equal(tensors[f"{a}to_out.0.lora_B.bias"], fits[0].out_bias)


def test_diffusers_tensors_without_any_bias_have_no_bias_keys_and_take_the_dtype():
    tensors = lora_state_dict(two_fits(with_bias=False), KeyStyle("diffusers"), torch.float16)
    assert len(tensors) == 6 and not any("bias" in k for k in tensors)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    kohya = lora_state_dict(two_fits(), KeyStyle("kohya"), torch.float16)
    assert {t.dtype for t in kohya.values()} == {torch.float16}


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_files_of_both_layouts_write_from_non_contiguous_fits_and_read_back_equal(tmp_path, fmt):
    fits = two_fits()
    tensors = lora_state_dict(fits, KeyStyle(fmt), torch.float64)
    path = write_lora(tmp_path / "l.safetensors", tensors, {"a": "text", "b": True, "c": [1, 2.5], "d": None})
    back = load_file(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in back)
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"a": "text", "b": "true", "c": "[1, 2.5]", "d": "null"}
    assert [p.name for p in tmp_path.iterdir()] == ["l.safetensors"]  # no temporary file left


def test_a_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(Exception):  # noqa: B017, PT011 - safetensors' own error type for a tensor it cannot store
        write_lora(tmp_path / "l.safetensors", {"x": torch.ones(3, 4).T}, {})  # not contiguous: refused
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("fmt", "family", "extra"),
    [
        ("kohya", "sd15", {"ss_network_module": "networks.lora"}),
        ("kohya", "sd21", {"ss_network_module": "networks.lora", "ss_v2": "True"}),
        ("kohya", "sdxl", {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"}),
        ("diffusers", "sdxl", {"format": "pt", "ss_base_model_version": "sdxl_base_v1-0"}),
        ("diffusers", "tiny", {"format": "pt"}),
    ],
)
def test_conversion_file_metadata_holds_the_fit_report_and_what_clients_read(tmp_path, fmt, family, extra):
    fits = two_fits()
    meta = {"hyperlit_base_model_family": family, "hyperlit_rank": 3}
    path = write_conversion(tmp_path / "c.safetensors", Conversion(fits), KeyStyle(fmt), torch.float16, meta)
    with safe_open(str(path), "pt") as handle:
        stored = handle.metadata()
    report = json.loads(stored.pop("hyperlit_fit"))
    assert report == [{f: getattr(fit.report, f) for f in LayerReport.__dataclass_fields__} for fit in fits]
    assert stored == {"hyperlit_base_model_family": family, "hyperlit_rank": "3", **extra}
    assert {t.dtype for t in load_file(path).values()} == {torch.float16}


def test_key_style_names_sdxl_by_two_text_encoders_and_keeps_the_blocks_layers():
    def components(encoders: tuple[str, ...], per_block: int) -> SimpleNamespace:
        unet = SimpleNamespace(config=SimpleNamespace(layers_per_block=per_block))
        return SimpleNamespace(family=SimpleNamespace(text_encoders=encoders), unet=unet)

    assert key_style("kohya", components(("a", "b"), 3)) == KeyStyle("kohya", sgm=True, layers_per_block=3)
    assert key_style("diffusers", components(("a",), 1)) == KeyStyle("diffusers", sgm=False, layers_per_block=1)


# --- `hyperlit to-lora`: options, plan, run


def hn_file(tmp_path: Path, sizes: list[int], name: str = "hn.pt", step: int = 0) -> Path:
    from hyperlit import files
    from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig

    hn = Hypernetwork(HypernetworkConfig(layer_structure=[1, 2, 1], activation="linear"), sizes=sizes)
    hn.step = step
    return files.save_hypernetwork(hn, tmp_path / name)


@pytest.fixture
def hn_path(tmp_path: Path) -> Path:
    return hn_file(tmp_path, [32, 48, 64])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rank": True}, "--rank: True is not allowed; use an integer >= 1"),
        ({"rank": 2.0}, "--rank: 2.0 is not allowed; use an integer >= 1"),
        ({"rank": 0}, "--rank: 0 is not allowed; use an integer >= 1"),
        ({"energy": math.nan}, "--energy: nan is not allowed; use a number in (0, 1]"),
        ({"energy": math.inf}, "--energy: inf is not allowed; use a number in (0, 1]"),
        ({"energy": -0.5}, "--energy: -0.5 is not allowed; use a number in (0, 1]"),
        ({"energy": 1.0000001}, "--energy: 1.0000001 is not allowed; use a number in (0, 1]"),
        ({"format": "Kohya"}, "--format: 'Kohya' is not allowed; allowed: kohya, diffusers"),
        ({"v_bias": "yes"}, "--v-bias: 'yes' is not allowed; allowed: auto, on, off"),
        ({"dtype": "bfloat16"}, "--dtype: 'bfloat16' is not allowed; allowed: float16, float32"),
        ({"out": "x.safetensors.pt"}, "OUT: 'x.safetensors.pt' is not allowed; LoRA files end in .safetensors"),
    ],
)
def test_each_refused_option_is_named_with_its_value_and_what_is_allowed(hn_path, changes, message):
    arguments = {"hypernetwork": hn_path, "out": "x.safetensors", **changes}
    with pytest.raises(ValueError) as caught:
        ToLoraOptions(**arguments)
    assert str(caught.value) == message


def test_missing_files_and_folders_are_named(tmp_path, hn_path):
    with pytest.raises(FileNotFoundError) as caught:
        ToLoraOptions(tmp_path / "none.pt", "x.safetensors")
    assert str(caught.value) == f"HN_FILE: {tmp_path / 'none.pt'} does not exist (a hypernetwork .pt/.safetensors)"
    with pytest.raises(FileNotFoundError) as caught:
        ToLoraOptions(hn_path, "x.safetensors", data=str(hn_path))
    assert str(caught.value) == f"--data: {hn_path} is not a folder (an A1111 folder of images + .txt)"


def test_accepted_edges_and_paths(tmp_path, hn_path):
    options = ToLoraOptions(str(hn_path), str(tmp_path / "X.SafeTensors"), data=str(tmp_path), rank=1)
    assert (options.hypernetwork, options.out, options.data) == (hn_path, tmp_path / "X.SafeTensors", tmp_path)
    for energy in (1.0, 1e-9):
        assert ToLoraOptions(hn_path, "x.safetensors", energy=energy).settings.energy == energy


@pytest.mark.parametrize(
    ("fmt", "v_bias", "kept"),
    [
        ("kohya", "auto", False),
        ("diffusers", "auto", True),
        ("kohya", "on", True),
        ("diffusers", "on", True),
        ("kohya", "off", False),
        ("diffusers", "off", False),
    ],
)
def test_v_bias_auto_is_on_for_diffusers_only(hn_path, fmt, v_bias, kept):
    assert ToLoraOptions(hn_path, "x.safetensors", format=fmt, v_bias=v_bias).settings.v_bias is kept


def test_fit_settings_take_the_rank_or_the_energy_or_the_default_energy(hn_path):
    assert ToLoraOptions(hn_path, "x.safetensors", rank=3).settings == FitSettings(rank=3, energy=None)
    assert ToLoraOptions(hn_path, "x.safetensors", energy=0.5).settings == FitSettings(rank=None, energy=0.5)
    assert ToLoraOptions(hn_path, "x.safetensors").settings == FitSettings(rank=None, energy=0.999)


@pytest.mark.parametrize(("sizes", "largest"), [([32], 32), ([48], 48), ([32, 48], 48), ([48, 64], 64)])
def test_the_largest_rank_allowed_is_the_largest_touched_layers_full_rank(tmp_path, sizes, largest):
    # tiny: self-attention widths 32 and 64, text context 48 (a cross layer of width 64 reading 48: rank <= 48)
    path = hn_file(tmp_path, sizes)
    the_plan = command.plan(ToLoraOptions(path, "x.safetensors", rank=largest))
    assert the_plan.settings == FitSettings(rank=largest, energy=None) and the_plan.spec.family.name == "tiny"
    assert the_plan.hypernetwork.sizes == sizes
    with pytest.raises(ValueError) as caught:
        command.plan(ToLoraOptions(path, "x.safetensors", rank=largest + 1))
    assert str(caught.value) == (
        f"--rank: {largest + 1} is larger than any layer's full rank on tiny for this network ({largest}); use at "
        f"most {largest}, or --energy 1 for full rank everywhere"
    )


def test_a_network_for_other_widths_is_refused_with_both_width_lists(tmp_path):
    path = hn_file(tmp_path, [768, 320])
    with pytest.raises(ValueError) as caught:
        command.plan(ToLoraOptions(path, "x.safetensors"))
    assert str(caught.value) == (
        f"--model tiny: {path} has modules for widths [768, 320], but tiny's attention layers read widths "
        "[32, 48, 64]; it was made for another model (set --model to its family)"
    )


def test_an_unreadable_network_is_an_hn_file_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"^HN_FILE: .*bad\.pt"):
        command.plan(ToLoraOptions(bad, "x.safetensors"))


def stand_in_components(checkpoint_hash: str | None, checkpoint_name: str | None) -> SimpleNamespace:
    unet = SimpleNamespace(config=SimpleNamespace(layers_per_block=2))
    return SimpleNamespace(family=TINY, unet=unet, checkpoint_hash=checkpoint_hash, checkpoint_name=checkpoint_name)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_run_fits_at_the_native_size_and_writes_the_documented_metadata(tmp_path, monkeypatch, fmt):
    source = hn_file(tmp_path, [32, 48], name="style.pt", step=1234)
    fits, calls = two_fits(), []

    def fake_convert(hn, components, data, settings, resolution):  # noqa: ANN001, ANN202
        calls.append((hn.sizes, components, data, settings, resolution))
        return Conversion(fits)

    monkeypatch.setattr("hyperlit.lora.convert.convert", fake_convert)
    components = stand_in_components(None, "base.safetensors")
    rank = 2 if fmt == "kohya" else None
    out = tmp_path / "out.safetensors"
    result = command.run(command.plan(ToLoraOptions(source, out, rank=rank, format=fmt)), components)
    assert calls == [
        (
            [32, 48],
            components,
            calls[0][2],
            FitSettings(rank=rank, energy=None if rank else 0.999, v_bias=fmt == "diffusers"),
            64,
        )
    ]
    assert calls[0][2].images == [] and calls[0][2].captions == []
    assert result == ToLoraResult(out, [fit.report for fit in fits], out.stat().st_size, source.stat().st_size)
    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    expected = {
        "hyperlit_source": "style.pt",
        "hyperlit_source_sha256": digest,
        "hyperlit_source_hash": digest[:10],
        "hyperlit_source_step": "1234",
        "hyperlit_base_model_family": "tiny",
        "hyperlit_base_model_hash": "",
        "hyperlit_base_model": "base.safetensors",
        "hyperlit_format": fmt,
        "hyperlit_v_bias": "true" if fmt == "diffusers" else "false",
        "hyperlit_rank": "2" if rank else "energy",
        "hyperlit_energy": "null" if rank else "0.999",
        "hyperlit_data": "",
    }
    assert {k: v for k, v in meta.items() if k.startswith("hyperlit_") and k != "hyperlit_fit"} == expected
    tensors = load_file(out)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert any(k.startswith("lora_unet_" if fmt == "kohya" else "unet.") for k in tensors)


def test_run_reads_the_data_folder_and_records_it(tmp_path, monkeypatch):
    from PIL import Image

    source = hn_file(tmp_path, [32])
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (80, 64), (200, 10, 10)).save(data / "a.png")
    (data / "a.txt").write_text("a red square", encoding="utf-8")
    seen = []
    monkeypatch.setattr(
        "hyperlit.lora.convert.convert", lambda hn, c, items, s, r: seen.append(items) or Conversion(two_fits())
    )
    out = tmp_path / "o.safetensors"
    command.run(command.plan(ToLoraOptions(source, out, data=data, dtype="float32")), stand_in_components("ab", None))
    assert seen[0].captions == ["a red square"] and [tuple(i.shape) for i in seen[0].images] == [(3, 64, 64)]
    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float32}
    assert (meta["hyperlit_data"], meta["hyperlit_base_model_hash"], meta["hyperlit_base_model"]) == (
        str(data),
        "ab",
        "",
    )


def test_to_lora_loads_the_named_model_on_the_cpu_here_after_the_plan(tmp_path, monkeypatch):
    source = hn_file(tmp_path, [32])
    loaded, moved, ran = [], [], []

    class Components:
        def to(self, device):  # noqa: ANN001, ANN202
            moved.append(device)
            return self

    components = Components()
    monkeypatch.setattr("hyperlit.models.load_components", lambda **kw: loaded.append(kw) or components)
    checked = SimpleNamespace()
    monkeypatch.setattr(command, "plan", lambda options: loaded.append("plan") or checked)  # the paths are not real
    monkeypatch.setattr(command, "run", lambda the_plan, c: ran.append((the_plan, c)) or "result")
    options = ToLoraOptions(source, tmp_path / "o.safetensors", model_path="m", tokenizer_path="t")
    assert command.to_lora(options) == "result"
    assert loaded == ["plan", {"family": "tiny", "path": "m", "tokenizer_path": "t"}]
    assert moved == ["cuda" if torch.cuda.is_available() else "cpu"] and ran == [(checked, components)]


def test_the_command_line_hands_every_option_over_and_prints_the_report(tmp_path, monkeypatch, capsys, hn_path):
    import logging

    got = []
    result = ToLoraResult(tmp_path / "o.safetensors", [layer_report("a")], 10, 20)
    monkeypatch.setattr(command, "to_lora", lambda options: got.append(options) or result)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(logging.root, "handlers", [])  # so that basicConfig configures the root logger
    monkeypatch.setattr(logging.root, "level", logging.NOTSET)
    argv = [
        "to-lora",
        str(hn_path),
        str(tmp_path / "o.safetensors"),
        "--model",
        "tiny",
        "--model-path",
        "mp",
        "--tokenizer-path",
        "tp",
        "--data",
        str(tmp_path),
        "--energy",
        "0.5",
        "--format",
        "diffusers",
        "--v-bias",
        "off",
        "--dtype",
        "float32",
    ]
    assert cli.main(argv) == 0
    expected = ToLoraOptions(
        hn_path, tmp_path / "o.safetensors", "tiny", "mp", "tp", tmp_path, None, 0.5, "diffusers", "off", "float32"
    )
    assert got == [expected]
    assert capsys.readouterr().out == format_report(result) + "\n"
    assert __import__("os").environ["HF_HUB_OFFLINE"] == "1"
    assert logging.root.level == logging.WARNING
    assert [h.formatter._fmt for h in logging.root.handlers] == ["%(levelname)s %(message)s"]


def test_the_command_line_defaults_and_the_no_data_note(tmp_path, monkeypatch, capsys, hn_path):
    got = []
    result = ToLoraResult(tmp_path / "o.safetensors", [], 1, 2)
    monkeypatch.setattr(command, "to_lora", lambda options: got.append(options) or result)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a value the user set is kept
    assert cli.main(["to-lora", str(hn_path), str(tmp_path / "o.safetensors"), "--rank", "4"]) == 0
    assert got == [ToLoraOptions(hn_path, tmp_path / "o.safetensors", rank=4)]
    assert got[0].model == "tiny" and got[0].format == "kohya" and got[0].v_bias == "auto" and got[0].dtype == "float16"
    assert capsys.readouterr().out == (
        "note: no --data: self-attention inputs come from noise only; pass the training folder for a truer fit\n"
        + format_report(result)
        + "\n"
    )
    assert __import__("os").environ["HF_HUB_OFFLINE"] == "0"


# --- `<lora:NAME:MULT>` files


def lora_file(path: Path, keys: dict[str, tuple[int, int]], metadata: dict[str, str] | None = None) -> Path:
    g = torch.Generator().manual_seed(len(keys))
    save_file({k: torch.randn(*shape, generator=g) for k, shape in keys.items()}, str(path), metadata=metadata)
    return path


GOOD_KEYS = {  # tiny: self-attention widths 32 and 64, text context 48; kohya's and PEFT's names
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight": (2, 32),
    "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v.lora_A.weight": (2, 64),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v.lora_down.weight": (2, 48),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight": (2, 64),  # any width
}


def test_available_loras_are_the_safetensors_files_by_stem(tmp_path):
    lora_file(tmp_path / "b.safetensors", {"x.lora_A.weight": (1, 2)})
    lora_file(tmp_path / "a.b.safetensors", {"x.lora_A.weight": (1, 2)})
    (tmp_path / "c.pt").write_bytes(b"x")
    (tmp_path / "d.safetensors").mkdir()
    assert tagged.available_loras(tmp_path) == {"a.b": tmp_path / "a.b.safetensors", "b": tmp_path / "b.safetensors"}
    assert list(tagged.available_loras(tmp_path)) == ["a.b", "b"]


def test_the_addnet_hash_is_the_sha256_of_the_tensor_bytes_whatever_the_metadata(tmp_path):
    big = {"w": torch.arange(300_000, dtype=torch.float32).reshape(1000, 300)}  # 1.2 MB: more than one read
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    save_file(big, str(one), metadata={"a": "1"})
    save_file(big, str(two), metadata={"a": "a much longer metadata value", "b": "2"})
    assert one.stat().st_size != two.stat().st_size
    assert addnet_hash(one) == addnet_hash(two) == hashlib.sha256(big["w"].numpy().tobytes()).hexdigest()


def test_the_short_hash_is_twelve_digits_of_kohyas_recorded_hash_else_the_computed_one(tmp_path):
    path = lora_file(tmp_path / "l.safetensors", {"x.lora_A.weight": (1, 2)})
    assert short_hash(path, {"sshs_model_hash": "0123456789abcdef0123"}) == "0123456789ab"
    assert short_hash(path, {"sshs_model_hash": ""}) == short_hash(path, {}) == addnet_hash(path)[:12]


def check(tmp_path: Path, keys: dict[str, tuple[int, int]], family: str = "tiny", **kwargs: object) -> list:
    lora_file(tmp_path / "style.safetensors", keys, **kwargs)
    return check_tagged_loras([LoraTag("style", 0.5)], tmp_path, FAMILIES[family])


def test_a_good_file_is_checked_from_its_header_and_named_by_its_hash(tmp_path):
    [lora] = check(tmp_path, GOOD_KEYS, metadata={"sshs_model_hash": "feedfacecafebeef"})
    assert lora == TaggedLora("style", tmp_path / "style.safetensors", 0.5, "feedfacecafe")


@pytest.mark.parametrize(
    ("key", "width", "message"),
    [
        (
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
            768,
            "changes cross-attention layers reading a text context of width [48, 768], but model tiny's is 48; it was "
            "made for another model",
        ),
        (
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.lora_A.weight",
            320,
            "changes self-attention layers of widths [32, 64, 320], but model tiny's are [32, 64]; it was made for "
            "another model",
        ),
        (  # diffusers 0.17-0.20's attention-processor layout
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_v_lora.down.weight",
            1024,
            "changes cross-attention layers reading a text context of width [48, 1024], but model tiny's is 48",
        ),
        (  # diffusers 0.21-0.25's LoRA-compatible linear layout
            "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k.lora.down.weight",
            640,
            "changes self-attention layers of widths [32, 64, 640], but model tiny's are [32, 64]",
        ),
    ],
)
def test_a_file_for_other_widths_is_refused_naming_them(tmp_path, key, width, message):
    with pytest.raises(ValueError) as caught:
        check(tmp_path, {**GOOD_KEYS, key: (2, width)})
    assert str(caught.value).startswith(f"<lora:style>: {tmp_path / 'style.safetensors'} {message}")


def test_widths_of_up_matrices_and_other_modules_are_not_checked(tmp_path):
    keys = {
        **GOOD_KEYS,
        "lora_unet_x_attn2_to_k.lora_up.weight": (768, 2),
        "lora_unet_x_ff_net_0.lora_down.weight": (2, 9),
    }
    assert len(check(tmp_path, keys)) == 1
    assert len(check(tmp_path, {**GOOD_KEYS, "lora_unet_x_attn1_to_k.lora_down.weight.alpha": (2, 9)})) == 1


@pytest.mark.parametrize(
    "down",
    [
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
    ],
)
def test_every_layout_diffusers_loads_is_a_lora_and_has_its_widths_checked(tmp_path, down):
    """Each layout alone (no other key to lean on) passes at the model's widths and is refused at others."""
    assert len(check(tmp_path, {down: (2, 48)})) == 1
    with pytest.raises(ValueError, match=r"text context of width \[768\], but model tiny's is 48"):
        check(tmp_path, {down: (2, 768)})


def test_files_that_are_not_loras_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError) as caught:
        check(tmp_path, {"model.diffusion_model.x.weight": (2, 32)})
    assert str(caught.value) == (
        f"<lora:style>: {tmp_path / 'style.safetensors'} holds no LoRA weights (no lora_down / lora_A keys); is it a "
        "LoRA file?"
    )
    (tmp_path / "style.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match=r"^<lora:style>: .*style\.safetensors is not a readable safetensors file \("):
        check_tagged_loras([LoraTag("style")], tmp_path, TINY)


def test_a_missing_name_lists_the_files_found(tmp_path):
    with pytest.raises(ValueError) as caught:
        check_tagged_loras([LoraTag("x")], tmp_path, TINY)
    assert str(caught.value) == f"<lora:x>: no x.safetensors in {tmp_path}; found: none"
    lora_file(tmp_path / "b.safetensors", GOOD_KEYS)
    lora_file(tmp_path / "a.safetensors", GOOD_KEYS)
    with pytest.raises(ValueError) as caught:
        check_tagged_loras([LoraTag("a"), LoraTag("x")], tmp_path, TINY)
    assert str(caught.value) == f"<lora:x>: no x.safetensors in {tmp_path}; found: a, b"


def test_no_tag_needs_no_folder_and_a_tag_needs_one(tmp_path):
    assert check_tagged_loras([], None, TINY) == []
    with pytest.raises(ValueError) as caught:
        check_tagged_loras([LoraTag("x")], None, TINY)
    assert str(caught.value) == (
        "--lora-dir is not set, but the prompt asks for <lora:x>; set it to the folder holding the LoRA "
        ".safetensors files"
    )


def test_lora_hashes_name_each_file_once_without_colons_and_commas():
    loras = [
        TaggedLora("a:b,c", Path("x"), 1.0, "111"),
        TaggedLora("d", Path("y"), 0.5, "222"),
        TaggedLora("d", Path("y"), 0.2, "222"),
    ]
    assert lora_hashes(loras) == "abc: 111, d: 222"
    assert lora_hashes([]) is None


class StandInPipe:
    """Records what `loras_applied` asks of diffusers' pipeline."""

    def __init__(self, refuse: Exception | None = None, empty: bool = False) -> None:
        self.calls: list[tuple] = []
        self.refuse = refuse
        self.empty = empty  # the second file loads without error but holds nothing diffusers places

    def load_lora_weights(self, folder: str, weight_name: str, adapter_name: str) -> None:
        self.calls.append(("load", folder, weight_name, adapter_name))
        if self.refuse is not None and adapter_name == "lora_1":
            raise self.refuse

    def set_adapters(self, names: list[str], weights: list[float]) -> None:
        self.calls.append(("set", names, weights))

    def get_list_adapters(self) -> dict[str, list[str]]:
        """diffusers' answer: the adapters each component holds (a file it took nothing from adds none)."""
        loaded = [c[3] for c in self.calls if c[0] == "load" and not (self.empty and c[3] == "lora_1")]
        return {"unet": loaded, "text_encoder": loaded[:1]}

    def unload_lora_weights(self) -> None:
        self.calls.append(("unload",))


def test_each_lora_is_its_own_adapter_at_its_multiplier_and_all_are_unloaded(tmp_path):
    loras = [
        TaggedLora("a:1", tmp_path / "a.safetensors", 0.5, "h"),
        TaggedLora("a:1", tmp_path / "a.safetensors", -1.0, "h"),
        TaggedLora("b", tmp_path / "sub" / "b.safetensors", 2.0, "i"),
    ]
    pipe = StandInPipe()
    with loras_applied(pipe, loras):
        inside = list(pipe.calls)
    assert inside == [
        ("load", str(tmp_path), "a.safetensors", "lora_0"),
        ("load", str(tmp_path), "a.safetensors", "lora_1"),
        ("load", str(tmp_path / "sub"), "b.safetensors", "lora_2"),
        ("set", ["lora_0", "lora_1", "lora_2"], [0.5, -1.0, 2.0]),
    ]
    assert pipe.calls == [*inside, ("unload",)]
    pipe = StandInPipe()
    with pytest.raises(KeyError), loras_applied(pipe, loras):
        raise KeyError("in the block")
    assert pipe.calls[-1] == ("unload",)
    pipe = StandInPipe()
    with loras_applied(pipe, []):
        pass
    assert pipe.calls == []


def two_loras(tmp_path: Path, second: str) -> list[TaggedLora]:
    """Tags `a` and `second` (files a.safetensors, b.safetensors): the second is the one the stand-in refuses."""
    return [
        TaggedLora("a", tmp_path / "a.safetensors", 1.0, "h"),
        TaggedLora(second, tmp_path / "b.safetensors", 1.0, "i"),
    ]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ValueError("  first line\nsecond line"), "first line"),
        (KeyError("unet.x"), "'unet.x'"),
        (RuntimeError(""), "RuntimeError"),
        (RuntimeError("   "), "RuntimeError"),
    ],
)
def test_a_file_diffusers_refuses_is_one_line_naming_the_tag_and_the_first_line_of_the_reason(tmp_path, error, reason):
    loras = two_loras(tmp_path, "b:c")
    pipe = StandInPipe(refuse=error)
    with pytest.raises(ValueError) as caught, loras_applied(pipe, loras):
        pass
    assert (
        str(caught.value) == f"<lora:b:c>: diffusers' load_lora_weights refused {tmp_path / 'b.safetensors'}: {reason}"
    )
    assert pipe.calls[-1] == ("unload",) and not any(c[0] == "set" for c in pipe.calls)


def test_a_file_diffusers_takes_nothing_from_is_one_line_and_everything_is_unloaded(tmp_path):
    loras = two_loras(tmp_path, "b")
    pipe = StandInPipe(empty=True)
    with pytest.raises(ValueError) as caught, loras_applied(pipe, loras):
        pass
    assert str(caught.value) == (
        f"<lora:b>: diffusers' load_lora_weights found no layer of this model's UNet or text encoders named in "
        f"{tmp_path / 'b.safetensors'} (keys must start with unet. / text_encoder. or be kohya's lora_unet_ / lora_te_)"
    )
    assert pipe.calls[-1] == ("unload",) and not any(c[0] == "set" for c in pipe.calls)


# --- the fit, on synthetic inputs with a known answer


def attention(width: int, cross: bool, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    if cross:
        return Attention(query_dim=10, cross_attention_dim=width, heads=2, dim_head=4)
    return Attention(query_dim=width, heads=2, dim_head=4)


def stream(width: int, fk_of, fv_of, rows: int = 500, held: int = 200, seed: int = 0) -> LayerInputs:  # noqa: ANN001
    """Training moments and held-out rows of inputs with a non-zero mean, through the given K / V modules."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows + held, width, generator=g) * torch.linspace(0.5, 2.0, width) + torch.linspace(-1, 1, width)
    inputs = LayerInputs(width, Moments.zeros(width, "cpu"), HeldOut())
    for chunk in x[:rows].split(128):
        inputs.train.add(chunk, fk_of(chunk), fv_of(chunk))
    inputs.held_out.add(x[rows:], fk_of(x[rows:]), fv_of(x[rows:]), torch.Generator().manual_seed(1))
    return inputs


def training_rows(width: int, rows: int = 500, held: int = 200, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows + held, width, generator=g) * torch.linspace(0.5, 2.0, width) + torch.linspace(-1, 1, width)
    return x[:rows].double().numpy()


def linear_map(width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(width, width, generator=g) * 0.3, torch.randn(width, generator=g)


def nonlinear(width: int, seed: int):  # noqa: ANN201
    a, c = linear_map(width, seed)
    return lambda x: torch.tanh(x @ a.T + c) * 0.7 + 0.1 * x**2


def weights(attn: Attention) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(m.weight.detach().double().numpy() for m in (attn.to_k, attn.to_v, attn.to_out[0]))


def least_squares(x: np.ndarray, f: np.ndarray, intercept: bool) -> tuple[np.ndarray, np.ndarray]:
    """f ≈ x aᵀ + c by numpy's least squares: (a, c)."""
    design = np.hstack([x, np.ones((len(x), 1))]) if intercept else x
    beta = np.linalg.lstsq(design, f, rcond=None)[0]
    return beta[: x.shape[1]].T, (beta[-1] if intercept else np.zeros(f.shape[1]))


def best_rank(delta: np.ndarray, rows: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    """The rank-r L minimising ||(delta - L) rowsᵀ|| (Eckart-Young on delta rowsᵀ), and the energy share kept."""
    u, s, _ = np.linalg.svd(delta @ rows.T, full_matrices=False)
    return u[:, :rank] @ u[:, :rank].T @ delta, float((s[:rank] ** 2).sum() / (s**2).sum())


def held_out_errors(fit: LayerFit, inputs: LayerInputs, attn: Attention, shift: np.ndarray) -> dict[str, float]:
    """The report's four errors, from their definitions in LayerReport, on the held-out rows."""
    x, fk, fv = (torch.cat(t).double().numpy() for t in (inputs.held_out.x, inputs.held_out.fk, inputs.held_out.fv))
    w_k, w_v, _ = weights(attn)
    l_k = fit.k.delta().numpy() if fit.k is not None else np.zeros_like(w_k)
    l_v = fit.v.delta().numpy() if fit.v is not None else np.zeros_like(w_v)
    centre = lambda m: m - m.mean(axis=0)  # noqa: E731
    miss_k = centre(fk @ w_k.T - x @ l_k.T)
    miss_v = fv @ w_v.T - x @ l_v.T - shift
    norm = np.linalg.norm
    return {
        "error_k": norm(miss_k) / norm(centre((x + fk) @ w_k.T)),
        "error_v": norm(miss_v) / norm((x + fv) @ w_v.T),
        "effect_error_k": norm(miss_k) / norm(centre(fk @ w_k.T)),
        "effect_error_v": norm(miss_v) / norm(fv @ w_v.T),
    }


def test_a_linear_network_at_full_rank_is_fitted_exactly_with_v_constant_as_an_out_bias():
    a_k, c_k = linear_map(6, 1)
    a_v, c_v = linear_map(6, 2)
    inputs = stream(6, lambda x: x @ a_k.T + c_k, lambda x: x @ a_v.T + c_v)
    attn = attention(6, cross=True)
    fit = fit_layer("mid.attn2", attn, inputs, FitSettings(energy=1.0, v_bias=True))
    w_k, w_v, w_o = weights(attn)
    assert np.allclose(fit.k.delta().numpy(), w_k @ a_k.double().numpy(), atol=1e-5)
    assert np.allclose(fit.v.delta().numpy(), w_v @ a_v.double().numpy(), atol=1e-5)
    assert np.allclose(fit.out_bias.numpy(), w_o @ w_v @ c_v.double().numpy(), atol=1e-5)
    r = fit.report
    assert (fit.name, r.name, r.kind, r.width, r.full_rank, r.rank_k, r.rank_v) == (
        "mid.attn2",
        "mid.attn2",
        "cross",
        6,
        6,
        6,
        6,
    )
    assert (
        fit.to_out_in == 8
        and r.energy_k == pytest.approx(1.0, abs=1e-12)
        and r.energy_v == pytest.approx(1.0, abs=1e-12)
    )
    assert max(r.error_k, r.error_v, r.effect_error_k, r.effect_error_v) < 1e-5


@pytest.mark.parametrize("v_bias", [False, True])
def test_a_truncated_fit_is_the_best_rank_r_change_on_the_inputs_and_reports_its_errors(v_bias):
    width, rank = 7, 2
    inputs = stream(width, nonlinear(width, 3), nonlinear(width, 4))
    attn = attention(width, cross=False, seed=1)
    fit = fit_layer("down.attn1", attn, inputs, FitSettings(rank=rank, energy=None, v_bias=v_bias))
    x = training_rows(width)
    f = torch.from_numpy(x).float()
    fk, fv = (m(f).double().numpy() for m in (nonlinear(width, 3), nonlinear(width, 4)))
    w_k, w_v, w_o = weights(attn)
    a_k, _ = least_squares(x, fk, intercept=True)
    a_v, c_v = least_squares(x, fv, intercept=v_bias)
    mean = x.mean(axis=0)
    best_k, energy_k = best_rank(w_k @ a_k, x - mean, rank)  # K: a shared shift is cancelled, inputs centred
    best_v, energy_v = best_rank(w_v @ a_v, x - mean if v_bias else x, rank)
    assert np.allclose(fit.k.delta().numpy(), best_k, atol=1e-7) and np.allclose(
        fit.v.delta().numpy(), best_v, atol=1e-7
    )
    r = fit.report
    assert (r.kind, r.width, r.full_rank, r.rank_k, r.rank_v) == ("self", width, width, rank, rank)
    assert r.energy_k == pytest.approx(energy_k, rel=1e-9) and r.energy_v == pytest.approx(energy_v, rel=1e-9)
    shift = np.zeros(8)
    if v_bias:  # V's constant, and what truncation lost at the mean input, reach every output alike
        shift = w_v @ c_v + (w_v @ a_v - best_v) @ mean
        assert np.allclose(fit.out_bias.numpy(), w_o @ shift, atol=1e-7)
    else:
        assert fit.out_bias is None
    expected = held_out_errors(fit, inputs, attn, shift)
    assert {k: getattr(r, k) for k in expected} == pytest.approx(expected, rel=1e-6)
    assert 0.01 < r.effect_error_k < 1 and 0.01 < r.effect_error_v < 1  # a real, partial fit


@pytest.mark.parametrize("energy", [0.3, 0.9, 0.99, 0.999999])
def test_the_energy_setting_picks_the_least_rank_keeping_that_share(energy):
    width = 7
    inputs = stream(width, nonlinear(width, 5), nonlinear(width, 6))
    attn = attention(width, cross=False, seed=2)
    fit = fit_layer("a", attn, inputs, FitSettings(energy=energy))
    x = training_rows(width)
    fk = nonlinear(width, 5)(torch.from_numpy(x).float()).double().numpy()
    a_k, _ = least_squares(x, fk, intercept=True)
    w_k = weights(attn)[0]
    shares = [best_rank(w_k @ a_k, x - x.mean(axis=0), r)[1] for r in range(1, width + 1)]
    least = next(r for r, share in enumerate(shares, start=1) if share >= energy)
    assert fit.report.rank_k == least and fit.report.energy_k == pytest.approx(shares[least - 1], rel=1e-9)
    assert fit.report.energy_k <= 1.0


def test_a_rank_above_the_full_rank_is_capped_and_no_change_gives_no_lora():
    width = 5
    inputs = stream(width, nonlinear(width, 7), nonlinear(width, 8))
    fit = fit_layer("a", attention(width, cross=False), inputs, FitSettings(rank=50, energy=None))
    assert fit.k.rank == fit.v.rank == fit.report.full_rank == 5
    zero = stream(width, lambda x: torch.zeros_like(x), lambda x: torch.zeros_like(x))
    for settings in (FitSettings(rank=3, energy=None, v_bias=True), FitSettings(energy=0.5)):
        fit = fit_layer("a", attention(width, cross=False), zero, settings)
        r = fit.report
        assert fit.k is None and fit.v is None and (r.rank_k, r.rank_v, r.energy_k, r.energy_v) == (0, 0, 1.0, 1.0)
        assert (r.effect_error_k, r.effect_error_v) == (0.0, 0.0)
        if settings.v_bias:
            assert torch.equal(fit.out_bias, torch.zeros(width, dtype=torch.float64))  # to_out.0 maps back to the width


def test_cross_layers_read_the_text_stream_and_self_layers_their_own():
    assert stream_of("a.attn2", attention(6, cross=True)) == TEXT
    assert stream_of("a.attn1", attention(6, cross=False)) == "a.attn1"


# --- the inputs' moments and held-out rows


def test_moments_are_the_sums_least_squares_needs():
    g = torch.Generator().manual_seed(0)
    m = Moments.zeros(3, "cpu")
    assert [tuple(t.shape) for t in (m.uu, m.uk, m.uv)] == [(4, 4), (4, 3), (4, 3)] and m.uu.dtype == torch.float64
    xs = [torch.randn(n, 3, generator=g) for n in (5, 2)]
    for x in xs:
        m.add(x, 2 * x, x**2)
    x = torch.cat(xs).double().numpy()
    u = np.hstack([x, np.ones((7, 1))])
    assert m.rows == 7
    assert np.allclose(m.uu.numpy(), u.T @ u) and np.allclose(m.uk.numpy(), u.T @ (2 * x))
    assert np.allclose(m.uv.numpy(), u.T @ x**2, atol=1e-6)


def test_held_out_rows_are_matching_random_rows_an_eighth_of_the_cap_at_a_time_up_to_the_cap():
    held = HeldOut()
    g = torch.Generator().manual_seed(0)
    sizes = []
    for n in (3, 1000, 600, *[1000] * 8):
        x = torch.randn(n, 2, dtype=torch.float64, generator=g)
        held.add(x, 2 * x, -x, torch.Generator().manual_seed(n))
        sizes.append(held.rows)
    assert sizes == [3, 515, 1027, 1539, 2051, 2563, 3075, 3587, 4096, 4096, 4096]
    x, fk, fv = held.tensors()
    assert x.shape == (4096, 2) and x.dtype == torch.float32 and torch.equal(fk, 2 * x) and torch.equal(fv, -x)
    assert len(torch.unique(x[3:515], dim=0)) == 512  # distinct rows, not one repeated


def test_held_out_rows_of_a_small_batch_are_all_kept_in_a_random_order():
    held = HeldOut()
    x = torch.arange(20.0).reshape(10, 2)
    held.add(x, x, x, torch.Generator().manual_seed(0))
    kept = held.tensors()[0]
    assert sorted(kept[:, 0].tolist()) == x[:, 0].tolist() and not torch.equal(kept, x)


def help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal width


def test_the_help_names_the_command_and_every_option_with_its_choices(capsys):
    listed = help_text(["--help"], capsys)
    assert "to-lora a hypernetwork as a LoRA (kohya or diffusers layout), fitted per layer" in listed
    text = help_text(["to-lora", "--help"], capsys)
    for part in [
        "HN_FILE any file `hyperlit inspect` reads (.pt / .safetensors)",
        "OUT the LoRA file to write (.safetensors)",
        "--model MODEL model family: tiny (embedded, the default), sd15, sd21, sdxl",
        "--model-path MODEL_PATH checkpoint file or diffusers folder for sd15/sd21/sdxl",
        "--tokenizer-path TOKENIZER_PATH tokenizer folder for a single file (SDXL: both)",
        "--data DATA the A1111 image folder (captions + latents to fit on)",
        "--rank RANK rank of every to_k / to_v LoRA (capped at full)",
        "--energy ENERGY least rank keeping this share of energy (default 0.999)",
        "--format {kohya,diffusers} key layout (kohya: A1111, Forge, ComfyUI...)",
        "--v-bias {auto,on,off} keep V's constant as a to_out bias (auto: diffusers yes, kohya no: A1111 and "
        "diffusers refuse diff_b)",
        "--dtype {float16,float32} dtype of the stored tensors",
        "[--rank RANK | --energy ENERGY]",
    ]:
        assert part in text, part


def test_rank_and_energy_together_are_refused_by_the_command_line(capsys, hn_path):
    with pytest.raises(SystemExit) as done:
        cli.main(["to-lora", str(hn_path), "o.safetensors", "--rank", "2", "--energy", "0.5"])
    assert done.value.code == 2 and "argument --energy: not allowed with argument --rank" in capsys.readouterr().err


# --- which layers, which stream, which data


def test_touched_layers_are_the_attentions_whose_context_width_the_network_has():
    unet = nn.Module()
    unet.a = attention(32, cross=False)  # self, width 32: touched
    unet.b = attention(48, cross=True)  # cross, reads 48: touched
    unet.c = attention(40, cross=False)  # a width the network has no modules for
    unet.d = Attention(query_dim=32, cross_attention_dim=48, added_kv_proj_dim=48, heads=2, dim_head=4)  # added K/V
    unet.e = Attention(
        query_dim=32, cross_attention_dim=48, added_kv_proj_dim=48, only_cross_attention=True, heads=2, dim_head=4
    )  # no to_k at all
    unet.f = nn.Linear(32, 32)
    unet.inner = nn.Module()
    unet.inner.g = attention(48, cross=True)
    assert unet.e.to_k is None
    layers = touched_layers(unet, SimpleNamespace(sizes=[32, 48]))
    assert list(layers) == ["a", "b", "inner.g"] and layers["inner.g"] is unet.inner.g
    assert list(touched_layers(unet, SimpleNamespace(sizes=[40]))) == ["c"]


def test_every_layer_is_fitted_from_its_stream_in_order():
    from hyperlit.lora.convert import GatheredInputs, fit_all

    text = stream(6, nonlinear(6, 1), nonlinear(6, 2))
    own = stream(5, nonlinear(5, 3), nonlinear(5, 4), seed=1)
    layers = {"z.attn1": attention(5, cross=False, seed=3), "a.attn2": attention(6, cross=True, seed=4)}
    settings = FitSettings(rank=2, energy=None, v_bias=True)
    conversion = fit_all(GatheredInputs(layers, {TEXT: text, "z.attn1": own}), settings)
    expected = [
        fit_layer("z.attn1", layers["z.attn1"], own, settings),
        fit_layer("a.attn2", layers["a.attn2"], text, settings),
    ]
    assert [f.name for f in conversion.fits] == ["z.attn1", "a.attn2"]
    for got, want in zip(conversion.fits, expected, strict=True):
        assert got.report == want.report and torch.equal(got.k.delta(), want.k.delta())
        assert torch.equal(got.out_bias, want.out_bias)


def test_data_is_read_as_captions_and_centre_crops_skipping_unreadable_images(tmp_path, caplog):
    from PIL import Image

    from hyperlit.lora.inputs import read_data

    assert read_data(None, 64) == inputs_module().DataItems([], [])
    picture = np.zeros((40, 80, 3), dtype=np.uint8)
    picture[:, 10:70] = 255  # white but for 10 px black sides, outside the centre 40 x 40 crop
    Image.fromarray(picture).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a white band", encoding="utf-8")
    (tmp_path / "b.png").write_bytes(b"not an image")
    with caplog.at_level("WARNING"):
        items = read_data(tmp_path, 8)
    assert items.captions == ["a white band"] and len(items.images) == 1
    image = items.images[0]
    assert image.shape == (3, 8, 8) and float(image.min()) >= -1 and float(image.max()) <= 1
    assert torch.allclose(image, torch.ones(3, 8, 8), atol=1e-6)  # the centre 40 x 40 crop is all white
    assert any(f"--data {tmp_path}: " in r.getMessage() for r in caplog.records)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"nothing")
    with pytest.raises(ValueError) as caught:
        read_data(empty, 8)
    assert str(caught.value) == f"--data: {empty} holds no readable images; allowed: an A1111 folder of images + .txt"


def inputs_module():  # noqa: ANN201
    from hyperlit.lora import inputs

    return inputs


def test_a_bad_image_first_is_skipped_counted_and_the_rest_still_read(tmp_path, caplog):
    """The unreadable file sorts first: reading goes on past it, and the warning names the kind of skip and its
    count (SkipLog's summary, written out here)."""
    from PIL import Image

    from hyperlit.lora.inputs import read_data

    (tmp_path / "0-broken.png").write_bytes(b"not an image")
    (tmp_path / "0-broken.txt").write_text("broken", encoding="utf-8")
    for name, value in (("a", 255), ("b", 0)):
        Image.fromarray(np.full((16, 16, 3), value, dtype=np.uint8)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"caption {name}", encoding="utf-8")
    with caplog.at_level("WARNING"):
        items = read_data(tmp_path, 8)
    assert items.captions == ["caption a", "caption b"]
    assert torch.allclose(items.images[0], torch.ones(3, 8, 8)) and torch.allclose(
        items.images[1], -torch.ones(3, 8, 8)
    )
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"--data {tmp_path}: ")]
    assert messages == [f"--data {tmp_path}: not_an_image=1 (skipped)"]


def test_text_inputs_fit_every_prompt_once_and_hold_out_every_fifth():
    """_text_inputs against sums written out here: each prompt's context rows feed the training moments exactly
    once, except prompts 4, 9, 14, ... (every fifth), whose rows are held out instead; 19 prompts span three chunks
    of the encoder's batch of 8, so a chunk that skips, repeats or misplaces a prompt changes the sums."""
    from types import SimpleNamespace

    from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
    from hyperlit.lora import inputs

    width, tokens = 6, 3
    hn = Hypernetwork(HypernetworkConfig(activation="relu"), sizes=[width])
    with torch.no_grad():
        for p in hn.parameters():
            p.normal_(std=0.5, generator=torch.Generator().manual_seed(p.numel()))
    prompts = [f"prompt {i}" for i in range(19)]
    table = {
        p: torch.randn(tokens, width, generator=torch.Generator().manual_seed(100 + i)) for i, p in enumerate(prompts)
    }
    encoded: list[list[str]] = []

    def encode_prompts(chunk):
        encoded.append(list(chunk))
        return SimpleNamespace(context=torch.stack([table[p] for p in chunk]))

    components = SimpleNamespace(context_dim=width, encode_prompts=encode_prompts)
    got = inputs._text_inputs(hn, components, prompts, torch.device("cpu"))
    assert [len(c) for c in encoded] == [8, 8, 3] and sum(encoded, []) == prompts
    fk, fv = hn.pairs[str(width)][0].linear, hn.pairs[str(width)][1].linear
    train = [table[p] for i, p in enumerate(prompts) if i % 5 != 4]
    x = torch.cat(train).double()
    u = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    with torch.no_grad():
        k, v = fk(torch.cat(train)).double(), fv(torch.cat(train)).double()
    assert got.train.rows == 16 * tokens
    torch.testing.assert_close(got.train.uu, u.T @ u)
    torch.testing.assert_close(got.train.uk, u.T @ k, rtol=1e-5, atol=1e-5)  # f(x) in float32, one prompt at a time
    torch.testing.assert_close(got.train.uv, u.T @ v, rtol=1e-5, atol=1e-5)
    held_x, held_k, _ = got.held_out.tensors()
    held = torch.cat([table[p] for i, p in enumerate(prompts) if i % 5 == 4])  # prompts 4, 9, 14: all rows kept
    assert got.held_out.rows == 3 * tokens
    order = [int(torch.argmin((held - row).abs().sum(dim=1))) for row in held_x]
    assert sorted(order) == list(range(held.shape[0]))
    with torch.no_grad():
        torch.testing.assert_close(held_k, fk(held[order]), rtol=1e-5, atol=1e-5)
