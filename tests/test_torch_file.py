"""The one weights-only reader for outside torch files: what it refuses, and how it says so."""

from __future__ import annotations

import builtins
import pathlib
from pathlib import Path

import pytest
import torch

from hyperlit.files.torch_file import TorchFileError, load_torch_file
from hyperlit.models import load_components
from hyperlit.vae.lpips import load_weights_file

# Words of torch's own error text that invite a retry without the protection; none may reach the user.
UNSAFE_ADVICE = ("weights_only=False", "weights_only` set to `False", "set to False", "trust the source")


class WritesMarker:
    """A pickle payload that creates a file when unpickled without restriction."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('x')",))


def _assert_safe_message(message: str, path: Path) -> None:
    assert str(path) in message, message
    assert not any(words in message for words in UNSAFE_ADVICE), message


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_code_and_unsupported_objects_are_refused_naming_the_file(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "marker"
    cases = {"code.ckpt": (WritesMarker(marker), "exec"), "object.ckpt": (pathlib.Path("/"), "pathlib")}
    for name, (payload, global_name) in cases.items():
        path = tmp_path / name
        torch.save(
            {"state_dict": {"w": torch.ones(2)}, "extra": payload}, path, _use_new_zipfile_serialization=zip_format
        )
        with pytest.raises(TorchFileError) as info:
            load_torch_file(path)
        message = str(info.value)
        _assert_safe_message(message, path)
        assert "refused" in message and global_name in message and "nothing in it ran" in message, message
    assert not marker.exists()


def test_plain_weights_load_on_cpu(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "step": 7}, path)
    loaded = load_torch_file(path)
    assert loaded["step"] == 7 and torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))


@pytest.mark.parametrize(
    ("content", "phrase"),
    [(None, "no such file"), (b"", "empty"), (b"garbage bytes " * 8, "not a readable torch file")],
    ids=["missing", "empty", "garbage"],
)
def test_unreadable_files_are_named_without_unsafe_advice(tmp_path: Path, content: bytes | None, phrase: str) -> None:
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TorchFileError, match=phrase) as info:
        load_torch_file(path, label=f"some.key={path}")
    assert str(info.value).startswith(f"some.key={path}")
    _assert_safe_message(str(info.value), path)


def test_truncated_file_is_unreadable(tmp_path: Path) -> None:
    full = tmp_path / "full.pt"
    torch.save({"w": torch.zeros(64, 64)}, full)
    path = tmp_path / "cut.pt"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(TorchFileError, match="not a readable torch file") as info:
        load_torch_file(path)
    _assert_safe_message(str(info.value), path)


def test_model_and_lpips_files_go_through_the_reader(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "extra": WritesMarker(tmp_path / "marker")}, path)
    with pytest.raises(ValueError) as model_error:
        load_components(family="tiny", path=str(path))
    with pytest.raises(ValueError) as lpips_error:
        load_weights_file(path, "loss.perceptual.weights")
    for error in (model_error, lpips_error):
        _assert_safe_message(str(error.value), path)
        assert "refused" in str(error.value) and "(exec)" in str(error.value)
    assert str(model_error.value).startswith(f"model.path={path}")
    assert not (tmp_path / "marker").exists()
