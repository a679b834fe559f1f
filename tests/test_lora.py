"""`hyperlit to-lora`: a hypernetwork as a LoRA, checked against the hypernetwork itself through diffusers' loaders.

References are computed another way: the hypernetwork-patched UNet (hyperlit.attention), diffusers' own kohya
converter, and plain weight edits of the base UNet for the constant-term claims.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from helpers.hypernetworks import randomised
from helpers.tiny_sdxl import write_folder
from safetensors import safe_open
from safetensors.torch import load_file

from hyperlit import cli, files, models
from hyperlit.attention import hypernetworks_attached
from hyperlit.hypernetwork import HypernetworkConfig
from hyperlit.lora.command import ToLoraOptions, to_lora
from hyperlit.lora.convert import convert, key_style, write_conversion
from hyperlit.lora.fit import FitSettings
from hyperlit.lora.inputs import BUILTIN_PROMPTS, DataItems, read_data
from hyperlit.models import FAMILIES, load_components
from hyperlit.models.loader import TINY_BASE_DIR
from hyperlit.pretrained import OFFLINE

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "datasets" / "sample"
TINY = FAMILIES["tiny"]
TINY_WIDTHS = [*TINY.attention_widths, TINY.context_dim]
LINEAR = HypernetworkConfig(layer_structure=[1, 2, 1], activation="linear")
SWISH = HypernetworkConfig(layer_structure=[1, 2, 1], activation="swish")


def small(config: HypernetworkConfig, sizes: list[int], seed: int, scale: float = 0.15):
    """A network whose change is a sizeable but not overwhelming part of each K/V input."""
    hn = randomised(config, sizes, seed=seed)
    with torch.no_grad():
        for p in hn.parameters():
            p.mul_(scale / 0.3)
    return hn.eval()


@pytest.fixture(scope="module")
def base():
    components = load_components(family="tiny")
    TEXT_CONTEXT[:] = [components.encode_text(PROMPTS), components.encode_text(["", "a green square"])]
    return components


@pytest.fixture(scope="module")
def data() -> DataItems:
    items = read_data(SAMPLE, TINY.default_resolution)
    return DataItems(items.captions[:6], items.images[:6])  # enough rows, a short test


PROMPTS = ["a red circle on a white background", "a blue cross"]


def predict(unet, seed: int = 0) -> torch.Tensor:
    """The noise prediction for random latents and real text: the fit is exact on what the model can produce
    (text context and hidden states leave layer norms, so they lie on a hyperplane the fit cannot see past)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(PROMPTS), 4, 8, 8, generator=g)
    context = TEXT_CONTEXT[seed % len(TEXT_CONTEXT)]
    with torch.no_grad():
        return unet(latents, torch.tensor([500, 800]), encoder_hidden_states=context).sample


TEXT_CONTEXT: list[torch.Tensor] = []


def write(tmp_path: Path, name: str, conversion, components, fmt: str, dtype=torch.float32) -> Path:
    path = tmp_path / f"{name}.safetensors"
    write_conversion(path, conversion, key_style(fmt, components), dtype, {"hyperlit_base_model_family": "tiny"})
    return path


def pipeline_with(path: Path, adapter: str = "hn") -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(
        TINY_BASE_DIR, safety_checker=None, requires_safety_checker=False, **OFFLINE
    )
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
    return pipe


@pytest.fixture(scope="module")
def linear_case(base, data, tmp_path_factory):
    hn = small(LINEAR, TINY_WIDTHS, seed=1)
    conversion = convert(hn, base, data, FitSettings(energy=1.0, v_bias=True), TINY.default_resolution)
    path = write(tmp_path_factory.mktemp("lora"), "linear", conversion, base, "diffusers")
    return hn, conversion, path


def test_linear_network_at_full_rank_is_exact_through_diffusers_load_lora_weights(base, linear_case):
    hn, conversion, path = linear_case
    with hypernetworks_attached(base.unet, [hn]):
        reference = predict(base.unet)
    plain = predict(base.unet)
    lora = predict(pipeline_with(path).unet)
    change = (reference - plain).abs().max()
    assert change > 1e-2  # the network changes the prediction a lot, so the match below means something
    assert (lora - reference).abs().max() <= 1e-5 * reference.abs().max()
    for report in (f.report for f in conversion.fits):
        assert report.rank_k == report.full_rank and report.effect_error_k < 1e-6 and report.effect_error_v < 1e-6


