"""`callbacks/export.py` without a training run: a stand-in trainer and module drive the callback's hooks, and every
file is read back with plain `torch.load` / `safetensors.safe_open` (not hyperlit's readers). Snapshot names and the
name stored inside, the A1111 step after an `init_from` continuation, the hyperlit safetensors copy's name, the
`.comfyui.pt` copy exactly where ComfyUI would build Dropout layers, and atomic writes."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from safetensors import safe_open

from hyperlit.callbacks.ema import EMA
from hyperlit.callbacks.export import HypernetworkExport
from hyperlit.files import a1111, load_hypernetwork, save_hypernetwork
from hyperlit.files import safetensors as st_format
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
from hyperlit.tasks import TASKS

NAME = "style"


class StandInTrainer:
    """What the callback reads from a Lightning trainer."""

    def __init__(self, global_step: int, is_global_zero: bool = True) -> None:
        self.global_step = global_step
        self.is_global_zero = is_global_zero
        self.optimizers: list = []
        self.callbacks: list = []  # no EMA: the live weights are written
        self.loggers: list = []


def stand_in_module(hn: Hypernetwork, initial_step: int = 0) -> SimpleNamespace:
    components = SimpleNamespace(checkpoint_hash="0123456789", checkpoint_name="base.safetensors")
    return SimpleNamespace(hypernetwork=hn, initial_step=initial_step, components=components)


def network(layer_structure=(1, 2, 1), dropout_structure=None, name: str = NAME) -> Hypernetwork:
    hn = Hypernetwork(
        HypernetworkConfig(layer_structure=list(layer_structure), dropout_structure=dropout_structure),
        sizes=[8, 12],
        name=name,
    )
    with torch.no_grad():
        for i, p in enumerate(hn.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.3)
    return hn


def export(tmp_path: Path, **kwargs) -> HypernetworkExport:
    return HypernetworkExport(str(tmp_path / "out"), log_artifact=False, **kwargs)


def pt(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def st_metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def test_snapshots_are_named_name_step_and_store_the_base_name(tmp_path):
    cb, hn = export(tmp_path, save_every=5), network()
    module = stand_in_module(hn)
    for step in (0, 3, 5, 5, 7, 10):  # step 0, off-multiples and a repeated step write nothing
        cb.on_train_batch_end(StandInTrainer(step), module)
    assert files_in(cb.dirpath) == {f"{NAME}-5.pt", f"{NAME}-10.pt"}
    assert cb.snapshots == {5: cb.dirpath / f"{NAME}-5.pt", 10: cb.dirpath / f"{NAME}-10.pt"}
    for step in (5, 10):
        d = pt(cb.dirpath / f"{NAME}-{step}.pt")
        assert (d["name"], d["step"]) == (NAME, step)  # A1111's trainer stores the base name in snapshots too
        assert (d["sd_checkpoint"], d["sd_checkpoint_name"]) == ("0123456789", "base.safetensors")
        torch.testing.assert_close(d[8][0]["linear.0.weight"], hn.pairs["8"][0].linear[0].weight)


def test_only_global_rank_zero_writes(tmp_path):
    cb = export(tmp_path, save_every=5)
    module = stand_in_module(network())
    cb.on_train_batch_end(StandInTrainer(5, is_global_zero=False), module)
    cb.save_final(StandInTrainer(5, is_global_zero=False), module)
    assert files_in(cb.dirpath) == set() and cb.final_path is None


def test_final_files_store_the_base_name_and_step(tmp_path):
    cb, hn = export(tmp_path, save_every=0), network()
    cb.on_train_end(StandInTrainer(12), stand_in_module(hn))
    assert files_in(cb.dirpath) == {f"{NAME}.pt", f"{NAME}.hyperlit.safetensors"}  # no Dropout: no ComfyUI copy
    assert cb.final_path == cb.dirpath / f"{NAME}.pt"
    d = pt(cb.final_path)
    assert (d["name"], d["step"]) == (NAME, 12)
    meta = st_metadata(cb.dirpath / f"{NAME}.hyperlit.safetensors")
    assert (meta["name"], meta["step"]) == (NAME, "12")
    with safe_open(str(cb.dirpath / f"{NAME}.hyperlit.safetensors"), "pt") as f:
        torch.testing.assert_close(f.get_tensor("12.1.linear.1.bias"), hn.pairs["12"][1].linear[1].bias)


@pytest.mark.parametrize("file_name", [f"{NAME}.hyperlit.safetensors", f"{NAME}.comfyui.pt", f"{NAME}.safetensors"])
def test_a_file_written_without_an_explicit_name_stores_the_base_name(tmp_path, file_name):
    path = save_hypernetwork(network(name="something-else"), tmp_path / file_name)
    stored = st_metadata(path)["name"] if path.suffix == ".safetensors" else pt(path)["name"]
    assert stored == NAME  # the client tag is not part of the name A1111/ComfyUI list it by


def test_an_init_from_continuation_counts_a1111_steps_on_from_the_files_step(train_cfg, tmp_path):
    first = TASKS["hypernetwork"](train_cfg("model.tiny_random=true")).load_module()
    first.hypernetwork.step = 1200
    start = save_hypernetwork(first.hypernetwork, tmp_path / "start.pt")
    cfg = train_cfg("model.tiny_random=true", f"hypernet.init_from={start}", f"hypernet.name={NAME}")
    module = TASKS["hypernetwork"](cfg).load_module()
    cb = export(tmp_path, save_every=30)
    cb.on_train_batch_end(StandInTrainer(30), module)
    cb.save_final(StandInTrainer(45), module)
    assert pt(cb.dirpath / f"{NAME}-30.pt")["step"] == 1230
    assert pt(cb.dirpath / f"{NAME}.pt")["step"] == 1245
    assert st_metadata(cb.dirpath / f"{NAME}.hyperlit.safetensors")["step"] == "1245"
    assert pt(cb.dirpath / f"{NAME}.pt")["name"] == NAME


def comfyui_builds_dropout(file: dict) -> bool:
    """ComfyUI's hypernetwork loader (facts of its rule, written here): per (K, V) module of n linear layers, a
    Dropout follows linear i when the file's use_dropout is set, i is not the last, and i is not the penultimate
    unless last_layer_dropout is set."""
    if not file.get("use_dropout", False):
        return False
    linears = len([k for k in file[8][0] if k.endswith(".weight") and k.startswith("linear.")])
    return any(i < linears - 1 and (i < linears - 2 or file.get("last_layer_dropout", False)) for i in range(linears))


COMFYUI_CASES = [
    ((1, 2, 1), None),
    ((1, 2, 1), [0, 0.1, 0]),
    ((1, 2, 2, 1), [0, 0.1, 0.1, 0]),
    ((1, 2, 2, 1), [0, 0, 0, 0]),
    ((1, 4, 1), [0, 0.3, 0]),
]


@pytest.mark.parametrize(("layers", "dropout"), COMFYUI_CASES)
def test_the_comfyui_copy_is_written_exactly_when_comfyui_would_build_dropout(tmp_path, layers, dropout):
    cb, hn = export(tmp_path, save_every=0), network(layers, dropout)
    cb.save_final(StandInTrainer(3), stand_in_module(hn))
    final = pt(cb.dirpath / f"{NAME}.pt")
    copy = cb.dirpath / f"{NAME}.comfyui.pt"
    assert copy.exists() == comfyui_builds_dropout(final)
    if copy.exists():
        stripped = pt(copy)
        assert stripped["name"] == NAME and stripped["step"] == 3
        assert not comfyui_builds_dropout(stripped)
        # the same function in eval mode
        a, b = load_hypernetwork(cb.dirpath / f"{NAME}.pt"), load_hypernetwork(copy)
        x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0))
        for i in (0, 1):
            torch.testing.assert_close(b.pairs["12"][i](x), a.pairs["12"][i](x))
    # the option turns the copy off
    off = export(tmp_path / "off", save_every=0, comfyui_copy=False)
    off.save_final(StandInTrainer(3), stand_in_module(hn))
    assert files_in(off.dirpath) == {f"{NAME}.pt", f"{NAME}.hyperlit.safetensors"}


def test_the_cases_above_include_both_outcomes(tmp_path):
    """Guards the parametrisation: some cases need the copy and some do not, or the test above proves little."""
    outcomes = set()
    for i, (layers, dropout) in enumerate(COMFYUI_CASES):
        path = save_hypernetwork(network(layers, dropout), tmp_path / f"{i}.pt")
        outcomes.add(comfyui_builds_dropout(pt(path)))
    assert outcomes == {True, False}


class HalfWritten(OSError):
    """The disk filled up half way through a write."""


def failing_writer():
    def write(obj, target, *args, **kwargs):
        Path(str(target)).write_bytes(b"PK\x03\x04 half a file")
        raise HalfWritten("no space left on device")

    return write


@pytest.mark.parametrize(
    ("module", "attribute", "file_name"),
    [(a1111, "save_a1111_zip", f"{NAME}.pt"), (st_format, "save_file", f"{NAME}.hyperlit.safetensors")],
)
def test_a_failed_write_leaves_no_partial_file_and_keeps_the_previous_one(tmp_path, monkeypatch, module, attribute,
                                                                           file_name):  # fmt: skip
    cb, hn = export(tmp_path, save_every=0), network()
    mod = stand_in_module(hn)
    cb.save_final(StandInTrainer(10), mod)
    before = {name: (cb.dirpath / name).read_bytes() for name in files_in(cb.dirpath)}
    assert file_name in before
    monkeypatch.setattr(module, attribute, failing_writer())
    with torch.no_grad():
        hn.pairs["8"][0].linear[0].weight.add_(1.0)
    with pytest.raises(HalfWritten):
        cb.save_final(StandInTrainer(20), mod)
    # no temporary file is left, and the complete file from step 10 is still there, byte for byte
    assert files_in(cb.dirpath) == set(before)
    assert (cb.dirpath / file_name).read_bytes() == before[file_name]


def test_a_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    cb = export(tmp_path, save_every=5)
    monkeypatch.setattr(a1111, "save_a1111_zip", failing_writer())
    with pytest.raises(HalfWritten):
        cb.on_train_batch_end(StandInTrainer(5), stand_in_module(network()))
    assert files_in(cb.dirpath) == set()


def test_defaults_and_a_negative_save_every_is_refused(tmp_path):
    cb = HypernetworkExport(str(tmp_path))
    assert (cb.save_every, cb.save_optimizer_state, cb.safetensors, cb.comfyui_copy, cb.log_artifact) == (
        500,
        False,
        True,
        True,
        True,
    )
    with pytest.raises(ValueError, match=r"^callbacks.export.save_every: -1 is not allowed; use 0 \(off\) or more$"):
        HypernetworkExport(str(tmp_path), save_every=-1)


def test_save_every_one_writes_from_step_one_and_each_step_once(tmp_path, monkeypatch):
    import hyperlit.callbacks.export as export_module

    calls: list[Path] = []
    real = export_module.save_hypernetwork
    monkeypatch.setattr(
        export_module, "save_hypernetwork", lambda hn, path, **kw: calls.append(path) or real(hn, path, **kw)
    )
    cb, module = export(tmp_path, save_every=1), stand_in_module(network())
    for step in (1, 1, 2, 2, 2, 3):  # Lightning calls the hook once per batch: accumulation repeats a step
        cb.on_train_batch_end(StandInTrainer(step), module)
    assert [p.name for p in calls] == [f"{NAME}-1.pt", f"{NAME}-2.pt", f"{NAME}-3.pt"]


def trained_sgd(hn: Hypernetwork) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(hn.parameters(), lr=0.1, momentum=0.9)
    sum(p.sum() for p in hn.parameters()).backward()
    opt.step()  # momentum buffers: a state worth saving
    return opt


def test_the_optimizer_state_is_saved_beside_snapshots_only_when_asked(tmp_path):
    hn = network()
    trainer = StandInTrainer(5)
    trainer.optimizers = [trained_sgd(hn)]
    on = export(tmp_path / "on", save_every=5, save_optimizer_state=True)
    on.on_train_batch_end(trainer, stand_in_module(hn))
    optim = torch.load(on.dirpath / f"{NAME}-5.pt.optim", weights_only=False)
    assert optim["optimizer_name"] == "SGD"  # the optimizer's class, as A1111 stores it
    state = trainer.optimizers[0].state_dict()
    assert optim["optimizer_state_dict"]["param_groups"] == state["param_groups"]
    for i, s in state["state"].items():
        torch.testing.assert_close(optim["optimizer_state_dict"]["state"][i]["momentum_buffer"], s["momentum_buffer"])
    off = export(tmp_path / "off", save_every=5)
    off.on_train_batch_end(trainer, stand_in_module(hn))
    assert files_in(off.dirpath) == {f"{NAME}-5.pt"}
    none = export(tmp_path / "none", save_every=5, save_optimizer_state=True)
    none.on_train_batch_end(StandInTrainer(5), stand_in_module(hn))  # no optimizer: nothing to save
    assert files_in(none.dirpath) == {f"{NAME}-5.pt"}


@pytest.mark.parametrize(
    ("exception", "step", "written"),
    [(KeyboardInterrupt(), 1, True), (KeyboardInterrupt(), 0, False), (RuntimeError("boom"), 7, False)],
)
def test_an_interrupted_run_writes_the_final_files(tmp_path, caplog, exception, step, written):
    cb = export(tmp_path, save_every=0)
    with caplog.at_level("WARNING", logger="hyperlit.callbacks.export"):
        cb.on_exception(StandInTrainer(step), stand_in_module(network()), exception)
    assert files_in(cb.dirpath) == ({f"{NAME}.pt", f"{NAME}.hyperlit.safetensors"} if written else set())
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if written:
        assert pt(cb.dirpath / f"{NAME}.pt")["step"] == 1
        assert warned == ["interrupted at step 1: writing the final files"]
    else:
        assert warned == []


def test_saved_files_are_logged_by_path(tmp_path, caplog):
    cb = export(tmp_path, save_every=5)
    module = stand_in_module(network(dropout_structure=[0, 0.1, 0]))
    with caplog.at_level("INFO", logger="hyperlit.callbacks.export"):
        cb.on_train_batch_end(StandInTrainer(5), module)
        cb.save_final(StandInTrainer(5), module)
    assert [r.getMessage() for r in caplog.records] == [
        f"saved {cb.dirpath / f'{NAME}-5.pt'}",
        f"saved {cb.dirpath / f'{NAME}.comfyui.pt'} (for ComfyUI, which runs Dropout layers at inference)",
        f"saved {cb.dirpath / f'{NAME}.pt'}",
    ]


class ConstantEMA(EMA):
    """A stand-in EMA whose 'averaged' weights are all 0.25: swapped in for the block, live weights restored."""

    @contextmanager
    def swapped(self, pl_module):
        params = list(pl_module.hypernetwork.parameters())
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.fill_(0.25)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b)


def test_every_file_holds_the_averaged_weights_when_the_run_keeps_an_ema(tmp_path):
    hn = network(dropout_structure=[0, 0.1, 0])
    live = hn.pairs["8"][0].linear[0].weight.detach().clone()
    trainer = StandInTrainer(5)
    trainer.callbacks = [ConstantEMA()]
    cb = export(tmp_path, save_every=5)
    cb.on_train_batch_end(trainer, stand_in_module(hn))
    cb.save_final(trainer, stand_in_module(hn))
    for name in (f"{NAME}-5.pt", f"{NAME}.pt", f"{NAME}.comfyui.pt"):
        assert torch.all(pt(cb.dirpath / name)[8][0]["linear.0.weight"] == 0.25), name
    with safe_open(str(cb.dirpath / f"{NAME}.hyperlit.safetensors"), "pt") as f:
        assert torch.all(f.get_tensor("8.0.linear.0.weight") == 0.25)
    assert torch.equal(hn.pairs["8"][0].linear[0].weight, live)  # the live weights are back


class OnlineWandb(WandbLogger):
    """A WandbLogger that is online without a server: it records the artifacts it is given."""

    def __init__(self, offline: bool = False) -> None:
        self._offline = offline
        self.artifacts: list = []

    @property
    def experiment(self) -> SimpleNamespace:
        return SimpleNamespace(log_artifact=self.artifacts.append)


def test_the_final_file_is_logged_as_a_wandb_artifact_only_to_an_online_run(tmp_path):
    online, offline = OnlineWandb(), OnlineWandb(offline=True)
    trainer = StandInTrainer(3)
    trainer.loggers = [offline, online]
    cb = HypernetworkExport(str(tmp_path / "out"), save_every=0)
    cb.save_final(trainer, stand_in_module(network()))
    assert offline.artifacts == []
    (artifact,) = online.artifacts
    assert (artifact.name, artifact.type) == (NAME, "hypernetwork")
    assert list(artifact.manifest.entries) == [f"{NAME}.pt"]
    quiet = OnlineWandb()
    trainer.loggers = [quiet]
    export(tmp_path / "quiet", save_every=0).save_final(trainer, stand_in_module(network()))
    assert quiet.artifacts == []  # log_artifact=False
