"""`callbacks.preview.decoder`: hypernetwork preview grids decoded by a TAESD, as A1111's live preview does; the cells
equal diffusers' AutoencoderTiny decode of the sampled latents, and a bad decoder fails at the door."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from helpers.config import QUIET_RUN, compose_config
from helpers.paths import REPO_ROOT
from helpers.scripts import load_script
from helpers.taesd import textured_taesd
from safetensors.torch import save_file

from hyperlit import models
from hyperlit.attention import attach_hypernetworks
from hyperlit.callbacks.preview import PreviewImages
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
from hyperlit.models import FAMILIES, load_components
from hyperlit.sampling import make_pipeline
from hyperlit.tasks.hypernetwork.module import HypernetworkTask
from hyperlit.vae.export import save_diffusers_folder
from hyperlit.vae.taesd_layout import save_taesd_files

PROMPT, SEED, STEPS = "a red circle", 0, 2


@pytest.fixture(scope="module")
def module() -> HypernetworkTask:
    components = load_components(family="tiny")
    sizes = [*FAMILIES["tiny"].attention_widths, FAMILIES["tiny"].context_dim]
    hn = Hypernetwork(HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu"), sizes=sizes, name="hn")
    with torch.no_grad():
        for p in hn.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    attach_hypernetworks(components.unet, [hn])
    return HypernetworkTask(hypernetwork=hn, components=components, optimizer=partial(torch.optim.AdamW))


@pytest.fixture(scope="module")
def taesd_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("taesd")
    model = textured_taesd(1)
    save_taesd_files(model, root, "taesd")
    save_diffusers_folder(model, root / "diffusers")
    save_taesd_files(textured_taesd(2, latent_channels=16), root / "c16", "taesd")
    return root


def tiny_decode_of_the_sampled_latents(module: HypernetworkTask, multiplier: float, folder) -> np.ndarray:
    """The preview's sampling run here with output_type="latent", decoded by AutoencoderTiny, 8 bits by hand."""
    components, hn = module.components, module.hypernetwork
    pipe = make_pipeline(components, "dpmpp_2m")
    generator = torch.Generator().manual_seed(SEED)
    latents = torch.randn((1, 4, 8, 8), generator=generator)  # the tiny model: 64 px, factor 8
    hn.eval()
    hn.multiplier = multiplier
    try:
        out = pipe(
            prompt_embeds=components.encode_text([PROMPT]),
            negative_prompt_embeds=components.encode_text([""]),
            height=64, width=64, num_inference_steps=STEPS, guidance_scale=7.0,
            latents=latents, generator=generator, output_type="latent",
        ).images  # fmt: skip
    finally:
        hn.multiplier = 1.0
        hn.train()
    tiny = AutoencoderTiny.from_pretrained(folder).eval()
    with torch.no_grad():
        image = tiny.decode(out).sample[0].permute(1, 2, 0).numpy().astype(np.float64)
    return np.round(np.clip(image / 2 + 0.5, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("name", ["taesd_decoder.safetensors", "diffusers"])
def test_preview_cells_are_the_tiny_decoders_images(name, module, taesd_files, tmp_path) -> None:
    preview = PreviewImages(
        str(tmp_path), prompts=[PROMPT], multipliers=[0, 1], steps=STEPS, decoder=str(taesd_files / name)
    )
    cells = preview.render(module, preview.prompts)
    for column, multiplier in enumerate((0.0, 1.0)):
        expected = tiny_decode_of_the_sampled_latents(module, multiplier, taesd_files / "diffusers")
        assert np.array_equal(np.asarray(cells[0][column].convert("RGB")), expected)
    plain = PreviewImages(str(tmp_path), prompts=[PROMPT], multipliers=[1], steps=STEPS).render(module, [PROMPT])
    assert not np.array_equal(np.asarray(plain[0][0]), np.asarray(cells[0][1]))  # not the VAE's image


def test_a_taesd_for_other_latents_is_refused_before_the_first_grid(module, taesd_files, tmp_path) -> None:
    preview = PreviewImages(str(tmp_path), decoder=str(taesd_files / "c16" / "taesd_decoder.pth"))
    with pytest.raises(ValueError, match=r"callbacks.preview.decoder=.*16 latent channels.*has 4"):
        preview.latent_decoder(module.components)


def _bad_decoders(root, tmp_path) -> dict[str, str]:
    not_taesd = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, not_taesd)
    alone = tmp_path / "x_encoder.safetensors"
    alone.write_bytes((root / "taesd_encoder.safetensors").read_bytes())
    return {
        "missing": str(tmp_path / "nope" / "taesd_decoder.safetensors"),
        "not a taesd": str(not_taesd),
        "encoder alone": str(alone),
        "empty": "' '",
    }


@pytest.mark.parametrize("case", ["missing", "not a taesd", "encoder alone", "empty"])
def test_a_bad_decoder_is_one_line_naming_the_key_before_any_model_loads(
    case, taesd_files, tmp_path, monkeypatch, capsys
) -> None:
    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(models, "load_components", refuse)
    monkeypatch.delenv("HYPERLIT_DEBUG", raising=False)
    value = _bad_decoders(taesd_files, tmp_path)[case]
    cfg = compose_config("train", [f"paths.output_dir={tmp_path}", *QUIET_RUN, f"callbacks.preview.decoder={value}"])
    with pytest.raises(SystemExit) as exit_info:
        load_script(REPO_ROOT / "train.py", "hyperlit_train_entry").entry(cfg)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hyperlit: error:")]
    assert exit_info.value.code == 2 and len(lines) == 1, err
    assert lines[0].startswith("hyperlit: error: callbacks.preview.decoder"), lines[0]
    assert "Traceback" not in err
