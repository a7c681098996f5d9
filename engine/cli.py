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
    "train": ("engine.train.__main__", "distill (or pretrain) a model: --config FILE "
              "--section.key=value ...; no arguments runs the quickstart"),
    "eval": ("engine.eval.__main__", "score model folders on held-out text and "
             "lm-evaluation-harness tasks"),
    "generate": ("engine.generate", "sample text from a model folder"),
    "preprocess": ("engine.data.preprocess", "turn Pile .jsonl(.zst) into memory-mapped "
                   "token shards"),
    "cache-teacher": ("engine.commands.cache_teacher", "run the teacher once over the shards "
                      "and store its top-k / sampled targets"),
    "memplan": ("engine.commands.memplan", "plan a run's GPU memory and the largest "
                "micro-batch that fits"),
    "plot": ("engine.commands.plot_run", "draw a run's metrics.jsonl as curves.png"),
    "consolidate": ("engine.commands.consolidate_checkpoint", "turn a sharded (FSDP) "
                    "checkpoint into a plain model folder"),
    "quickstart": ("engine.quickstart.pipeline", "the offline CPU quickstart: corpus, "
                   "tokenizer, shards, pretrain, distill, compare"),
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
