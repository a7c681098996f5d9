"""`--compare`: one Markdown table (and optionally a PNG bar chart) of several models' results.

The seed's Table 1 put student base, teacher and distilled student side by side over the
same tasks; this renders exactly that shape from engine.eval's result rows: one table row
per model, one column per (dataset, metric), the best value of each column in bold, so a
gain or a loss of the student is visible at a glance. matplotlib is optional (the `plot`
extra) and imported only when a PNG is asked for.
"""

from __future__ import annotations

import math
from pathlib import Path

from engine.data.atomic import open_atomic

# Metrics shown per task, and whether lower is better.
TASK_METRICS = {
    "ppl": [("ppl", True)],
    "lambada": [("ppl", True), ("acc", False)],
    "mc": [("acc", False), ("acc_norm", False)],
    "samples": [("teacher_nll", True)],
}


def _columns(rows: list[dict]) -> list[tuple[str, str, bool]]:
    """(dataset name, metric, lower_is_better) in first-seen order."""
    columns: list[tuple[str, str, bool]] = []
    for row in rows:
        for metric, lower in TASK_METRICS[row["task"]]:
            column = (row["name"], metric, lower)
            if column not in columns:
                columns.append(column)
    return columns


def _format(value: float | None, metric: str) -> str:
    if value is None:  # not evaluated, or null (non-finite) in the results JSON
        return "-"
    if math.isnan(value):
        return "nan"
    if metric == "ppl":
        return f"{value:.2f}"
    return f"{value:.4f}"


def table_data(rows: list[dict]) -> tuple[list[str], list[tuple[str, str, bool]], dict]:
    """(model labels, columns, {(model, dataset, metric): value}) from result rows."""
    models: list[str] = []
    values: dict[tuple[str, str, str], float] = {}
    for row in rows:
        if row["model_label"] not in models:
            models.append(row["model_label"])
        for metric, _ in TASK_METRICS[row["task"]]:
            values[(row["model_label"], row["name"], metric)] = row[metric]
    return models, _columns(rows), values


def markdown_table(rows: list[dict]) -> str:
    """A GitHub Markdown table: models down, (dataset metric) across, best value in bold."""
    models, columns, values = table_data(rows)
    best = {}
    for name, metric, lower in columns:
        present = [
            value
            for m in models
            if (value := values.get((m, name, metric))) is not None and not math.isnan(value)
        ]
        if len(present) > 1 and min(present) != max(present):  # a tie marks nobody
            best[(name, metric)] = min(present) if lower else max(present)
    header = ["model"] + [
        f"{name} {metric} {'↓' if lower else '↑'}" for name, metric, lower in columns
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|",
    ]
    for model in models:
        cells = [model]
        for name, metric, _ in columns:
            value = values.get((model, name, metric))
            text = _format(value, metric)
            if value is not None and best.get((name, metric)) == value:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# PNG metadata of every chart save_bar_chart writes: what lets a rerun replace it.
CHART_TITLE = "neox-distill eval comparison"


def is_our_chart(path: Path) -> bool:
    """A PNG save_bar_chart wrote (its Title metadata), readable without matplotlib."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            return getattr(image, "text", {}).get("Title") == CHART_TITLE
    except Exception:  # no Pillow, not an image: not provably ours
        return False


def save_bar_chart(rows: list[dict], path: str | Path) -> Path:
    """One bar-chart panel per table column, one bar per model; written atomically.

    Raises ImportError when matplotlib is absent (the caller says so and goes on).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, columns, values = table_data(rows)
    path = Path(path)
    figure, axes = plt.subplots(
        1, len(columns), figsize=(max(3.0, 2.6 * len(columns)), 3.4), squeeze=False
    )
    for axis, (name, metric, lower) in zip(axes[0], columns, strict=True):
        heights = [values.get((m, name, metric)) for m in models]
        heights = [float("nan") if h is None else h for h in heights]
        bars = axis.bar(range(len(models)), heights, color=[f"C{i}" for i in range(len(models))])
        axis.bar_label(bars, labels=[_format(h, metric) for h in heights], fontsize=7)
        if all(h >= 0 for h in heights if not math.isnan(h)):
            # Headroom for the labels; all-zero accuracies still get a readable axis.
            finite = [h for h in heights if not math.isnan(h)]
            axis.set_ylim(bottom=0, top=max([*finite, 0.1 if metric != "ppl" else 1.0]) * 1.15)
        axis.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
        axis.set_title(f"{name} {metric} ({'lower' if lower else 'higher'} is better)", fontsize=9)
    figure.tight_layout()
    try:
        with open_atomic(path, "wb") as handle:
            figure.savefig(handle, format="png", dpi=120, metadata={"Title": CHART_TITLE})
    finally:
        plt.close(figure)
    return path
