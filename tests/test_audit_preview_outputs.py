"""What a preview grid leaves behind, with a stand-in trainer and no training run: the images and captions the
TensorBoard and wandb loggers receive, the grid of an EMA run, held-out prompts and a grid without multiplier 0 or 1,
the log line's time and TAESD note, the nothing-learned warning word for word, the TAESD decoder's one-line errors
and its fp32 decode, and the schedule across a resumed or continued run."""

from __future__ import annotations

import io
import logging
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.preview_task import strong_hypernetwork_task
from helpers.taesd import textured_taesd
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from hyperlit.callbacks.ema import EMA
from hyperlit.callbacks.preview import PreviewImages
from hyperlit.callbacks.validation import ValidationLoss
from hyperlit.tasks.hypernetwork.module import HypernetworkTask
from hyperlit.vae.taesd_layout import save_taesd_files

TAESD_WHAT = "a diffusers AutoencoderTiny folder or a madebyollin-layout <name>_decoder .safetensors/.pth"


@pytest.fixture(scope="module")
def module() -> HypernetworkTask:
    """The tiny model with a hypernetwork whose weights are large enough to change every image."""
    return strong_hypernetwork_task()


@pytest.fixture(scope="module")
def taesd_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("taesd")
    save_taesd_files(textured_taesd(1), root, "taesd")
    save_taesd_files(textured_taesd(2, latent_channels=16), root / "c16", "taesd")
    return root


def run(step: int = 4, loggers=(), callbacks=(), held_out=None, max_steps: int = 0) -> SimpleNamespace:
    """A stand-in trainer with what the callback reads."""
    datamodule = SimpleNamespace(held_out=held_out) if held_out is not None else None
    return SimpleNamespace(global_step=step, is_global_zero=True, max_steps=max_steps, datamodule=datamodule,
                           loggers=list(loggers), callbacks=list(callbacks))  # fmt: skip


def stand_in(strength: float = 0.05) -> SimpleNamespace:
    """A module as far as the callback reads it around the drawing (name, learning rate) and a `strength`."""
    return SimpleNamespace(strength=strength, learning_rate=1e-5, hypernetwork=SimpleNamespace(name="hn"))


def drawn_flat(preview: PreviewImages) -> PreviewImages:
    """The grid drawn without a model: every cell a flat grey of level len(prompt) + 100 * strength * multiplier,
    so the change between multiplier 0 and 1 is 100 * strength levels and each cell tells its prompt."""

    def render(pl_module, prompts, multipliers=None):
        columns = preview.multipliers if multipliers is None else multipliers
        level = [[int(len(p) + 100 * pl_module.strength * m) for m in columns] for p in prompts]
        return [[Image.new("RGB", (8, 8), (v, v, v)) for v in row] for row in level]

    preview.render = render
    return preview


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def preview_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hyperlit.callbacks.preview"]


def test_tensorboard_gets_the_written_grid_and_its_caption_at_the_grids_step(tmp_path):
    logger = TensorBoardLogger(str(tmp_path / "tb"), name="", version=0)
    preview = drawn_flat(PreviewImages(str(tmp_path / "images"), prompts=["a green star"], multipliers=[0.0, 1.0]))
    preview._preview(run(step=7, loggers=[logger]), stand_in())
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    images = events.Images("preview")
    assert [e.step for e in images] == [7]
    logged = pixels(Image.open(io.BytesIO(images[0].encoded_image_string)))
    written = pixels(Image.open(tmp_path / "images" / "hn-7.png"))
    assert logged.shape == written.shape and np.array_equal(logged, written)
    texts = events.Tensors("preview/caption/text_summary")
    assert [e.step for e in texts] == [7]
    caption = tensor_util.make_ndarray(texts[0].tensor_proto).item().decode()
    assert caption == "rows (prompts) 1: a green star; columns: multiplier 0, 1"


class RecordingRun:
    """Stands in for the wandb run: records what the logger sends it."""

    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log(self, data: dict) -> None:
        self.logged.append(data)


