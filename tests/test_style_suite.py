"""benchmarks/style_suite.py: the plain folder command, the judging and the table it writes; the slow test runs it."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
from helpers.scripts import load_script
from PIL import Image

from hyperlit.demo.shapes import random_scene
from hyperlit.demo.styles import STYLES, render

REPO = Path(__file__).resolve().parents[1]


def suite():
    return load_script(REPO / "benchmarks" / "style_suite.py")


def test_the_training_command_is_the_plain_folder_command_plus_place_seed_and_extras(tmp_path):
    command = suite().train_command(tmp_path / "d", "vignette", tmp_path / "run", 7, ["train.max_steps=5"])
    assert command[1:] == [
        str(REPO / "train.py"), "data=folder", f"data.path={tmp_path / 'd'}", "data.resolution=64",
        "data.batch_size=4", "hypernet.name=vignette", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}", "seed=7",
        "train.max_steps=5",
    ]  # fmt: skip
    assert "seed=" not in " ".join(suite().train_command(tmp_path, "x", tmp_path, None, []))


def test_goal_is_the_issues():
    goal = suite().goal_met
    assert goal(0.2, 0.7, 0.7) and not goal(0.21, 0.9, 0.9) and not goal(0.0, 0.69, 0.9)
    assert not goal(0.0, 0.9, 0.69)


def test_the_summary_tells_expected_misses_from_unexpected_ones():
    ss = suite()

    def row(style: str, met: bool, limit: str = ""):  # noqa: ANN202
        return ss.StyleResult(style, "kind", 1.0, 30.0, 0.0, 0.9 if met else 0.1, 1.0, 0.9, 64, 1.0, met, limit)

    head = "goal (style <= 0.2 -> >= 0.7, adherence >= 0.7) met on"
    assert ss.summary([row("a", True), row("b", True)]) == f"{head} 2 of 2 styles"
    only_limits = ss.summary([row("a", True), row("b", False, "the VAE erases it"), row("c", False, "K/V")])
    assert only_limits == f"{head} 1 of 3 styles; known limits: b, c; met on every style without a known limit (1 of 1)"
    mixed = ss.summary([row("a", False), row("b", False, "the VAE erases it"), row("c", True, "K/V")])
    assert mixed == f"{head} 1 of 3 styles; known limits: b; missed without a known limit: a"
    assert ss.verdict(row("c", True, "K/V")) == "met"  # a known limit that was beaten is just met
    assert ss.verdict(row("b", False, "the VAE erases it")) == "NOT met (known limit: the VAE erases it)"
    assert ss.verdict(row("a", False)) == "NOT met"


def fake_generation(styled: bool):  # noqa: ANN201
    """Stands in for sampling: the base draws the prompt plainly at 0; at 1 in the style (or plainly again)."""

    def generate(hypernetwork, targets, seeds, multipliers, steps, cfg):  # noqa: ANN001, ANN202
        style = STYLES[Path(hypernetwork).stem]
        rng = random.Random(0)
        scenes = [random_scene(rng, t.colour, t.shape, "white") for t in targets]
        return {
            m: [render(s, style if styled and m == 1 else None, i) for i, s in enumerate(scenes)] for m in multipliers
        }

    return generate


@pytest.mark.parametrize("styled", [True, False])
def test_the_suite_judges_each_style_and_writes_table_json_and_grids(monkeypatch, tmp_path, capsys, styled):
    ss = suite()
    trained = []

    def fake_train(data, name, run_dir, seed, extra, threads):  # noqa: ANN001, ANN202
        files = sorted(p.name for p in data.iterdir())
        trained.append((name, len(files), extra, threads))
        return tmp_path / f"{name}.pt", 12.0

    monkeypatch.setattr(ss, "train", fake_train)
    monkeypatch.setattr(ss, "generate_at_multipliers", fake_generation(styled))
    out = tmp_path / "out"
    argv = ["--styles", "vignette", "diagonal_stripes", "--samples", "8", "--out", str(out), "--threads", "1",
            "--extra", "train.max_steps=5"]  # fmt: skip
    results = ss.main(argv)
    # 12 images and 12 captions per style, trained in the order asked, with the extras and the thread count
    assert trained == [(n, 24, ["train.max_steps=5"], 1) for n in ("vignette", "diagonal_stripes")]
    for r in results:  # the VAE keeps both styles; the judges score what the fake generated
        assert r.samples == 8 and r.vae_share >= 0.9 and r.vae_psnr > 15 and r.train_seconds == 12.0
        assert r.style_0 == 0.0 and r.adherence_0 == 1.0 and r.adherence_1 == 1.0
        assert r.style_1 == (1.0 if styled else 0.0) and r.goal_met == styled
    text = (out / "style_suite.md").read_text()
    scores = (
        "| 0.00 | 1.00 | 1.00 | 1.00 | 12 s | met |" if styled else "| 0.00 | 0.00 | 1.00 | 1.00 | 12 s | NOT met |"
    )
    assert "| vignette | vignette | 1.00 |" in text and scores in text  # VAE share, then style/adherence 0 -> 1
    assert f"goal (style <= 0.2 -> >= 0.7, adherence >= 0.7) met on {2 if styled else 0} of 2 styles" in text
    # a miss names the style's known limit when it has one (the stripes), and the summary tells the two kinds apart
    stripes = next(line for line in text.splitlines() if line.startswith("| diagonal_stripes |"))
    assert stripes.endswith(
        "| met |" if styled else f"| NOT met (known limit: {STYLES['diagonal_stripes'].known_limit}) |"
    )
    assert ("; missed without a known limit: vignette" in text) != styled
    assert ("known limits: diagonal_stripes" in text) != styled
    assert "logger=csv train.max_steps=5; 8 samples per multiplier (4 held-out prompts x 2 seeds" in text
    assert text.strip() in capsys.readouterr().out
    payload = json.loads((out / "style_suite.json").read_text())
    assert [r["style"] for r in payload["results"]] == ["vignette", "diagonal_stripes"]
    assert payload["results"][0]["goal_met"] == styled and payload["extra"] == ["train.max_steps=5"]
    assert [r["known_limit"] for r in payload["results"]] == ["", STYLES["diagonal_stripes"].known_limit]
    # the grid: training images, then 4 prompts x 2 seeds at multiplier 0 and at 1
    sheet = Image.open(out / "vignette.png")
    assert sheet.size == (8 * 64, 3 * 64)
    at_1 = sheet.crop((0, 128, 64, 192))
    assert STYLES["vignette"].is_in_style(at_1) == styled and not STYLES["vignette"].is_in_style(
        sheet.crop((0, 64, 64, 128))
    )


def test_lora_converts_each_hypernetwork_and_judges_it_beside(monkeypatch, tmp_path):
    """--lora: the trained file goes through the real `to-lora` (defaults, fitted on the style's folder) and the
    LoRA file it wrote is what is judged; its shares, mean rank and size ratio fill the LoRA columns."""
    from helpers.hypernetworks import randomised
    from safetensors import safe_open

    from hyperlit import files
    from hyperlit.hypernetwork import HypernetworkConfig
    from hyperlit.models import FAMILIES

    ss = suite()
    widths = [*FAMILIES["tiny"].attention_widths, FAMILIES["tiny"].context_dim]

    def fake_train(data, name, run_dir, seed, extra, threads):  # noqa: ANN001, ANN202
        path = tmp_path / f"{name}.pt"
        files.save_hypernetwork(randomised(HypernetworkConfig(layer_structure=[1, 2, 1]), widths, seed=1), path)
        return path, 12.0

    judged = []

    def fake_lora_generation(lora, targets, seeds, steps, cfg):  # noqa: ANN001, ANN202
        with safe_open(str(lora), framework="pt") as handle:
            judged.append((Path(lora).name, handle.metadata()["hyperlit_energy"], handle.metadata()["hyperlit_data"]))
        rng = random.Random(0)  # in the style, with half the shapes drawn as the wrong colour
        scenes = [random_scene(rng, t.colour if i % 2 else "red", t.shape, "white") for i, t in enumerate(targets)]
        return [render(s, STYLES["vignette"], i) for i, s in enumerate(scenes)]

    monkeypatch.setattr(ss, "train", fake_train)
    monkeypatch.setattr(ss, "generate_at_multipliers", fake_generation(True))
    monkeypatch.setattr(ss, "generate_with_lora", fake_lora_generation)
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--styles", "vignette", "--samples", "4", "--out", str(out), "--work", str(work), "--lora"]
    (result,) = ss.main(argv)
    lora = work / "loras" / "vignette.safetensors"
    assert judged == [("vignette.safetensors", "0.999", str(work / "data" / "vignette"))]  # to-lora's default energy
    ranks = ss.fidelity.file_ranks(lora)
    ratio = lora.stat().st_size / (tmp_path / "vignette.pt").stat().st_size
    assert re.fullmatch(r"\d+\.\d/\d+\.\d", ranks) and 0 < ratio < 1
    targets = [ss.Target(c, s) for c, s in ss.HELD_OUT]  # one seed per held-out prompt
    right = sum(bool(i % 2) or t.colour == "red" for i, t in enumerate(targets))  # drawn in the asked colour
    assert (result.lora_style_1, result.lora_ranks, result.lora_size_ratio) == (1.0, ranks, ratio)
    assert result.lora_adherence_1 == right / 4 < 1
    text = (out / "style_suite.md").read_text()
    assert "| LoRA style at 1 | LoRA adherence at 1 | LoRA rank k/v | LoRA size / HN |" in text
    assert f"| met | 1.00 | {result.lora_adherence_1:.2f} | {ranks} | {ratio:.2f} |" in text
    assert "LoRA: hyperlit to-lora HN OUT --data DIR (defaults), strength 1" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--styles", "sepia"], "style='sepia' is not allowed"),
        (["--samples", "6"], "--samples=6: a positive multiple of the 4 held-out prompts"),
        (["--images", "2"], "--images needs at least 4"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        suite().parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("HYPERLIT_STYLE_SUITE") != "1",
    reason="two 2500-step trainings and 256 generations (~8 min on two idle cores): run with HYPERLIT_STYLE_SUITE=1 "
    "when the tiny defaults change; .ci/run stays under its 20 minutes",
)
def test_the_held_styles_are_learned_by_the_plain_folder_command(tmp_path):
    """A weaker form of the suite's goal on two styles the tiny base's VAE holds, 64 samples per multiplier, with the
    tiny family's defaults (conf/family_defaults/tiny.yaml) and nothing else. Measured 2026-12-06 (docs/benchmarks.md
    'Five more candidates'): vignette 0.00 -> 0.95, adherence 0.72; gradient background 0.00 -> 0.75, adherence 0.98."""
    styles = ["vignette", "gradient_background"]
    results = suite().main(["--styles", *styles, "--samples", "64", "--out", str(tmp_path)])
    assert [r.style for r in results] == styles
    for r in results:
        assert r.style_0 <= 0.2 and r.adherence_0 >= 0.6, r  # the base draws the prompt, not the style
        assert r.style_1 >= 0.5 and r.style_1 >= r.style_0 + 0.4, r  # the hypernetwork adds the style
        assert r.adherence_1 >= 0.6, r  # and keeps the prompt
