"""`hyperlit generate` with `<lora:NAME:MULT>` tags: files read by diffusers' own loader, stacked with hypernetworks,
named in the PNG info as A1111 names them, and refused at the door when they cannot apply.

The reference for the LoRA's image is the hypernetwork it was converted from (`hyperlit to-lora` of a linear network
at full rank in float32 is exact, tests/test_lora.py), rendered through the hypernetwork processor instead.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.hypernetworks import randomised
from helpers.infotext import parse_parameters
from PIL import Image
from safetensors.torch import load_file, save_file

from hyperlit import cli, files
from hyperlit import generate as gen
from hyperlit.hypernetwork import HypernetworkConfig
from hyperlit.lora.tagged import TaggedLora, lora_hashes
from hyperlit.models import FAMILIES, load_components

TINY_WIDTHS = [*FAMILIES["tiny"].attention_widths, FAMILIES["tiny"].context_dim]
LINEAR = HypernetworkConfig(layer_structure=[1, 2, 1], activation="linear")
RELU = HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu")


@pytest.fixture(scope="module")
def tiny():
    return load_components(family="tiny")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(hypernetwork dir with style.pt and other.pt, LoRA dir with style.safetensors converted by the command)."""
    root = tmp_path_factory.mktemp("networks")
    hn_dir, lora_dir = root / "hn", root / "lora"
    hn_dir.mkdir(), lora_dir.mkdir()
    style = randomised(LINEAR, TINY_WIDTHS, seed=1).eval()
    with torch.no_grad():
        for p in style.parameters():
            p.mul_(0.5)  # a change the 8-bit image shows, small enough for the fit's float64 to stay exact
    files.save_hypernetwork(style, hn_dir / "style.pt")
    files.save_hypernetwork(randomised(RELU, TINY_WIDTHS, seed=2, name="other"), hn_dir / "other.pt")
    argv = ["to-lora", str(hn_dir / "style.pt"), str(lora_dir / "style.safetensors"), "--energy", "1"]
    assert cli.main([*argv, "--dtype", "float32"]) == 0
    return hn_dir, lora_dir


