"""The preview callback's schedule and bookkeeping, with a stand-in trainer and module and the grid itself
recorded instead of drawn: which steps get a grid, the fallback prompt (the first caption trained on), the TAESD
check at set-up on rank 0 only, the end-of-run grid and the warning that nothing is being learned."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest
from helpers.preview_task import strong_hypernetwork_task
from PIL import Image

from hyperlit.callbacks.change import preview_change, val_text
from hyperlit.callbacks.preview import PreviewImages
from hyperlit.callbacks.validation import ValidationLoss
from hyperlit.models import FAMILIES
from hyperlit.sampling import SampleSettings
from hyperlit.tasks.hypernetwork.module import HypernetworkTask


@pytest.fixture(scope="module")
def module() -> HypernetworkTask:
    """The tiny model with a hypernetwork whose weights are large enough to change every image."""
    return strong_hypernetwork_task()


def trainer(step: int = 0, rank_zero: bool = True, max_steps: int = 0, held_out=None) -> SimpleNamespace:
    datamodule = SimpleNamespace(held_out=held_out) if held_out is not None else None
    return SimpleNamespace(global_step=step, is_global_zero=rank_zero, max_steps=max_steps, datamodule=datamodule)


def recording(tmp_path, **kwargs) -> tuple[PreviewImages, list[int]]:
    """A callback whose grids are recorded (the step each would be drawn at), not drawn."""
    callback = PreviewImages(str(tmp_path), **kwargs)
    steps: list[int] = []

    def draw(trainer, pl_module):
        callback._last_step = trainer.global_step  # as the real grid does
        steps.append(trainer.global_step)

    callback._preview = draw
    return callback, steps


def test_grids_at_step_zero_and_every_n_steps_once_each(tmp_path):
    callback, steps = recording(tmp_path, every=3)
    for step in (0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 9):  # a repeated step: gradient accumulation's micro-batches
        callback.on_train_batch_start(trainer(step), None, {"caption": ["a"]}, 0)
    assert steps == [0, 3, 6, 9]
    callback.on_train_end(trainer(9), None)  # the last grid was at the last step: not drawn again
    assert steps == [0, 3, 6, 9]
    callback.on_train_end(trainer(11), None)
    assert steps == [0, 3, 6, 9, 11]


def test_every_zero_draws_no_grid_during_training_and_other_ranks_none_at_all(tmp_path):
    callback, steps = recording(tmp_path, every=0)
    for step in range(4):
        callback.on_train_batch_start(trainer(step), None, {}, 0)
    assert steps == []
    callback.on_train_end(trainer(4), None)  # at_end: one grid
    assert steps == [4]
    other, other_steps = recording(tmp_path, every=2)
    for step in range(4):
        other.on_train_batch_start(trainer(step, rank_zero=False), None, {}, 0)
    other.on_train_end(trainer(5, rank_zero=False), None)
    assert other_steps == []
    quiet, quiet_steps = recording(tmp_path, every=2, at_end=False)
    quiet.on_train_end(trainer(5), None)
    quiet.on_train_end(trainer(6), None)  # not at the end option, but a scheduled step
    assert quiet_steps == [6]


def test_without_prompts_or_held_out_images_the_grid_shows_the_first_caption_trained_on(tmp_path):
    callback, _ = recording(tmp_path, every=100)
    assert callback.grid_prompts(trainer()) == [""]
    callback.on_train_batch_start(trainer(1), None, ("not", "a", "dict"), 0)  # a batch of another shape
    callback.on_train_batch_start(trainer(2), None, {"latents": None}, 0)  # a batch without captions
    callback.on_train_batch_start(trainer(3), None, {"caption": []}, 0)
    assert callback.grid_prompts(trainer()) == [""]
    callback.on_train_batch_start(trainer(4), None, {"caption": ["a red circle", "a blue square"]}, 0)
    callback.on_train_batch_start(trainer(5), None, {"caption": ["a green star"]}, 0)
    assert callback.grid_prompts(trainer()) == ["a red circle"]
    held = [SimpleNamespace(caption="held one"), SimpleNamespace(caption="held two")]
    assert callback.grid_prompts(trainer(held_out=held)) == ["held one", "held two"]
    chosen, _ = recording(tmp_path, prompts=["mine"])
    assert chosen.grid_prompts(trainer(held_out=held)) == ["mine"]


@pytest.mark.parametrize(("has_decoder", "rank_zero", "checked"), [(True, True, True), (True, False, False),
                                                                    (False, True, False)])  # fmt: skip
def test_the_tiny_decoder_is_checked_at_set_up_on_rank_zero_only(tmp_path, has_decoder, rank_zero, checked):
    callback = PreviewImages(str(tmp_path))
    seen = []
    callback.decoder = object() if has_decoder else None  # a found TAESD (its files are read at the first grid)
    callback.latent_decoder = seen.append
    module = SimpleNamespace(components=object())
    callback.setup(trainer(rank_zero=rank_zero), module, "fit")
    assert seen == ([module.components] if checked else [])


def test_nothing_learned_is_said_once_from_half_way_and_only_under_the_threshold(tmp_path, caplog):
    callback = PreviewImages(str(tmp_path), min_change=2.0)
    module = SimpleNamespace(learning_rate=1e-5)
    caplog.set_level(logging.WARNING)
    assert not callback.check_learning(trainer(max_steps=100), module, 0, 0.0, "")  # step 0: untrained anyway
    assert not callback.check_learning(trainer(max_steps=100), module, 49, 0.0, "")  # before half-way
    assert not callback.check_learning(trainer(max_steps=100), module, 50, 2.0, "")  # at the threshold: changing
    assert callback.check_learning(trainer(max_steps=100), module, 50, 1.5, "")
    assert not callback.check_learning(trainer(max_steps=100), module, 60, 0.5, "")  # said once
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    unbounded = PreviewImages(str(tmp_path), min_change=2.0)  # max_steps unknown (0): any step after 0
    assert unbounded.check_learning(trainer(max_steps=0), module, 1, 1.0, "")
    off = PreviewImages(str(tmp_path))  # min_change null: never
    assert not off.check_learning(trainer(max_steps=10), module, 10, 0.0, "")


@pytest.mark.parametrize("multipliers", [[0.0, 1.0], [0.5], [1.0, 0.0, 0.5]])
def test_change_is_multiplier_0_against_1_whatever_columns_the_grid_has(module, tmp_path, multipliers):
    prompts = ["a red circle", "a blue square"]
    preview = PreviewImages(str(tmp_path), prompts=prompts, multipliers=multipliers, steps=1)
    cells = preview.render(module, prompts)
    without = [row[0] for row in preview.render(module, prompts, [0.0])]
    with_network = [row[0] for row in preview.render(module, prompts, [1.0])]
    expected = preview_change(without, with_network)
    assert expected > 0
    assert preview.change(module, prompts, cells) == pytest.approx(expected, rel=1e-12)


class Metrics:
    """A logger that records what it is given."""

    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logged.append((metrics, step))


def test_a_grid_is_written_logged_and_described_in_one_line(module, tmp_path, caplog):
    validation = ValidationLoss()
    validation.scores = {0: 0.25, 4: 0.125}
    metrics = Metrics()
    run = SimpleNamespace(global_step=4, is_global_zero=True, max_steps=0, datamodule=None,
                          loggers=[metrics], callbacks=[validation])  # fmt: skip
    preview = PreviewImages(str(tmp_path / "images"), prompts=["a green star"], multipliers=[0.0, 1.0], steps=1,
                            min_change=1000.0)  # fmt: skip
    caplog.set_level(logging.INFO, logger="hyperlit.callbacks.preview")
    preview._preview(run, module)
    path = tmp_path / "images" / "hn-4.png"
    assert preview.written == [path] and Image.open(path).format == "PNG"
    change = preview.changes[4]
    assert metrics.logged == [({"preview/change": change}, 4)]
    val = val_text(0.125, 0.25)
    lines = [r.getMessage() for r in caplog.records if r.name == "hyperlit.callbacks.preview"]
    assert re.fullmatch(
        re.escape(f"preview: grid {path} in ") + r"\d+\.\d s" + re.escape(f"; change {change:.2f} of 255 "
                                                                         f"(multiplier 0 vs 1), {val}"),
        lines[0],
    ), lines  # fmt: skip
    # the warning (min_change far above any change) names the same validation line
    assert preview.warned and val in lines[1]
    # the step is remembered: the same step's batch draws no second grid
    preview.on_train_batch_start(run, module, {}, 0)
    assert preview.written == [path]


SIZE_ADVICE = "is not allowed; use a positive multiple of 8"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": -1}, "callbacks.preview.every: -1 is not allowed; use 0 (off) or more"),
        ({"every": True}, "callbacks.preview.every: True is not allowed; use 0 (off) or more"),
        ({"every": 2.0}, "callbacks.preview.every: 2.0 is not allowed; use 0 (off) or more"),
        ({"steps": 0}, "callbacks.preview.steps: 0 is not allowed; use 1 or more"),
        ({"steps": True}, "callbacks.preview.steps: True is not allowed; use 1 or more"),
        ({"steps": 1.5}, "callbacks.preview.steps: 1.5 is not allowed; use 1 or more"),
        ({"multipliers": [0, True]},
         "callbacks.preview.multipliers: [0, True] is not allowed; use a non-empty list of numbers"),
        ({"multipliers": []}, "callbacks.preview.multipliers: [] is not allowed; use a non-empty list of numbers"),
        ({"min_change": -0.5},
         "callbacks.preview.min_change: -0.5 is not allowed; use a number >= 0 or null (no check)"),
        ({"min_change": True},
         "callbacks.preview.min_change: True is not allowed; use a number >= 0 or null (no check)"),
        ({"min_change": "1"},
         "callbacks.preview.min_change: '1' is not allowed; use a number >= 0 or null (no check)"),
        ({"resolution": 12}, f"callbacks.preview.resolution: 12 {SIZE_ADVICE}"),
    ],
)  # fmt: skip
def test_bad_options_are_one_line_errors_naming_the_key(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as error:
        PreviewImages(str(tmp_path), **kwargs)
    assert str(error.value) == message


def test_defaults_and_edge_values_that_are_allowed(tmp_path):
    preview = PreviewImages(str(tmp_path))
    assert (preview.every, preview.steps, preview.multipliers, preview.min_change) == (500, 20, [0.0, 0.5, 1.0], None)
    assert PreviewImages(str(tmp_path), min_change=0).min_change == 0.0
    assert PreviewImages(str(tmp_path), min_change=0.5).min_change == 0.5
    with pytest.raises(ValueError, match=r"^callbacks\.preview\.sampler: 'nope' is not allowed"):
        PreviewImages(str(tmp_path), sampler="nope")
    chosen = PreviewImages(str(tmp_path), steps=3, guidance_scale=5.0, sampler="euler", resolution=16)
    assert chosen.settings(SimpleNamespace(components=None)) == SampleSettings(3, 5.0, "euler", 16, 16)


def test_without_a_resolution_the_grid_is_drawn_at_the_models_own_size(tmp_path):
    """SD 2.x: 768 px for its v-prediction models, 512 px for the epsilon "base" ones (the scheduler's type)."""
    preview = PreviewImages(str(tmp_path), steps=2)
    sd2 = FAMILIES["sd21"]
    sizes = {}
    for prediction in ("v_prediction", "epsilon"):
        components = SimpleNamespace(family=sd2, prediction_type=prediction)
        sizes[prediction] = preview.settings(SimpleNamespace(components=components)).height
    assert sizes == {"v_prediction": sd2.native_resolution("v_prediction"), "epsilon": 512}
    assert sizes["v_prediction"] == 768
