"""Training curves of one or more runs: `neox-distill plot RUN_DIR [RUN_DIR ...] --out
curves.png`.

Loss, CE, KD, learning rate and held-out perplexity against the tokens seen, every run
overlaid (engine/curves.py draws them from each folder's metrics.jsonl). Needs matplotlib
(`pip install '.[plot]'`). Exit 0 when the PNG is written, 2 when it cannot be (no
matplotlib, a folder without metrics.jsonl or without one readable record, an output file
that is not ours to replace). A damaged metrics.jsonl is drawn from what is readable: each
damaged line (not UTF-8, not JSON) and each value that is not a number is named, with its
file and line numbers, in a warning line.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from engine.curves import CurvesError, plot_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="neox-distill plot",
        description="Overlay the training curves of engine.train run folders in one PNG.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run folders (each holds the metrics.jsonl engine.train wrote)")
    parser.add_argument("--out", default="curves.png", help="the PNG to write (curves.png)")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                drawn = plot_runs(args.runs, args.out)
            finally:
                for warning in caught:
                    print(f"plot_run: warning: {warning.message}", file=sys.stderr)
    except (CurvesError, OSError) as error:
        print(f"plot_run: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: " + "; ".join(
        f"{panel}: {len(labels)} run(s)" for panel, labels in drawn.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