def test_wandb_gets_the_written_grid_and_its_caption_at_the_grids_step(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = WandbLogger(project="preview-test", offline=True)
    logger._experiment = RecordingRun()  # Lightning's own log_image builds the wandb.Image it would upload
    preview = drawn_flat(PreviewImages(str(tmp_path), prompts=["a green star"], multipliers=[0.0, 1.0]))
    preview._preview(run(step=3, loggers=[logger]), stand_in())
    sent, metrics = logger._experiment.logged  # the grid, then its change
    assert sorted(sent) == ["preview", "trainer/global_step"] and sent["trainer/global_step"] == 3
    assert metrics == {"preview/change": 5.0, "trainer/global_step": 3}
    (image,) = sent["preview"]
    assert np.array_equal(pixels(image.image), pixels(Image.open(tmp_path / "hn-3.png")))
    assert image._caption == "rows (prompts) 1: a green star; columns: multiplier 0, 1"


def test_an_ema_run_draws_the_averaged_weights_and_keeps_the_live_ones(module, tmp_path):
    """A shadow of zeros is a network that adds nothing: both columns equal, change 0; the live weights return."""
    ema = EMA()
    ema._init_shadow(module)
    assert ema.shadow
    for tensor in ema.shadow.values():
        tensor.zero_()
    live = {n: p.detach().clone() for n, p in module.named_parameters()}
    preview = PreviewImages(str(tmp_path), prompts=["a green star"], multipliers=[0.0, 1.0], steps=1, labels=False)
    preview._preview(run(step=5, callbacks=[ema]), module)
    assert preview.changes == {5: 0.0}
    grid = pixels(Image.open(tmp_path / "hn-5.png"))
    half = grid.shape[1] // 2
    assert np.array_equal(grid[:, :half], grid[:, half:])
    assert all(torch.equal(p, live[n]) for n, p in module.named_parameters())
    # the same callback without the EMA: the live network changes the image
    preview._preview(run(step=6), module)
    assert preview.changes[6] > 1.0


def test_held_out_prompts_and_a_grid_without_multiplier_0_or_1(tmp_path, caplog):
    """No prompts set: the held-out caption is drawn; the change still compares renders at 0 and 1 (5 levels)."""
    held = [SimpleNamespace(caption="a red circle")]
    preview = drawn_flat(PreviewImages(str(tmp_path), multipliers=[0.5], labels=False))
    caplog.set_level(logging.INFO, logger="hyperlit.callbacks.preview")
    started = time.perf_counter()
    preview._preview(run(step=2, held_out=held), stand_in())
    elapsed = time.perf_counter() - started
    level = len("a red circle") + 2  # int(12 + 100 * 0.05 * 0.5)
    assert np.array_equal(pixels(Image.open(tmp_path / "hn-2.png")), np.full((8, 8, 3), level, np.uint8))
    assert preview.changes == {2: 5.0}
    (line,) = preview_lines(caplog)
    seconds = float(re.search(r" in (\d+\.\d) s;", line).group(1))
    assert 0.0 <= seconds <= elapsed + 0.05  # the time this grid took, nothing else
    assert "TAESD" not in line


def test_the_log_line_says_when_the_tiny_decoder_draws(taesd_files, tmp_path, caplog):
    decoder = str(taesd_files / "taesd_decoder.safetensors")
    preview = drawn_flat(PreviewImages(str(tmp_path), prompts=["a"], multipliers=[0.0, 1.0], decoder=decoder))
    caplog.set_level(logging.INFO, logger="hyperlit.callbacks.preview")
    preview._preview(run(step=1), stand_in())
    (line,) = preview_lines(caplog)
    expected = re.escape(f"preview: grid {tmp_path / 'hn-1.png'} in ") + r"\d+\.\d s" + re.escape(
        " (TAESD decodes); change 5.00 of 255 (multiplier 0 vs 1), val/loss not computed (no held-out images)"
    )  # fmt: skip
    assert re.fullmatch(expected, line), line


def test_the_nothing_learned_warning_word_for_word(tmp_path, caplog):
    validation = ValidationLoss()
    validation.scores = {0: 0.25, 4: 0.125}
    preview = drawn_flat(PreviewImages(str(tmp_path), prompts=["a"], multipliers=[0.0, 1.0], min_change=6))
    caplog.set_level(logging.WARNING, logger="hyperlit.callbacks.preview")
    preview._preview(run(step=4, callbacks=[validation], max_steps=8), stand_in())
    assert preview_lines(caplog) == [
        "nothing is being learned: at step 4 the network changes the preview by 5.00 of 255 levels "
        "(below callbacks.preview.min_change=6), val/loss 0.125 (step 0: 0.25); raise train.learning_rate "
        "(now 1e-05) or train.max_steps (now 8)"
    ]
    # max_steps unknown reads as 0; a module without a learning rate shows "?"
    caplog.clear()
    other = PreviewImages(str(tmp_path), min_change=2)
    assert other.check_learning(run(max_steps=0), SimpleNamespace(), 3, 0.5, "val/loss 0.5")
    assert preview_lines(caplog) == [
        "nothing is being learned: at step 3 the network changes the preview by 0.50 of 255 levels "
        "(below callbacks.preview.min_change=2), val/loss 0.5; raise train.learning_rate (now ?) "
        "or train.max_steps (now 0)"
    ]


def test_the_validation_text_compares_with_step_zero_only_after_it():
    validation = ValidationLoss()
    validation.scores = {0: 0.25, 4: 0.125}
    trainer = run(callbacks=[validation])
    assert PreviewImages.val_line(trainer, 0) == "val/loss 0.25"
    assert PreviewImages.val_line(trainer, 4) == "val/loss 0.125 (step 0: 0.25)"
    assert PreviewImages.val_line(trainer, 2) == "val/loss not computed (no held-out images)"
    assert PreviewImages.val_line(run(), 4) == "val/loss not computed (no held-out images)"


def recording(tmp_path, **kwargs) -> tuple[PreviewImages, list[int]]:
    """A callback whose grids are recorded (the step each would be drawn at), not drawn."""
    callback = PreviewImages(str(tmp_path), **kwargs)
    steps: list[int] = []
    callback._preview = lambda trainer, pl_module: steps.append(trainer.global_step)
    return callback, steps


def test_a_resumed_run_starting_at_step_one_draws_it(tmp_path):
    callback, steps = recording(tmp_path, every=1)
    for step in (1, 1, 2):
        callback.on_train_batch_start(run(step), None, {}, 0)
    assert steps == [1, 2]


def test_a_continued_fit_draws_no_second_grid_of_the_step_the_last_one_ended_at(tmp_path):
    callback, steps = recording(tmp_path, every=5)
    callback.on_train_end(run(10), None)
    assert steps == [10]
    for step in (10, 11, 15):  # a second fit with the same callbacks, from the step the first ended at
        callback.on_train_batch_start(run(step), None, {}, 0)
    assert steps == [10, 15]


def four_channel_model() -> SimpleNamespace:
    """Components as far as the TAESD check reads them (a 4-channel VAE); no model is built."""
    return SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(latent_channels=4)))


