"""`neox-distill`: one command for every user-facing job, installed with the package.

    neox-distill --help              the subcommands, one line each
    neox-distill SUB --help          that subcommand's own help
    neox-distill train ...           the same as `python -m engine.train ...`

Each subcommand is the `main(argv)` of the module that does the job, imported only when it runs,
so `neox-distill --help` loads no torch. The modules stay runnable with `python -m` as well.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module whose main(argv) runs it, one line for --help)
COMMANDS = {
    "train": ("engine.train.__main__", "distill or pretrain (no arguments: the quickstart)"),
    "eval": ("engine.eval.__main__", "score models on held-out text and harness tasks"),
    "generate": ("engine.generate", "sample text from a model folder"),
    "preprocess": ("engine.data.preprocess", "Pile .jsonl(.zst) -> memory-mapped token shards"),
    "cache-teacher": ("engine.commands.cache_teacher", "store a teacher's targets for the "
                      "shards (top-k or sampled)"),
    "memplan": ("engine.commands.memplan", "a run's GPU memory and the largest micro-batch"),
    "plot": ("engine.commands.plot_run", "draw a run's metrics.jsonl as curves.png"),
    "consolidate": ("engine.commands.consolidate_checkpoint", "a sharded (FSDP) checkpoint "
                    "-> a model folder"),
    "quickstart": ("engine.quickstart.pipeline", "the offline CPU quickstart, end to end"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return ("usage: neox-distill COMMAND [ARGS ...]\n"
            "       neox-distill COMMAND --help\n\n"
            "Distill Pythia (GPT-NeoX) language models: teacher -> student on the Pile.\n\n"
            "commands:\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"neox-distill: error: unknown command {name!r}\n\n{usage()}", end="",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return module.main(rest) or 0
    except SystemExit as exc:  # argparse's --help and usage errors
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2


if __name__ == "__main__":
    sys.exit(main())
