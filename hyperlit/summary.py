"""The few lines a run ends with: where its files are, how its score moved from start to end, the best snapshot.

Everything is read from what the run's callbacks recorded (``ValidationLoss.scores``, the exports' file lists,
``PreviewImages.changes``) and from ``metrics.csv``'s rows, so the summary says what the files and logs say.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl

from hyperlit.callbacks.export import HypernetworkExport
from hyperlit.callbacks.preview import PreviewImages
from hyperlit.callbacks.vae_export import VAEExport
from hyperlit.callbacks.validation import ValidationLoss
from hyperlit.metrics_file import MetricsFile


@dataclass(frozen=True)
class Snapshot:
    """An exported hypernetwork file and the val/loss of the weights it holds."""

    path: Path
    step: int
    val_loss: float


def find(trainer: pl.Trainer, kind: type) -> object | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)


def shown(path: Path, root: Path | None) -> str:
    """``path`` relative to the run dir when it lies inside it."""
    if root is not None:
        try:
            return str(path.relative_to(root))
        except ValueError:
            pass
    return str(path)


def best_snapshot(export: HypernetworkExport, scores: dict[int, float], final_step: int) -> Snapshot | None:
    """The exported file (snapshots and the final file) whose weights scored the lowest val/loss."""
    files = dict(export.snapshots)
    if export.final_path is not None:
        files[final_step] = export.final_path
    scored = [Snapshot(path, step, scores[step]) for step, path in files.items() if step in scores]
    return min(scored, key=lambda s: (s.val_loss, -s.step)) if scored else None


def hypernetwork_lines(trainer: pl.Trainer, root: Path | None) -> list[str]:
    lines = []
    export = find(trainer, HypernetworkExport)
    validation = find(trainer, ValidationLoss)
    preview = find(trainer, PreviewImages)
    scores = validation.scores if isinstance(validation, ValidationLoss) else {}
    step = trainer.global_step
    if isinstance(export, HypernetworkExport) and export.final_path is not None:
        extra = f" and {len(export.snapshots)} snapshots beside it" if export.snapshots else ""
        lines.append(f"hypernetwork: {shown(export.final_path, root)}{extra}")
    if isinstance(preview, PreviewImages) and preview.written:
        lines.append(f"preview grids: {len(preview.written)} in {shown(preview.written[-1].parent, root)}/")
    if scores:
        first, last = min(scores), max(scores)
        best = min(scores, key=lambda s: (scores[s], -s))
        lines.append(
            f"val/loss: {scores[first]:.4g} at step {first} -> {scores[last]:.4g} at step {last} "
            f"(lowest {scores[best]:.4g} at step {best})"
        )
    if isinstance(export, HypernetworkExport) and scores:
        snapshot = best_snapshot(export, scores, step)
        if snapshot is not None:
            lines.append(f"best snapshot: {shown(snapshot.path, root)} (val/loss {snapshot.val_loss:.4g})")
    if isinstance(preview, PreviewImages) and preview.changes:
        first, last = min(preview.changes), max(preview.changes)
        low = preview.min_change is not None and preview.changes[last] < preview.min_change
        lines.append(
            f"preview/change (multiplier 0 vs 1, of 255): {preview.changes[first]:.2f} at step {first} -> "
            f"{preview.changes[last]:.2f} at step {last}"
            + (f" (below callbacks.preview.min_change={preview.min_change:g}: nothing learned)" if low else "")
        )
    return lines


def vae_lines(trainer: pl.Trainer, metrics: MetricsFile | None, root: Path | None) -> list[str]:
    lines = []
    export = find(trainer, VAEExport)
    if isinstance(export, VAEExport) and export.written:
        lines.append("VAE exports: " + ", ".join(shown(p, root) for p in export.written))
    if metrics is not None:
        psnr, start = metrics.series("val/psnr"), metrics.series("val/start_psnr")
        if psnr.values and start.values:
            lines.append(
                f"PSNR: {start.values[-1]:.2f} dB (the starting decoder) -> {psnr.values[-1]:.2f} dB at step "
                f"{psnr.steps[-1]} (first validation: {psnr.values[0]:.2f} dB)"
            )
    return lines


def run_summary(trainer: pl.Trainer, metrics: MetricsFile | None, root: Path | None) -> list[str]:
    """The end-of-run lines, for any task."""
    lines = []
    if root is not None:
        written = [p.name for p in (metrics.csv_path, metrics.plot_path) if p.is_file()] if metrics else []
        lines.append(f"run dir: {root}" + (f" ({', '.join(written)})" if written else ""))
    return lines + hypernetwork_lines(trainer, root) + vae_lines(trainer, metrics, root)