def test_without_a_v_bias_the_layer_norms_let_the_linear_map_carry_v_constant(base, data, tmp_path):
    # kohya files carry no bias by default; the inputs' layer norms make the V constant linear in x (fit.py).
    hn = small(LINEAR, TINY_WIDTHS, seed=1)
    conversion = convert(hn, base, data, FitSettings(energy=1.0, v_bias=False), TINY.default_resolution)
    assert all(fit.out_bias is None for fit in conversion.fits)
    with hypernetworks_attached(base.unet, [hn]):
        reference = predict(base.unet, seed=1)
    lora = predict(pipeline_with(write(tmp_path, "kohya", conversion, base, "kohya")).unet, seed=1)
    assert (lora - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_lora_strength_plays_the_multiplier(base, linear_case):
    hn, _, path = linear_case
    pipe = pipeline_with(path)
    for strength in (0.5, -0.7):
        pipe.set_adapters(["hn"], [strength])
        hn.multiplier = strength
        with hypernetworks_attached(base.unet, [hn]):
            reference = predict(base.unet, seed=3)
        assert (predict(pipe.unet, seed=3) - reference).abs().max() <= 1e-5 * reference.abs().max()
    hn.multiplier = 1.0
    pipe.set_adapters(["hn"], [0.0])
    assert torch.allclose(predict(pipe.unet, seed=3), predict(base.unet, seed=3), atol=1e-6)


def constant_network(path: int, seed: int):
    """A network whose K (path 0) or V (path 1) module adds a constant (zero weights, non-zero last bias)."""
    hn = small(LINEAR, [TINY.context_dim, *TINY.attention_widths], seed=seed)
    with torch.no_grad():
        for width in hn.sizes:
            for index, module in enumerate(hn.pairs[str(width)]):
                for name, p in module.named_parameters():
                    p.zero_()
                    if index == path and name == "linear.1.bias":
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return hn


def test_a_constant_added_to_k_is_cancelled_by_the_softmax(base):
    hn = constant_network(path=0, seed=5)
    with hypernetworks_attached(base.unet, [hn]):
        shifted = predict(base.unet)
    with hypernetworks_attached(base.unet, []):  # the same attention code without the network
        plain = predict(base.unet)
    assert (shifted - plain).abs().max() <= 2e-5 * plain.abs().max()


def test_a_constant_added_to_v_is_a_to_out_bias_change(base):
    hn = constant_network(path=1, seed=6)
    with hypernetworks_attached(base.unet, [hn]):
        shifted = predict(base.unet)
    edited = copy.deepcopy(base.unet)
    with torch.no_grad():
        for module in edited.modules():
            if hasattr(module, "to_v") and module.to_v is not None and module.to_k.in_features in hn.sizes:
                c = hn.pairs[str(module.to_k.in_features)][1].linear[1].bias
                module.to_out[0].bias += module.to_out[0].weight @ (module.to_v.weight @ c)
    assert (shifted - predict(base.unet)).abs().max() > 1e-2
    assert (predict(edited) - shifted).abs().max() <= 1e-5 * shifted.abs().max()


def peft_weights(unet) -> dict[str, torch.Tensor]:
    return {k: v for k, v in unet.state_dict().items() if "lora_" in k}


@pytest.fixture(scope="module")
def swish_case(base, data, tmp_path_factory):
    hn = small(SWISH, TINY_WIDTHS, seed=2)
    conversion = convert(hn, base, data, FitSettings(rank=4, energy=None), TINY.default_resolution)
    return hn, conversion, tmp_path_factory.mktemp("swish")


def test_kohya_file_through_diffusers_kohya_converter_equals_the_diffusers_file_sd1(base, swish_case):
    _, conversion, tmp = swish_case
    kohya, peft = write(tmp, "k", conversion, base, "kohya"), write(tmp, "d", conversion, base, "diffusers")
    keys = set(load_file(kohya))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight" in keys
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v.alpha" in keys
    a, b = peft_weights(pipeline_with(kohya).unet), peft_weights(pipeline_with(peft).unet)
    assert a.keys() == b.keys() and len(a) == 4 * len(conversion.fits)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kohya_sgm_names_match_diffusers_kohya_converter_sdxl(tmp_path):
    folder = write_folder(tmp_path / "sdxl")
    components = load_components(family="tiny_sdxl", path=folder)
    family = FAMILIES["tiny_sdxl"]
    hn = small(SWISH, [family.context_dim, *family.attention_widths], seed=3)
    conversion = convert(hn, components, DataItems([], []), FitSettings(rank=3, energy=None), 64)
    kohya = write(tmp_path, "k", conversion, components, "kohya")
    peft = write(tmp_path, "d", conversion, components, "diffusers")
    # down_blocks.2.attentions.1 (layers_per_block 2) is sgm input_blocks.8.1; up_blocks.0.attentions.2 output 2.1
    keys = set(load_file(kohya))
    assert "lora_unet_input_blocks_8_1_transformer_blocks_1_attn1_to_k.lora_down.weight" in keys
    assert "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_v.lora_up.weight" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_k.alpha" in keys
    unet_k, unet_d = copy.deepcopy(components.unet), copy.deepcopy(components.unet)
    state, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(kohya), unet_config=unet_k.config)
    unet_k.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name="hn")
    unet_d.load_lora_adapter(load_file(peft), prefix="unet", adapter_name="hn")
    a, b = peft_weights(unet_k), peft_weights(unet_d)
    assert a.keys() == b.keys() and len(a) == 4 * len(conversion.fits)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kohya_sd1_state_dict_converts_without_leftover_keys(base, swish_case):
    # diffusers raises on any key its kohya converter does not consume: the file must hold none.
    _, conversion, tmp = swish_case
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(write(tmp, "k2", conversion, base, "kohya")), unet_config=base.unet.config
    )
    assert len(alphas) == 2 * len(conversion.fits) and set(alphas.values()) == {4.0}


