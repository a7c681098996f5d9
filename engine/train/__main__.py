"""`python -m engine.train`: the distillation run (and, with no arguments, the quickstart).

    python -m engine.train                                   # offline CPU quickstart
    python -m engine.train --config configs/distilpythia.toml --data.path=DIR ...
    torchrun --nproc_per_node=N -m engine.train --config ...  # DDP (NCCL on GPU, gloo on CPU)

Exit status: 0 done (or stopped by a signal and saved), 1 the run failed (diverged, a bad
checkpoint, a dead rank, a task regression with eval.alarm_action=stop), 2 a configuration
error. Errors are one line, never a traceback.
"""

from __future__ import annotations

import os
import sys

from engine import dist
from engine.train import checkpoint as ckpt
from engine.train.config import ConfigError, load_config, valid_keys
from engine.train.loop import TrainingDiverged, run
from engine.train.watch import TaskRegression

USAGE = """usage: python -m engine.train [--config FILE.toml] [--section.key=value ...]
       python -m engine.train            (no arguments: the offline quickstart)
"""


def split_config_argument(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config FILE, the remaining --section.key=value overrides)."""
    path = None
    overrides = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file")
            path, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            path, i = arg.split("=", 1)[1], i + 1
        else:
            overrides.append(arg)
            i += 1
    return path, overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        # Imported only here: the quickstart's corpus builder needs zstandard, which a GPU
        # training machine running from finished shards does not.
        from engine.quickstart.pipeline import main as quickstart_main

        return quickstart_main([]) or 0
    if argv[0] in ("-h", "--help"):
        print(USAGE + "keys: " + ", ".join(valid_keys()))
        return 0
    try:
        path, overrides = split_config_argument(argv)
        result = run(load_config(path, overrides))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TrainingDiverged, TaskRegression, ckpt.CheckpointLoadError,
            dist.DistributedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(f"{result['status']} at step {result['step']}; run folder {result['out_dir']}, "
              f"metrics {result['metrics_path']}, export {result['export_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
