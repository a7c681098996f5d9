"""`python -m engine.train`: the distillation run (and, with no arguments, the quickstart).

    python -m engine.train                                   # offline CPU quickstart
    python -m engine.train --config configs/distilpythia.toml --data.path=DIR ...
    torchrun --nproc_per_node=N -m engine.train --config ...  # DDP (NCCL on GPU, gloo on CPU)

Exit status: 0 done; 1 the run failed (diverged, no intact checkpoint, a full disk, the run
folder in use, a dead rank, a task regression with eval.alarm_action=stop); 2 a configuration
error; 143 / 130 stopped by SIGTERM / SIGINT (after saving: resume with run.resume=auto).
Errors are one line, "error: <file or key>: <what> (<fix>)", never a traceback.
"""

from __future__ import annotations

import os
import sys
import warnings

from engine.dist import DistributedError
from engine.train.config import ConfigError, load_config, valid_keys
from engine.train.file_writes import WriteFailed, describe_write_error, is_disk_full
from engine.train.lock import RunLocked
from engine.train.loop import TrainingDiverged, run
from engine.train.signals import EXIT_STATUS, exit_status
from engine.train.watch import TaskRegression

USAGE = """usage: neox-distill train [--config FILE.toml] [--section.key=value ...]
       neox-distill train            (no arguments: the offline quickstart)
       (the same as python -m engine.train)
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
    previous, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return _train(argv)
    finally:
        warnings.formatwarning = previous


def _train(argv: list[str]) -> int:
    """Run the configured training; every failure becomes one line and an exit status."""
    try:
        path, overrides = split_config_argument(argv)
        result = run(load_config(path, overrides))
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without saving
        return _fail("interrupted (a second SIGINT); resume with run.resume=auto",
                     EXIT_STATUS["SIGINT"])
    except OSError as exc:  # named by the file, not by the Python class
        where = f"{exc.filename}: " if exc.filename and is_disk_full(exc) else ""
        return _fail(f"{where}{describe_write_error(exc)}", 1)
    except (ValueError, TrainingDiverged, TaskRegression, WriteFailed, RunLocked,
            DistributedError) as exc:
        return _fail(str(exc), 1)  # every engine error (ValueError or these): one line
    if os.environ.get("RANK", "0") == "0":
        print(f"{result['status']} at step {result['step']}; run folder {result['out_dir']}, "
              f"metrics {result['metrics_path']}, export {result['export_dir']}")
    return exit_status(result["signal"]) if result["status"] == "interrupted" else 0


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"  # for a user, not "loop.py:123: RuntimeWarning: ..."


def _fail(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
