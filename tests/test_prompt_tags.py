"""A1111's <hypernet:NAME:MULT> and <lora:NAME:MULT> prompt tags: parsed in order, removed from the text, multiplier 1
when missing."""

from __future__ import annotations

import pytest

from hyperlit.prompt_tags import HypernetTag, LoraTag, parse_prompt


@pytest.mark.parametrize(
    ("prompt", "text", "tags"),
    [
        ("a blue square <hypernet:my_style:0.8>", "a blue square", [("my_style", 0.8)]),
        # several tags, in prompt order, each with its own multiplier; a tag may open the prompt
        ("<hypernet:anime:0.5>a cat, <hypernet:ink-2000:1.2>", "a cat,", [("anime", 0.5), ("ink-2000", 1.2)]),
        # missing multiplier = 1, negative allowed
        (
            "masterpiece <hypernet:foo> portrait <hypernet:bar:-0.25>",
            "masterpiece portrait",
            [("foo", 1.0), ("bar", -0.25)],
        ),
        # spaces around the tag and inside it
        ("a dog ,  <hypernet: my style : 0.7 >  , park", "a dog , , park", [("my style", 0.7)]),
        # the same network twice stacks twice
        ("<hypernet:x:1><hypernet:x:0.5>", "", [("x", 1.0), ("x", 0.5)]),
        ("no tags here, (weights:1.2)", "no tags here, (weights:1.2)", []),
    ],
)
def test_parse(prompt: str, text: str, tags: list[tuple[str, float]]) -> None:
    parsed = parse_prompt(prompt)
    assert parsed.text == text
    assert parsed.hypernetworks == tuple(HypernetTag(name, mult) for name, mult in tags)
    assert parsed.other_tags == ()


def test_lora_tags_are_parsed_apart_from_hypernetwork_tags() -> None:
    parsed = parse_prompt("<lora:detail:0.6>a cat <hypernet:h:0.3>, <lora: ink 2 > <lora:detail:-1>")
    assert parsed.text == "a cat ,"
    assert parsed.loras == (LoraTag("detail", 0.6), LoraTag("ink 2", 1.0), LoraTag("detail", -1.0))
    assert parsed.hypernetworks == (HypernetTag("h", 0.3),)
    assert parsed.other_tags == ()


def test_other_network_types_are_removed_and_reported() -> None:
    parsed = parse_prompt("a cat <lyco:detail:0.6> <hypernet:h:0.3>")
    assert parsed.text == "a cat"
    assert parsed.other_tags == ("<lyco:detail:0.6>",)
    assert parsed.hypernetworks == (HypernetTag("h", 0.3),)
    assert parsed.loras == ()


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("<hypernet:foo:strong>", "multiplier 'strong' is not a number"),
        ("<hypernet:foo:nan>", "use a finite number"),
        ("<hypernet: :1>", "name is empty"),
        ("<hypernet:foo:1:2>", "expected <hypernet:NAME>"),
        ("<lora:foo:1:0.5>", "expected <lora:NAME> or <lora:NAME:MULTIPLIER> \\(separate text-encoder"),
        ("<lora::1>", "the LoRA name is empty"),
        ("<lora:foo:x>", "multiplier 'x' is not a number"),
    ],
)
def test_bad_tags_name_the_tag(prompt: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        parse_prompt(prompt)
    assert prompt.split(">")[0] in str(err.value)
