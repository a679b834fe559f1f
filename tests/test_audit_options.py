"""The one-line messages of `hyperlit/errors.py` and `hyperlit/options.py` (the `options` mutation set), word for
word: Hydra's composition mistakes (real ones from conf/, and the fallbacks for texts Hydra 1.3 does not write),
instantiate failures, torch's refusal text, `build_options` and the option checks' grammar. The key lists in the
expected lines come from the composed config itself."""

from __future__ import annotations

import fractions
import pickle
from dataclasses import dataclass, field

import pytest
import torch
from helpers.config import compose_config
from hydra.errors import ConfigCompositionException, HydraException, InstantiationException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hyperlit.errors import bad_input_message, hydra_message, strip_unsafe_advice
from hyperlit.options import build_options, check_choice, check_min, close_matches


def hydra_error(overrides: list[str], config: str = "train", **kwargs) -> str:
    with pytest.raises(HydraException) as err:
        compose_config(config, overrides, **kwargs)
    return hydra_message(err.value)


def public_keys(node) -> str:
    return ", ".join(sorted(k for k in node if not k.startswith("_")))


def test_an_unknown_nested_key_names_its_group_and_the_groups_keys() -> None:
    keys = public_keys(compose_config("train").callbacks.validation)
    assert keys == "every, timesteps"  # `_target_` is not offered
    assert hydra_error(["callbacks.validation.evry=5"]) == (
        "callbacks.validation.evry=5: no such key; did you mean callbacks.validation.every? "
        f"keys of callbacks.validation: {keys}"
    )
    optimizer = public_keys(compose_config("train").train.optimizer)
    assert (
        hydra_error(["train.optimizer.zzz=1"])
        == f"train.optimizer.zzz=1: no such key; keys of train.optimizer: {optimizer}"
    )


def test_an_unknown_top_level_key_lists_the_top_level_keys() -> None:
    message = hydra_error(["seeed=1"])
    assert message.startswith("seeed=1: no such key; did you mean seed? top-level keys: ")
    listed = message.split("top-level keys: ")[1].split(", ")
    assert listed == sorted(listed) and set(compose_config("train")) <= set(listed)
    assert hydra_error(["qqqq=1"]).startswith("qqqq=1: no such key; top-level keys: callbacks, ")


def test_an_unknown_option_of_a_nested_group_and_no_close_match() -> None:
    assert hydra_error(["hypernet=zzzzzz"]) == (
        "hypernet=zzzzzz: no such option; allowed: linear_121, relu_121, relu_1221_ln, swish_121, swish_121_dropout"
    )
    message = hydra_error(["hydra/launcher=nosuch"])  # the group hydra/launcher, written with a dot like a key
    assert message.startswith("hydra.launcher=nosuch: no such option; allowed: ") and "did you mean" not in message
    allowed = message.split("allowed: ")[1].split(", ")
    assert "basic" in allowed and allowed == sorted(allowed)


def test_a_key_the_schema_refuses_keeps_omegaconfs_reason_without_its_details() -> None:
    # Hydra's own (structured) config: the refusal is not "not in struct", so its reason is passed on, one line,
    # without OmegaConf's full_key / reference_type / object_type lines
    message = hydra_error(["hydra.job.nosuch=1"], return_hydra_config=True)
    assert message == "hydra.job.nosuch=1: Key 'nosuch' not in 'JobConf'"


def test_a_missing_primary_config_drops_the_search_path() -> None:
    assert hydra_error([], config="nosuch") == (
        "Cannot find primary config 'nosuch'. Check that it's in your config search path."
    )
    assert hydra_error(["~train.nokey"]) == "Could not delete from config. 'train.nokey' does not exist."


class NoParent(Exception):
    """A cause without OmegaConf's parent_node."""


@pytest.mark.parametrize(
    ("text", "cause", "expected"),
    [
        # an append refusal without Hydra's "Either remove + prefix" line: the key stands for the override
        ("Could not append to config. An item is already at 'train.max_steps'.", None,
         "+train.max_steps: train.max_steps is already set; drop the + to change it (train.max_steps)"),
        ("Could not append to config. An item is already at 'X1'.\nEither remove + prefix: 'X1=2'\n", None,
         "+X1=2: X1 is already set; drop the + to change it (X1=2)"),
        # an override refusal without a cause, without the append advice, or with a cause that is no OmegaConf error
        ("Could not override 'a.b'.\nTo append to your config use +a.b=1", None, "a.b=1: cannot be overridden"),
        ("Could not override 'a.b'.", None, "a.b: cannot be overridden"),
        ("Could not override 'a.b'.\nTo append to your config use +a.b=1", NoParent("Key 'b' is not in struct"),
         "a.b=1: Key 'b' is not in struct"),
    ],
)  # fmt: skip
def test_composition_fallbacks(text: str, cause: Exception | None, expected: str) -> None:
    err = ConfigCompositionException(text)
    err.__cause__ = cause
    assert hydra_message(err) == expected