def test_bad_decoders_are_one_line_errors_with_the_value_and_what_is_allowed(taesd_files, tmp_path):
    missing = str(tmp_path / "nope" / "taesd_decoder.safetensors")
    not_taesd = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, not_taesd)
    alone = tmp_path / "x_encoder.safetensors"
    alone.write_bytes((taesd_files / "taesd_encoder.safetensors").read_bytes())
    expected = {
        " ": f"callbacks.preview.decoder: ' ' is not allowed; use null (the model's VAE) or a path: {TAESD_WHAT}",
        5: f"callbacks.preview.decoder: 5 is not allowed; use null (the model's VAE) or a path: {TAESD_WHAT}",
        str(not_taesd): f"callbacks.preview.decoder={str(not_taesd)!r}: not a tiny autoencoder; use {TAESD_WHAT}, "
        "or null (the model's VAE)",
        str(alone): f"callbacks.preview.decoder={str(alone)!r}: a TAESD encoder alone; give its decoder "
        "(<name>_decoder.safetensors/.pth beside it), which brings this encoder along",
    }
    for value, message in expected.items():
        with pytest.raises(ValueError) as error:
            PreviewImages(str(tmp_path), decoder=value)
        assert str(error.value) == message
    with pytest.raises(FileNotFoundError) as error:
        PreviewImages(str(tmp_path), decoder=missing)
    assert str(error.value) == (
        f"callbacks.preview.decoder={missing!r}: not found (looked at {missing}); expected {TAESD_WHAT}"
    )


def test_a_taesd_for_other_latents_names_its_path_and_both_channel_counts(taesd_files, tmp_path):
    path = str(taesd_files / "c16" / "taesd_decoder.pth")
    preview = PreviewImages(str(tmp_path), decoder=path)
    with pytest.raises(ValueError) as error:
        preview.latent_decoder(four_channel_model())
    assert str(error.value) == (
        f"callbacks.preview.decoder={path!r}: a TAESD for 16 latent channels, but this model's VAE has 4; use the "
        "model family's TAESD or null"
    )


def test_a_decoder_file_replaced_after_the_check_still_fails_naming_the_key(taesd_files, tmp_path):
    path = tmp_path / "taesd_decoder.pth"
    path.write_bytes((taesd_files / "taesd_decoder.pth").read_bytes())
    preview = PreviewImages(str(tmp_path), decoder=str(path))  # checked: a TAESD decoder
    torch.save({"w": torch.zeros(2)}, path)  # replaced before the first grid reads it
    with pytest.raises(ValueError) as error:
        preview.latent_decoder(four_channel_model())
    assert str(error.value) == f"callbacks.preview.decoder={str(path)!r}: not a TAESD decoder in madebyollin's layout"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_tiny_decoder_decodes_half_precision_latents_in_fp32(taesd_files, tmp_path, dtype):
    """A pipeline run in half precision hands over half latents; the TAESD (fp32) decodes them as fp32."""
    preview = PreviewImages(str(tmp_path), decoder=str(taesd_files / "taesd_decoder.safetensors"))
    components = SimpleNamespace(vae=four_channel_model().vae, unet=SimpleNamespace(device=torch.device("cpu")))
    decode = preview.latent_decoder(components)
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        expected = textured_taesd(1).decode(z.float()).sample
        got = decode(z)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
