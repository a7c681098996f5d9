"""Training curves of run folders, overlaid in one PNG (matplotlib, the `plot` extra).

    plot_runs(["runs/quickstart/distill", "runs/quickstart/control"], "curves.png")

Read from each folder's metrics.jsonl (the source of truth; engine/metrics.py): training
loss, CE, KD and learning rate per step, and the held-out perplexity of each validation,
against the tokens seen. `neox-distill plot` is the command line; the quickstart draws
its distilled student against the CE-only control with it.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.data.atomic import open_atomic
from engine.metrics import describe_lines, read_numbered, warn_damaged

CURVES_TITLE = "neox-distill training curves"  # PNG metadata: marks a file as ours to replace
# (panel title, record kind, key); a run lacking a key (no teacher: no kd) has no line there.
PANELS = (
    ("training loss (the objective: α CE + (1 - α) KD)", "train", "loss"),
    ("training CE (nats / token)", "train", "ce"),
    ("training KD (T² KL / token)", "train", "kd"),
    ("learning rate", "train", "lr"),
    ("held-out perplexity", "val", "val_ppl"),
)


class CurvesError(ValueError):
    """A run folder or output that cannot be plotted; the message names it."""


class SkippedValues(UserWarning):
    """Values of readable records that cannot be drawn (not numbers); names file and lines."""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class RunCurves:
    label: str
    folder: Path
    records: list[dict]
    tokens_per_step: float | None  # None: an older metrics.jsonl without tokens_seen

    def series(self, kind: str, key: str, by_tokens: bool) -> tuple[list[float], list[float]]:
        """(x, y) of one key over the records of one kind, in step order."""
        xs, ys = [], []
        for record in self.records:
            value = record.get(key)
            if record.get("kind") != kind or not _number(value):
                continue
            step = float(record.get("step", 0))
            xs.append(step * self.tokens_per_step if by_tokens else step)
            ys.append(float(value))
        return xs, ys


def _labels(folders: list[Path]) -> list[str]:
    """Each folder relative to what they share ("distill", "control"), or its own name."""
    resolved = [f.resolve() for f in folders]
    if len(resolved) == 1:
        return [resolved[0].name]
    common = Path(os.path.commonpath(resolved))
    return [str(f.relative_to(common)) if f != common else f.name for f in resolved]


def _warn_unplottable(metrics: Path, numbered: list[tuple[int, dict]]) -> None:
    """A SkippedValues warning per panel key whose value is not a number in some records
    (null, text). A key that is null in every record of its kind is a curve the run did not
    log (kd without a teacher): no warning."""
    for _, kind, key in PANELS:
        present = [(n, r[key]) for n, r in numbered if r.get("kind") == kind and key in r]
        if all(value is None for _, value in present):
            continue
        bad = [n for n, value in present if not _number(value)]
        if bad:
            warnings.warn(f"{metrics}: {describe_lines(bad)}: {kind} {key} is not a number; "
                          "not drawn", SkippedValues, stacklevel=3)


def _tokens_per_step(records: list[dict]) -> float | None:
    """Tokens per optimizer step from the last train record that has them (step > 0)."""
    seen = [r for r in records if r.get("kind") == "train" and _number(r.get("tokens_seen"))
            and r["tokens_seen"] > 0 and r.get("step", 0) > 0]
    return seen[-1]["tokens_seen"] / seen[-1]["step"] if seen else None


def load_runs(folders: Sequence[str | os.PathLike]) -> list[RunCurves]:
    """The records of each run folder; a folder without metrics.jsonl, or none readable, is
    an error. Damaged lines and values that are not numbers are skipped with a warning
    naming the file and the line numbers (engine.metrics.DamagedLines, SkippedValues)."""
    paths = [Path(f) for f in folders]
    if not paths:
        raise CurvesError("no run folder given")
    runs = []
    for folder, label in zip(paths, _labels(paths), strict=True):
        metrics = folder / "metrics.jsonl"
        if not metrics.is_file():
            where = "does not exist" if not folder.exists() else "has no metrics.jsonl"
            raise CurvesError(f"{folder}: {where} (not a run folder written by engine.train)")
        numbered, damaged = read_numbered(metrics)
        warn_damaged(metrics, damaged)
        if not numbered:
            raise CurvesError(f"{metrics}: holds no readable records"
                              + (f" ({describe_lines(damaged)} damaged)" if damaged else ""))
        _warn_unplottable(metrics, numbered)
        records = [record for _, record in numbered]
        runs.append(RunCurves(label, folder, records, _tokens_per_step(records)))
    return runs


def _check_output(out: Path) -> None:
    """Replace only a PNG this module wrote (a user's file of the same name is refused)."""
    if not out.exists():
        return
    from PIL import Image

    try:
        with Image.open(out) as image:
            ours = getattr(image, "text", {}).get("Title") == CURVES_TITLE
    except Exception:  # not an image at all
        ours = False
    if not ours:
        raise CurvesError(f"{out}: exists and was not written by plot_run; not replacing it "
                          "(choose another --out)")


def _import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise CurvesError("plotting needs matplotlib, which is not installed: "
                          "pip install '.[plot]' (or pip install matplotlib)") from None
    return Figure, FigureCanvasAgg, EngFormatter


def plot_runs(folders: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict[str, list]:
    """Draw the PANELS of every run into the PNG `out` (written atomically); returns
    {panel title: [labels of the runs drawn in it]}."""
    Figure, FigureCanvasAgg, EngFormatter = _import_matplotlib()
    out = Path(out)
    runs = load_runs(folders)
    _check_output(out)
    by_tokens = all(run.tokens_per_step for run in runs)
    figure = Figure(figsize=(15, 8.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 3).flatten()
    drawn: dict[str, list] = {}
    for ax, (title, kind, key) in zip(axes, PANELS, strict=False):
        drawn[title] = []
        for index, run in enumerate(runs):
            xs, ys = run.series(kind, key, by_tokens)
            if xs:
                style = "o-" if kind == "val" else "-"
                ax.plot(xs, ys, style, color=f"C{index}", label=run.label, linewidth=1.2)
                drawn[title].append(run.label)
        ax.set_title(title)
        ax.set_xlabel("tokens seen" if by_tokens else "optimizer step")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
        if not drawn[title]:
            ax.text(0.5, 0.5, "no run logged this", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
    _legend_panel(axes[len(PANELS)], runs)
    figure.suptitle(CURVES_TITLE)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Title": CURVES_TITLE})
    with open_atomic(out, "wb") as handle:
        handle.write(buffer.getvalue())
    return drawn


def _legend_panel(ax, runs: list[RunCurves]) -> None:
    """The last panel: one line per run, its colour, folder and final held-out perplexity."""
    ax.axis("off")
    for index, run in enumerate(runs):
        vals = [r for r in run.records if r.get("kind") == "val" and _number(r.get("val_ppl"))]
        final = f"held-out ppl {vals[-1]['val_ppl']:.2f}" if vals else "no validation"
        steps = max(int(r.get("step", 0)) for r in run.records)
        y = 0.92 - min(0.12, 0.85 / len(runs)) * index
        ax.plot([0.0, 0.08], [y, y], color=f"C{index}", linewidth=3, transform=ax.transAxes)
        ax.text(0.11, y, f"{run.label}: {steps} steps, {final}{_on_tokens(vals)}\n{run.folder}",
                va="center", fontsize=9, transform=ax.transAxes)


def _on_tokens(vals: list[dict]) -> str:
    """What the final held-out ppl was measured on: " on N val tokens" (the validation's own
    count, so two numbers on different token sets are never shown as one measure)."""
    tokens = vals[-1].get("val_tokens") if vals else None
    return f" on {int(tokens):,} val tokens" if isinstance(tokens, (int, float)) else ""