def test_no_hydra_text_ever_suggests_a_plus_key() -> None:
    err = HydraException("Could not override 'a.b'.\nTo append to your config use +a.b=1")  # not a composition error
    assert hydra_message(err) == "Could not override 'a.b'."
    missing = MissingConfigException("Cannot find primary config 'x'.\n\nConfig search path:\n\tprovider=main")
    assert hydra_message(missing) == "Cannot find primary config 'x'."


def test_instantiate_failures_name_the_config_key() -> None:
    cfg = OmegaConf.create({"train": {"optimizer": {"_target_": "no.such.Thing"}}})
    with pytest.raises(HydraException) as err:
        instantiate(cfg.train.optimizer)
    assert "full_key" in str(err.value)  # what the message must not show
    assert bad_input_message(err.value, cfg) == (
        "train.optimizer._target_: Error locating target 'no.such.Thing', set env var HYDRA_FULL_ERROR=1 to see "
        "chained exception."
    )


def test_option_check_messages() -> None:
    with pytest.raises(ValueError) as err:
        check_min("loss.fp16_fix.target", 0, 0, strict=True)
    assert str(err.value) == "loss.fp16_fix.target: 0 is not allowed; use a number > 0"
    with pytest.raises(ValueError) as err:
        check_min("disc.start", -1, 0)
    assert str(err.value) == "disc.start: -1 is not allowed; use a number >= 0"
    check_min("disc.start", 0, 0)  # the minimum itself is fine unless strict
    check_min("x", 0.5, 0, strict=True)
    with pytest.raises(ValueError) as err:
        check_choice("loss.kind", "mse", ("ft_ema", "fp16_fix", 3))
    assert str(err.value) == "loss.kind: 'mse' is not allowed; allowed: ft_ema, fp16_fix, 3"


def test_close_matches_are_at_most_two() -> None:
    assert close_matches("steps", ["stepz", "stepx", "stepy", "steps_", "other"]) == [
        "steps_",
        "stepz",
    ]  # 0.91, then the ties at 0.8 by name (difflib keeps the largest)
    assert close_matches("seed", ["seed", "seed", "speed"]) == ["seed", "speed"]  # duplicates counted once
    assert close_matches("zzz", ["seed"]) == []


SAFE_LOAD_END = (
    "which a safe (weights-only) load refuses; allowed: tensors only (convert the file to .safetensors with a tool you "
    "trust)"
)


def test_torchs_refusal_is_replaced_whole_also_at_the_start_of_the_message(tmp_path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"x": fractions.Fraction(1, 3)}, path)
    with pytest.raises(pickle.UnpicklingError) as err:
        torch.load(path, weights_only=True)
    text = str(err.value)
    assert text.startswith("Weights only load failed") and "weights_only" in text
    expected = f"it holds pickled objects beyond tensors (fractions.Fraction), {SAFE_LOAD_END}"
    assert strip_unsafe_advice(text) == expected
    assert (
        strip_unsafe_advice(f"model.path=x.ckpt: cannot be read ({text})")
        == f"model.path=x.ckpt: cannot be read: {expected}"
    )
    # a refusal that names no global (another unpickler error)
    assert strip_unsafe_advice("model.path=x.ckpt: Weights only load failed. Unsupported operand 81") == (
        f"model.path=x.ckpt: it is not a plain tensor file, {SAFE_LOAD_END}"
    )


def instantiation_error(full_key: str, cause: Exception) -> InstantiationException:
    err = InstantiationException(f"Error in call to target 'x.Y':\n{cause!r}\nfull_key: {full_key}")
    err.__cause__ = cause
    return err


def test_a_constructors_refusal_names_the_key_it_mentions_first() -> None:
    cfg = OmegaConf.create(
        {"trainer": {"_target_": "lightning.Trainer", "precision": "8-mixed", "devices": 1}, "seed": 3}
    )
    # Lightning's wording starts with a capital: keys are found whatever their case
    err = instantiation_error("trainer", ValueError("Precision '8-mixed' is invalid; devices are fine"))
    assert bad_input_message(err, cfg) == "trainer.precision: Precision '8-mixed' is invalid; devices are fine"
    # `_target_` is never the key named, even when the message mentions it first
    err = instantiation_error("trainer", TypeError("_target_ Trainer got devices=-1"))
    assert bad_input_message(err, cfg) == "trainer.devices: _target_ Trainer got devices=-1"
    # no key of the group in the message: the group; a full_key that is not a group (a plain value): the key
    assert (
        bad_input_message(instantiation_error("trainer", ValueError("out of memory")), cfg) == "trainer: out of memory"
    )
    assert bad_input_message(instantiation_error("seed", ValueError("use 0 or more")), cfg) == "seed: use 0 or more"
    assert bad_input_message(instantiation_error("nothing.here", ValueError("bad")), cfg) == "nothing.here: bad"