def render(tiny, dirs: tuple[Path, Path], out: Path, prompt: str, **kw) -> np.ndarray:
    hn_dir, lora_dir = dirs
    options = gen.GenerateOptions(prompt=prompt, out=out, hypernetwork_dir=hn_dir, lora_dir=lora_dir, steps=3, n=1)
    for key, value in kw.items():
        setattr(options, key, value)
    (path,) = gen.run(gen.plan(options), tiny)
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def addnet_hash(path: Path) -> str:
    """kohya's safetensors hash, computed here from the bytes: sha256 of what follows the 8-byte length + header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()


def test_lora_tag_through_the_cli_matches_its_hypernetwork_and_names_its_hash(tiny, dirs, tmp_path, capsys) -> None:
    hn_dir, lora_dir = dirs
    prompt = "a red circle <lora:style:0.7>"
    argv = ["generate", prompt, "--lora-dir", str(lora_dir), "--out", str(tmp_path / "l"), "--n", "1", "--steps", "3"]
    assert cli.main(argv) == 0
    image = Image.open(tmp_path / "l" / "0-0.png")
    lora = np.asarray(image.convert("RGB")).astype(int)
    hypernet = render(tiny, dirs, tmp_path / "h", "a red circle <hypernet:style:0.7>")
    base = render(tiny, dirs, tmp_path / "b", "a red circle")
    assert np.abs(lora - base).max() > 40  # the LoRA changes the image a lot ...
    assert np.abs(lora - hypernet).max() <= 2  # ... exactly as the hypernetwork does (8-bit rounding aside)
    text, _, pairs = parse_parameters(image.info["parameters"])
    assert text == prompt
    assert pairs["Lora hashes"] == f"style: {addnet_hash(lora_dir / 'style.safetensors')[:12]}"
    assert list(pairs)[-2:] == ["Model", "Lora hashes"]  # after the model, as A1111 orders extra parameters
    assert 'Lora hashes: "style: ' in image.info["parameters"]  # quoted: the value holds ':'


def test_multiplier_zero_is_the_base_image_and_the_unet_is_restored(tiny, dirs, tmp_path) -> None:
    before = {name: tensor.clone() for name, tensor in tiny.unet.state_dict().items()}
    base = render(tiny, dirs, tmp_path / "b", "a blue cross")
    zero = render(tiny, dirs, tmp_path / "z", "a blue cross <lora:style:0>")
    assert np.array_equal(zero, base)
    after = tiny.unet.state_dict()
    assert list(after) == list(before)  # diffusers' LoRA layers are gone again
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())


def test_loras_stack_with_hypernetworks(tiny, dirs, tmp_path) -> None:
    other = render(tiny, dirs, tmp_path / "o", "a green star <hypernet:other>")
    lora = render(tiny, dirs, tmp_path / "l", "a green star <lora:style>")
    both = render(tiny, dirs, tmp_path / "ol", "a green star <hypernet:other> <lora:style>")
    zero = render(tiny, dirs, tmp_path / "o0", "a green star <lora:style:0> <hypernet:other>")
    assert np.array_equal(zero, other)
    assert np.abs(both - other).max() > 10 and np.abs(both - lora).max() > 10
    # The same tag twice is two adapters that add up: 0.5 + 0.5 is the LoRA at 1 (up to float rounding).
    halves = render(tiny, dirs, tmp_path / "hh", "a green star <lora:style:0.5> <lora:style:0.5>")
    assert np.abs(halves - lora).max() <= 2


def test_a1111_hash_ignores_metadata_and_prefers_kohyas_recorded_one(tiny, dirs, tmp_path) -> None:
    _, lora_dir = dirs
    tensors = load_file(lora_dir / "style.safetensors")
    save_file(tensors, tmp_path / "relabelled.safetensors", metadata={"note": "other metadata"})
    recorded = "0123456789abcdef" * 4
    save_file(tensors, tmp_path / "kohya.safetensors", metadata={"sshs_model_hash": recorded})
    options = gen.GenerateOptions(prompt="<lora:relabelled> <lora:kohya:-0.5>", out=tmp_path / "o", lora_dir=tmp_path)
    loras = gen.plan(options).loras
    assert [(lora.name, lora.multiplier) for lora in loras] == [("relabelled", 1.0), ("kohya", -0.5)]
    assert loras[0].short_hash == addnet_hash(lora_dir / "style.safetensors")[:12]  # same tensors, same hash
    assert loras[1].short_hash == recorded[:12]
    assert lora_hashes(loras) == f"relabelled: {loras[0].short_hash}, kohya: 0123456789ab"
    # A1111 drops ':' and ',' from the name it writes, and one entry per name.
    twice = [TaggedLora("a,b", Path("x"), 1.0, "h1"), TaggedLora("a,b", Path("x"), 0.5, "h1")]
    assert lora_hashes(twice) == "ab: h1" and lora_hashes([]) is None


def test_a_file_diffusers_refuses_is_one_error_and_leaves_the_unet_clean(tiny, dirs, tmp_path) -> None:
    _, lora_dir = dirs
    tensors = load_file(lora_dir / "style.safetensors")
    # A kohya to_out bias change alone: A1111 and diffusers do not read it (README's table).
    tensors["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0.diff_b"] = torch.zeros(64)
    save_file(tensors, tmp_path / "with_bias.safetensors")
    before = list(tiny.unet.state_dict())
    options = gen.GenerateOptions(prompt="<lora:with_bias>", out=tmp_path / "o", lora_dir=tmp_path, steps=1, n=1)
    with pytest.raises(ValueError, match=r"^<lora:with_bias>: diffusers' load_lora_weights refused .*with_bias") as err:
        gen.run(gen.plan(options), tiny)
    assert "\n" not in str(err.value)
    assert list(tiny.unet.state_dict()) == before
    assert not (tmp_path / "o").exists()


def attention_kv_lora(tiny, layout: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rank-2 changes of every attention layer's to_k / to_v, the same numbers in PEFT's layout (`unet.X.to_k.lora_A`)
    or in the attention-processor layout of diffusers 0.17-0.20 (`unet.X.processor.to_k_lora.down`); `bare`: that
    layout without the `unet.` prefix, as diffusers' first scripts wrote it (its loader no longer places those)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in tiny.unet.named_modules():
        if not name.endswith((".attn1", ".attn2")):
            continue
        for proj in ("to_k", "to_v"):
            linear = getattr(module, proj)
            down = torch.randn(2, linear.in_features, generator=generator) * 0.3
            up = torch.randn(linear.out_features, 2, generator=generator) * 0.3
            if layout == "peft":
                tensors |= {f"unet.{name}.{proj}.lora_A.weight": down, f"unet.{name}.{proj}.lora_B.weight": up}
            else:
                prefix = "" if layout == "bare" else "unet."
                tensors |= {
                    f"{prefix}{name}.processor.{proj}_lora.down.weight": down,
                    f"{prefix}{name}.processor.{proj}_lora.up.weight": up,
                }
    return tensors


def test_loras_in_diffusers_attention_processor_layout_are_read_as_its_loader_reads_them(tiny, dirs, tmp_path) -> None:
    """A LoRA from diffusers 0.17-0.20 (attention-processor keys) is checked and applied like the same
    numbers in PEFT's layout: the same image, unlike the base's; its widths are checked too."""
    hn_dir, _ = dirs
    save_file(attention_kv_lora(tiny, "peft"), tmp_path / "peft.safetensors")
    save_file(attention_kv_lora(tiny, "processor"), tmp_path / "processor.safetensors")

    def image(prompt: str, out: str) -> np.ndarray:
        options = gen.GenerateOptions(
            prompt=prompt, out=tmp_path / out, hypernetwork_dir=hn_dir, lora_dir=tmp_path, steps=3, n=1
        )
        (path,) = gen.run(gen.plan(options), tiny)
        return np.asarray(Image.open(path).convert("RGB")).astype(int)

    peft = image("a red circle <lora:peft>", "p")
    assert np.array_equal(image("a red circle <lora:processor>", "o"), peft)
    assert np.abs(peft - image("a red circle", "b")).max() > 10
    # a file diffusers' loader takes nothing from: one line, not a silent no-op or set_adapters' own error
    save_file(attention_kv_lora(tiny, "bare"), tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match=r"^<lora:bare>: diffusers' load_lora_weights found no layer of this model"):
        image("a red circle <lora:bare>", "n")
    assert not (tmp_path / "n").exists()
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora"
    wrong = {f"{layer}.down.weight": torch.zeros(2, 768), f"{layer}.up.weight": torch.zeros(32, 2)}
    save_file(wrong, tmp_path / "sd15_processor.safetensors")
    options = gen.GenerateOptions(prompt="<lora:sd15_processor>", out=tmp_path / "x", lora_dir=tmp_path)
    with pytest.raises(ValueError, match=r"reading a text context of width \[768\], but model tiny's is 48"):
        gen.plan(options)


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**_: object) -> None:
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(gen, "load_components", refuse)


@pytest.fixture
def bad_dir(tmp_path: Path, dirs) -> Path:
    """A LoRA folder with one good file and the kinds of bad ones."""
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "style.safetensors").write_bytes((dirs[1] / "style.safetensors").read_bytes())
    sd1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # cross-attention reading 768
    save_file({f"{sd1}.lora_down.weight": torch.zeros(4, 768), f"{sd1}.lora_up.weight": torch.zeros(320, 4)},
              folder / "sd15_style.safetensors")  # fmt: skip
    files.save_hypernetwork(randomised(RELU, TINY_WIDTHS, seed=3), folder / "a_hypernetwork.safetensors")
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    return folder


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a <lora:nope:0.8>", r"<lora:nope>: no nope.safetensors in .*; found: a_hypernetwork, broken, sd15_style, st"),
        ("a <lora:style:lots>", r"prompt tag <lora:style:lots>: multiplier 'lots' is not a number"),
        ("a <lora:style:inf>", r"multiplier 'inf' is not allowed; use a finite number"),
        ("a <lora:style:1:0.5>", r"expected <lora:NAME> or <lora:NAME:MULTIPLIER> \(separate text-encoder"),
        (
            "a <lora:sd15_style>",
            r"<lora:sd15_style>: .*sd15_style.safetensors changes cross-attention layers reading "
            r"a text context of width \[768\], but model tiny's is 48; it was made for another model",
        ),  # fmt: skip
        ("a <lora:a_hypernetwork>", r"holds no LoRA weights \(no lora_down / lora_A keys\)"),
        ("a <lora:broken>", r"<lora:broken>: .*broken.safetensors is not a readable safetensors file"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_the_model_loads(
    bad_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_load: None, prompt: str, message: str
) -> None:
    argv = ["generate", prompt, "--lora-dir", str(bad_dir), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hyperlit generate: error: ") and "\n" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_lora_tag_needs_a_lora_dir_that_exists(tmp_path: Path, no_model_load: None) -> None:
    with pytest.raises(ValueError, match=r"--lora-dir is not set, but the prompt asks for <lora:x>"):
        gen.plan(gen.GenerateOptions(prompt="a <lora:x>", out=tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match=r"--lora-dir: .*missing is not a folder"):
        gen.plan(gen.GenerateOptions(prompt="a <lora:x>", out=tmp_path / "o", lora_dir=tmp_path / "missing"))


def test_sdxl_family_lora_tag_matches_its_hypernetwork(tmp_path) -> None:
    """The tiny SDXL-shaped folder (two text encoders, time_ids) through diffusers' SDXL loader. The diffusers layout
    carries V's constant as a bias, which SDXL needs for exactness (its text context skips the final norm, README);
    kohya's SDXL names are checked against diffusers' converter in tests/test_lora.py."""
    from helpers.tiny_sdxl import write_folder

    from hyperlit.lora import command

    family = FAMILIES["tiny_sdxl"]
    folder = write_folder(tmp_path / "model")
    components = load_components(family="tiny_sdxl", path=str(folder))  # once, for the conversion and the images
    hn = randomised(LINEAR, [*family.attention_widths, family.context_dim], seed=1)
    with torch.no_grad():
        for p in hn.parameters():
            p.mul_(0.5)
    (tmp_path / "hn").mkdir(), (tmp_path / "lora").mkdir()
    files.save_hypernetwork(hn, tmp_path / "hn" / "xl.pt")
    out = tmp_path / "lora" / "xl.safetensors"
    options = command.ToLoraOptions(tmp_path / "hn" / "xl.pt", out, model="tiny_sdxl", model_path=str(folder),
                                    energy=1.0, format="diffusers", dtype="float32")  # fmt: skip
    command.run(command.plan(options), components)

    def image(prompt: str, out: str) -> np.ndarray:
        options = gen.GenerateOptions(prompt=prompt, out=tmp_path / out, hypernetwork_dir=tmp_path / "hn",
                                      lora_dir=tmp_path / "lora", model="tiny_sdxl", model_path=str(folder), steps=2,
                                      n=1)  # fmt: skip
        (path,) = gen.run(gen.plan(options), components)
        return np.asarray(Image.open(path).convert("RGB")).astype(int)

    hypernet, base = image("a red circle <hypernet:xl:0.7>", "h"), image("a red circle", "b")
    assert np.abs(hypernet - base).max() > 40
    assert np.abs(image("a red circle <lora:xl:0.7>", "l") - hypernet).max() <= 2