def test_nonlinear_network_reports_a_measured_error_close_to_the_prediction_error(base, swish_case):
    hn, conversion, tmp = swish_case
    reports = [f.report for f in conversion.fits]
    assert all(0.01 < r.effect_error_k < 1 and 0.01 < r.effect_error_v < 1 for r in reports)
    assert all(r.rank_k == r.rank_v == 4 for r in reports)
    with hypernetworks_attached(base.unet, [hn]):
        reference = predict(base.unet)
    lora = predict(pipeline_with(write(tmp, "d2", conversion, base, "diffusers")).unet)
    change = (reference - predict(base.unet)).norm()
    # The LoRA moves the prediction most of the way towards the hypernetwork's, not all of it.
    assert 0.001 * change < (lora - reference).norm() < 0.7 * change


def test_reported_held_out_error_of_a_cross_layer_matches_a_direct_computation(base, data, swish_case):
    hn, conversion, _ = swish_case
    prompts = list(dict.fromkeys([*data.captions, *BUILTIN_PROMPTS]))
    held_out = [p for i, p in enumerate(prompts) if i % 5 == 4]  # the documented split: every fifth prompt
    x = base.encode_text(held_out).reshape(-1, TINY.context_dim).double()
    fit = next(f for f in conversion.fits if f.report.kind == "cross")
    attn = dict(base.unet.named_modules())[fit.name]
    k_module = copy.deepcopy(hn.pairs[str(TINY.context_dim)][0]).double()
    with torch.no_grad():
        hn_keys = k_module(x) @ attn.to_k.weight.double().T
        lora_keys = x @ (attn.to_k.weight.double() + fit.k.delta()).T
    miss = (hn_keys - lora_keys) - (hn_keys - lora_keys).mean(0)
    expected = float(miss.norm() / (hn_keys - hn_keys.mean(0)).norm())
    assert fit.report.error_k == pytest.approx(expected, rel=1e-3)