def test_a_top_level_target_and_a_cause_holding_torchs_refusal() -> None:
    with pytest.raises(HydraException) as err:
        instantiate(OmegaConf.create({"_target_": "no.such.Thing"}))  # the root: Hydra writes no full_key
    assert bad_input_message(err.value) == (
        "_target_: Error locating target 'no.such.Thing', set env var HYDRA_FULL_ERROR=1 to see chained exception."
    )
    refusal = "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed"
    cfg = OmegaConf.create({"model": {"path": "x.ckpt"}})
    err = instantiation_error("model", ValueError(f"model.path=x.ckpt: cannot be read ({refusal})"))
    assert (
        bad_input_message(err, cfg)
        == f"model.path=x.ckpt: cannot be read: it is not a plain tensor file, {SAFE_LOAD_END}"
    )


def test_a_worker_traceback_without_a_message_line_is_passed_on() -> None:
    text = (
        "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n    raise ValueError()\n'
    )
    assert bad_input_message(ValueError(text)) == (
        'Caught ValueError in DataLoader worker process 0.; Original Traceback (most recent call last):; File "x.py", '
        "line 1, in <module>; raise ValueError()"
    )


@dataclass
class Inner:
    rate: float = 1.0

    def __post_init__(self) -> None:
        check_min("inner.rate", self.rate, 0, strict=True)


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    weights: dict[str, float] = field(default_factory=dict)  # a mapping that is a value, not a group
    name: str = "x"


def test_build_options_names_unknown_keys_with_their_group() -> None:
    with pytest.raises(ValueError) as err:
        build_options(Outer, {"nme": "a"})
    assert str(err.value) == "nme: 'nme' is not allowed; allowed keys: inner, name, weights"
    with pytest.raises(ValueError) as err:
        build_options(Outer, {"inner": {"rat": 2}, "name": "a"}, "task.")
    assert str(err.value) == "task.inner.rat: 'rat' is not allowed; allowed keys: rate"
    with pytest.raises(ValueError) as err:
        build_options(Outer, {"extra": 1, "nme": 1}, ignore=("extra",))  # ignored keys are allowed, and listed
    assert str(err.value) == "nme: 'nme' is not allowed; allowed keys: extra, inner, name, weights"


def test_build_options_builds_groups_and_keeps_mapping_values() -> None:
    built = build_options(Outer, {"inner": {"rate": 2.5}, "weights": {"a": 1.0}, "extra": 3}, ignore=["extra"])
    assert built == Outer(inner=Inner(rate=2.5), weights={"a": 1.0})
    assert build_options(Outer, None) == Outer()
    ready = Inner(rate=4.0)  # an already built group is taken as it is
    assert build_options(Outer, {"inner": ready}).inner is ready


def test_build_options_reports_a_type_error_under_its_group() -> None:
    with pytest.raises(ValueError) as err:
        build_options(Outer, {"inner": {"rate": [1]}}, "loss.")
    assert str(err.value) == "loss.inner: '<' not supported between instances of 'list' and 'int'"
    with pytest.raises(ValueError) as err:
        build_options(Inner, {"rate": "fast"})  # no prefix: the class names the group
    assert str(err.value) == "Inner: '<' not supported between instances of 'str' and 'int'"
    with pytest.raises(ValueError) as err:
        build_options(Inner, {"rate": 0})
    assert str(err.value) == "inner.rate: 0 is not allowed; use a number > 0"


def test_one_line_joins_lines_without_bullets_or_blank_lines() -> None:
    text = (
        "hypernet.init_from=x.pt: the file does not fit this run:\n  - hypernet.activation: the config says 'relu'\n"
        "\n  -  \n-----\nXLA devices: none\n"
    )
    assert bad_input_message(ValueError(text)) == (
        "hypernet.init_from=x.pt: the file does not fit this run:; hypernet.activation: the config says 'relu'; "
        "XLA devices: none"
    )


def test_advice_to_load_unsafely_is_dropped_also_without_torchs_header() -> None:
    assert (
        strip_unsafe_advice("cannot read x.ckpt. Re-run with weights_only=False to load it.") == "cannot read x.ckpt."
    )
    refusal = "Weights only load failed. Unsupported operand 81"
    assert strip_unsafe_advice(f"model.path=/models/X ({refusal})") == (
        f"model.path=/models/X: it is not a plain tensor file, {SAFE_LOAD_END}"
    )


def test_an_empty_message_names_the_error_type() -> None:
    assert bad_input_message(FileNotFoundError()) == "FileNotFoundError"
    assert bad_input_message(KeyError("x")) is None  # not bad input: a bug, raised as it is
