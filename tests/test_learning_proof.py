"""The default run learns the sample set's style: a weaker form of benchmarks/learning_proof.py's goal."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.scripts import load_script

REPO = Path(__file__).resolve().parents[1]


def learning_proof():
    return load_script(REPO / "benchmarks" / "learning_proof.py")


@pytest.mark.slow
def test_default_run_moves_held_out_prompts_into_the_style(tmp_path):
    lp = learning_proof()
    hypernetwork, _ = lp.train_default(tmp_path / "run", ["logger=none", f"data.cache_dir={tmp_path / 'cache'}"])
    scores = lp.prove(hypernetwork, seeds=32, steps=20, cfg=5.0, sheet=None)  # the benchmark's 128 samples
    base, styled = scores[0.0], scores[1.0]
    assert base.style <= 0.2 and base.adherence >= 0.6, base  # the base draws the prompt, not the style
    # The goal (style >= 0.7 with adherence >= 0.7) is met by the demo recipe at the line: the mean of training
    # seeds 42, 1, 2, 3, 4 is style 0.70, adherence 0.83 (one thread each, docs/benchmarks.md), and this run (seed 42,
    # two threads, as the README's) scores 0.73 / 0.81 / colour 1.00. The weaker form leaves about three standard
    # errors (0.04 at 128 samples) of room for other thread counts and machines: a run that learns little of the
    # style, or that draws it by losing the prompt's colour or shapes, fails.
    assert styled.style >= 0.6 and styled.style >= base.style + 0.5, (base, styled)  # the hypernetwork adds the style
    assert styled.adherence >= 0.65 and styled.colour >= 0.9, styled  # and keeps the prompt's colour and shape


def test_mean_score_weights_each_run_by_its_samples():
    from hyperlit.demo.quality import Score

    lp = learning_proof()
    a = Score(samples=32, adherence=0.75, colour=1.0, shape=0.75, style=0.5)
    b = Score(samples=16, adherence=0.25, colour=0.5, shape=0.25, style=1.0)
    mean = lp.mean_score([a, b])
    # by hand: (32 * x_a + 16 * x_b) / 48
    assert mean == Score(samples=48, adherence=7 / 12, colour=5 / 6, shape=7 / 12, style=2 / 3)


def test_standard_error_is_the_binomial_one():
    lp = learning_proof()
    assert lp.standard_error(0.5, 100) == pytest.approx(0.05)  # sqrt(0.25 / 100)
    assert lp.standard_error(0.75, 128) == pytest.approx((0.75 * 0.25 / 128) ** 0.5)
    assert lp.standard_error(0.0, 128) == 0.0 and lp.standard_error(1.0, 32) == 0.0


def test_train_seeds_train_one_run_per_seed_and_print_the_mean(monkeypatch, capsys, tmp_path):
    from hyperlit.demo.quality import Score

    lp = learning_proof()
    trained: list[list[str]] = []
    proved_on: list = []

    def fake_train(out, overrides, threads=None):  # noqa: ANN001, ANN202
        trained.append(list(overrides))
        return tmp_path / f"{len(trained)}.pt", 1.0

    styles = iter([0.5, 1.0])  # run 1 scores style 0.5 at multiplier 1, run 2 scores 1.0
    base = Score(samples=32, adherence=1.0, colour=1.0, shape=1.0, style=0.0)

    def fake_prove(path, seeds, steps, cfg, sheet, base_dir=None, sampler="dpmpp_2m"):  # noqa: ANN001, ANN202
        proved_on.append((base_dir, sampler))
        return {0.0: base, 1.0: Score(samples=32, adherence=0.75, colour=1.0, shape=0.75, style=next(styles))}

    monkeypatch.setattr(lp, "train_default", fake_train)
    monkeypatch.setattr(lp, "prove", fake_prove)
    argv = ["learning_proof.py", "--train-seeds", "42", "7", "--sampler", "euler", "--", "train.max_steps=5"]
    monkeypatch.setattr("sys.argv", argv)
    lp.main()
    assert trained == [["train.max_steps=5", "seed=42"], ["train.max_steps=5", "seed=7"]]
    out = capsys.readouterr().out
    assert "training seed 42" in out and "training seed 7" in out
    assert "style 0.00 -> 0.75, adherence at 1: 0.75 (mean of 2 runs): goal met" in out
    # the sampling error of the mean's shares, over both runs' 64 samples: sqrt(0.75 * 0.25 / 64) = 0.054
    assert "standard error of a share at multiplier 1 (64 samples): style 0.05, adherence 0.05" in out
    assert proved_on == [(None, "euler")] * 2  # the embedded base, sampled with the sampler asked for
    assert "20 euler steps, CFG 5.0" in out

    # --base: each run trains on the other folder (model.path) and is judged on it
    trained.clear(), proved_on.clear()
    styles = iter([0.5, 1.0])
    other = tmp_path / "new_base"
    monkeypatch.setattr("sys.argv", ["learning_proof.py", "--train-seeds", "42", "--base", str(other)])
    lp.main()
    assert trained == [["seed=42", f"model.path={other}"]]
    assert proved_on == [(other, "dpmpp_2m")]  # and with the default sampler


def test_a_finished_file_and_train_seeds_are_refused_together(monkeypatch, tmp_path):
    lp = learning_proof()
    monkeypatch.setattr(
        "sys.argv", ["learning_proof.py", "--hypernetwork", str(tmp_path / "a.pt"), "--train-seeds", "1"]
    )
    with pytest.raises(SystemExit, match="give one of them"):
        lp.main()


def test_lora_files_are_scored_beside_their_hypernetwork(monkeypatch, capsys, tmp_path):
    """--lora: a full-rank float32 LoRA of a linear network scores as its hypernetwork (noise error ~0), a rank-1
    one misses part of the change; each row carries the file's mean rank and size (2 steps x 4 samples: seconds)."""
    from helpers.hypernetworks import randomised
    from safetensors.torch import load_file

    from hyperlit import files
    from hyperlit.hypernetwork import HypernetworkConfig
    from hyperlit.lora.command import ToLoraOptions, to_lora
    from hyperlit.models import FAMILIES

    widths = [*FAMILIES["tiny"].attention_widths, FAMILIES["tiny"].context_dim]
    hn = randomised(HypernetworkConfig(layer_structure=[1, 2, 1], activation="linear"), widths, seed=1)
    files.save_hypernetwork(hn, tmp_path / "hn.pt")
    full, low = tmp_path / "full.safetensors", tmp_path / "low.safetensors"
    to_lora(ToLoraOptions(tmp_path / "hn.pt", full, energy=1.0, dtype="float32"))
    to_lora(ToLoraOptions(tmp_path / "hn.pt", low, rank=1))
    lp = learning_proof()
    argv = ["learning_proof.py", "--hypernetwork", str(tmp_path / "hn.pt"), "--lora", str(full), str(low),
            "--seeds", "1", "--steps", "2", "--threads", "1"]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    lp.main()
    out = capsys.readouterr().out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith(("hypernetwork ", "LoRA "))}
    hn_row, full_row, low_row = rows["hn.pt"], rows["full.safetensors"], rows["low.safetensors"]
    # columns after the label: [ranks] bytes size-ratio noise-error style adherence colour shape
    assert float(full_row[-5]) < 1e-3 and float(low_row[-5]) > 0.05
    assert full_row[-4:] == hn_row[-4:]  # the same judged shares as the hypernetwork's own images
    source = (tmp_path / "hn.pt").stat().st_size
    for row, path in ((full_row, full), (low_row, low)):
        assert row[-7] == f"{path.stat().st_size:,}" and row[-6] == f"{path.stat().st_size / source:.2f}"
    downs = [t for k, t in load_file(low).items() if k.endswith("lora_down.weight")]
    assert {t.shape[0] for t in downs} == {1} and low_row[2] == "1.0/1.0"
    assert "LoRA full.safetensors: style" in out and "size 2." in out and "(goal <= 1): NOT met" in out


def test_lora_needs_its_hypernetwork(monkeypatch, tmp_path):
    lp = learning_proof()
    monkeypatch.setattr("sys.argv", ["learning_proof.py", "--lora", str(tmp_path / "x.safetensors")])
    with pytest.raises(SystemExit, match="--lora scores LoRA files beside the hypernetwork they were made from"):
        lp.main()
    monkeypatch.setattr("sys.argv", ["learning_proof.py", "--hypernetwork", "h.pt", "--lora", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match=r"--lora: .*x does not exist"):
        lp.main()