def test_command_writes_a_kohya_file_with_the_fit_report_in_its_metadata(tmp_path, monkeypatch, capsys):
    hn = small(SWISH, TINY_WIDTHS, seed=4)
    source = files.save_hypernetwork(hn, tmp_path / "style.pt")
    out = tmp_path / "style-lora.safetensors"
    monkeypatch.setattr("hyperlit.lora.inputs.TIMESTEPS", (500,))  # a short run
    assert cli.main(["to-lora", str(source), str(out), "--rank", "3"]) == 0
    printed = capsys.readouterr().out
    assert "no --data" in printed and f"wrote {out}" in printed and "mid_block.attentions.0" in printed
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    fit = json.loads(meta["hyperlit_fit"])
    assert dtypes == {torch.float16} and len(fit) == 14 and {r["rank_k"] for r in fit} == {3}
    assert meta["hyperlit_source"] == "style.pt" and len(meta["hyperlit_source_hash"]) == 10
    assert meta["hyperlit_base_model_hash"] == load_components(family="tiny").checkpoint_hash
    assert meta["ss_network_module"] == "networks.lora" and meta["hyperlit_v_bias"] == "false"
    assert not any(k.endswith("diff_b") for k in load_file(out))


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_components", refuse)


@pytest.fixture
def tiny_hn_file(tmp_path) -> Path:
    return files.save_hypernetwork(small(LINEAR, TINY_WIDTHS, seed=7), tmp_path / "hn.pt")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["missing.pt", "o.safetensors"], "HN_FILE: missing.pt does not exist"),
        (["{hn}", "o.safetensors", "--rank", "0"], "--rank: 0 is not allowed; use an integer >= 1"),
        (["{hn}", "o.safetensors", "--rank", "65"], "--rank: 65 is larger than any layer's full rank"),
        (["{hn}", "o.safetensors", "--energy", "0"], "--energy: 0.0 is not allowed; use a number in (0, 1]"),
        (["{hn}", "o.safetensors", "--energy", "1.5"], "--energy: 1.5 is not allowed"),
        (["{hn}", "o.pt"], "OUT: 'o.pt' is not allowed; LoRA files end in .safetensors"),
        (["{hn}", "o.safetensors", "--model", "sd15"], "model.family=sd15 needs model.path"),
        (["{sd}", "o.safetensors"], "it was made for another model (set --model to its family)"),
        (["{bad}", "o.safetensors"], "HN_FILE: "),
    ],
)
def test_bad_input_is_one_line_before_any_model_loads(
    args, expected, tiny_hn_file, tmp_path, monkeypatch, capsys, no_model_loading
):
    monkeypatch.chdir(tmp_path)
    sd = files.save_hypernetwork(small(LINEAR, [768, 320], seed=8), tmp_path / "sd.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    argv = [a.format(hn=tiny_hn_file, sd=sd, bad=bad) for a in args]
    assert cli.main(["to-lora", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hyperlit to-lora: error: ") and expected in err, err


def test_options_refuse_rank_with_energy():
    with pytest.raises(ValueError, match="give one of them"):
        ToLoraOptions(hypernetwork=Path("x.pt"), out=Path("y.safetensors"), rank=2, energy=0.5)


def test_to_lora_function_returns_the_reports_and_sizes(tmp_path, tiny_hn_file, monkeypatch):
    monkeypatch.setattr("hyperlit.lora.inputs.TIMESTEPS", (300,))
    out = tmp_path / "l.safetensors"
    result = to_lora(ToLoraOptions(tiny_hn_file, out, data=SAMPLE, rank=2, format="diffusers"))
    assert result.size == out.stat().st_size and result.source_size == tiny_hn_file.stat().st_size
    keys = load_file(out)
    # diffusers layout with V's constant: a zero rank-1 to_out.0 LoRA carrying it as PEFT's lora_B.bias
    bias_keys = [k for k in keys if k.endswith("to_out.0.lora_B.bias")]
    assert len(bias_keys) == len(result.reports) and all(keys[k].abs().max() > 0 for k in bias_keys)
