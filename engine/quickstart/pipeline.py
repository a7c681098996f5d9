"""The offline quickstart: the whole distillation pipeline on a CPU in a few minutes.

`python -m engine.train` with no arguments runs this. Nothing is downloaded and nothing is
committed: the corpus is this machine's own Python standard library, the tokenizer is
trained on it, and the teacher and the student's base are pretrained here, small and briefly.
Then the base is distilled from the teacher through exactly the code a real run uses
(engine.data.preprocess, engine.train.loop.run, engine.eval.scoring.heldout_metrics), and the
held-out perplexities are printed side by side. A distilled student that is not ahead of its base
means something in the pipeline is wrong, so that is an error (exit 1), not a footnote.

    python -m engine.quickstart [--config engine/quickstart/quickstart.toml] [--out-dir DIR]
    [--tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from engine.curves import plot_runs
from engine.data.atomic import write_json_atomic
from engine.data.jsonl import iter_records
from engine.data.loader import build_dataset
from engine.data.owned_folder import ForeignFolderError, clear_owned_folder
from engine.data.preprocess import preprocess
from engine.eval.heldout import heldout_batches, heldout_loader
from engine.eval.requests import TextEncoder
from engine.eval.scoring import heldout_metrics
from engine.eval.tasks import ScoringSetup, evaluate_lambada
from engine.model.hf_io import load_pretrained
from engine.quickstart.corpus import build_stdlib_corpus, train_bpe_tokenizer
from engine.quickstart.last_word import MAX_PASSAGE_TOKENS, build_last_word_task
from engine.train.config import Config, ConfigError, apply_dict, validate
from engine.train.loop import run as train_run

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

DEFAULT_CONFIG = Path(__file__).with_name("quickstart.toml")  # shipped in the package
STAGES = ("teacher_pretrain", "student_base", "distill", "control")
QUICKSTART_KEYS = {
    "out_dir": str,
    "corpus_max_bytes": int,
    "vocab_size": int,
    "eval_batches": int,
    "last_word_items": int,
    "control": bool,
    "torch_threads": int,
}
MARKER = "quickstart.json"  # written at the end; also proves a folder is ours to replace
STARTED = ".quickstart-started"  # written first: the folder is the quickstart's from then on
DATA_NAMES = ("corpus", "tokenizer", "data")  # prepare_data's folders
# Everything the quickstart writes in its folder: all it ever deletes there on a rerun.
OUTPUT_NAMES = (*DATA_NAMES, "tasks", *STAGES, "curves.png")


class QuickstartError(RuntimeError):
    """The pipeline ran but did not show what it must (or could not run); message says why."""


def load_settings(path: str | Path) -> dict[str, Any]:
    """Read the quickstart TOML; unknown tables or [quickstart] keys are errors naming them.

    The engine.train.config tables are checked by the configuration itself when each stage's
    Config is built (before any training starts).
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QuickstartError(f"{path}: quickstart config not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise QuickstartError(f"{path}: not valid TOML: {exc}") from None
    allowed = {"quickstart", "common", *STAGES}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise QuickstartError(f"{path}: unknown table(s) {unknown}; valid: {sorted(allowed)}")
    qs = data.get("quickstart", {})
    for key, value in qs.items():
        if key not in QUICKSTART_KEYS:
            raise QuickstartError(
                f"{path}: unknown key quickstart.{key}; valid: {sorted(QUICKSTART_KEYS)}"
            )
        expected = QUICKSTART_KEYS[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise QuickstartError(
                f"{path}: quickstart.{key} must be {expected.__name__}, got {value!r}"
            )
    missing = sorted(set(QUICKSTART_KEYS) - set(qs))
    if missing:
        raise QuickstartError(f"{path}: [quickstart] is missing {missing}")
    data["source"] = str(path)
    return data


def shrink(settings: dict[str, Any]) -> dict[str, Any]:
    """A much smaller version of the same pipeline (for tests): every code path, ~1 minute."""
    small = copy.deepcopy(settings)
    small["quickstart"].update(corpus_max_bytes=600_000, vocab_size=512, eval_batches=6,
                               last_word_items=100)
    small.setdefault("common", {}).setdefault("batch", {}).update(micro_batch=4, seq_len=64)
    for stage in STAGES:
        run = small.setdefault(stage, {}).setdefault("run", {})
        run["steps"] = max(4, int(run.get("steps", 8)) // 4)
    for stage in ("teacher_pretrain", "student_base"):
        small[stage].setdefault("student", {})["max_positions"] = 64
    return small


def stage_config(settings: dict[str, Any], stage: str, fill: dict[str, dict[str, Any]],
                 *, check: bool = True):
    """The Config of one stage: defaults <- [common] <- [stage] <- filled paths (validated
    unless check is False)."""
    config = Config()
    source = settings.get("source", "quickstart settings")
    apply_dict(config, settings.get("common", {}), source=f"{source} [common]")
    apply_dict(config, settings.get(stage, {}), source=f"{source} [{stage}]")
    apply_dict(config, fill, source=f"quickstart ({stage})")
    return validate(config) if check else config


def _say(message: str) -> None:
    print(f"[quickstart] {message}", flush=True)


def _prepare_out_dir(out_dir: Path) -> None:
    """Start from an empty folder, deleting only a previous quickstart's own output
    (engine.data.owned_folder: its marker is there and every entry is one the quickstart writes)."""
    try:
        clear_owned_folder(out_dir, markers=(STARTED, MARKER), names=OUTPUT_NAMES)
    except ForeignFolderError as exc:
        raise QuickstartError(f"{exc}: it was not written by the quickstart alone; pass "
                              "--out-dir to use another folder") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STARTED).write_text("the quickstart owns this folder\n")


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def held_out(model_dir: str, data_dir: Path, config, *, teacher_dir: str | None,
             eval_batches: int, last_word: Path, tokenizer_path: Path) -> dict[str, float]:
    """Held-out metrics of one exported model on the val split every stage held out, and
    its LAMBADA-style scores on the last-word file (engine.eval's lambada task)."""
    model = load_pretrained(model_dir, dtype=torch.float32, device="cpu")
    teacher = load_pretrained(teacher_dir, dtype=torch.float32) if teacher_dir else None
    dataset = build_dataset(data_dir, "packed", config.batch.seq_len)
    loader = heldout_loader(dataset, config.batch.micro_batch,
                            val_fraction=config.data.val_fraction)
    metrics = heldout_metrics(
        model,
        heldout_batches(loader, max_batches=eval_batches or None),
        teacher=teacher,
        temperature=config.loss.temperature,
        valid_vocab=config.data.valid_vocab or None,
    )
    metrics["params"] = model.num_parameters()
    setup = ScoringSetup(model=model, max_length=model.config.max_positions, progress=False)
    encoder = TextEncoder(tokenizer_path, eos_id=model.config.eos_token_id)
    scores = evaluate_lambada(setup, encoder, last_word)
    metrics.update(last_word_ppl=scores["ppl"], last_word_acc=scores["acc"],
                   last_word_items=scores["documents"])
    return metrics


class _Laps:
    """Wall time of each pipeline stage, said as the stage ends."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 2)
        _say(f"{name}: {self.timings[name]:.1f} s")


def prepare_data(qs: dict[str, Any], out_dir: Path, lap: _Laps) -> dict[str, Any]:
    """Corpus -> tokenizer -> shards, under out_dir; returns where each went."""
    with lap("corpus"):
        corpus_path = out_dir / "corpus" / "stdlib.jsonl.zst"
        corpus = build_stdlib_corpus(corpus_path, max_bytes=qs["corpus_max_bytes"])
        _say(f"corpus: {corpus['documents']} documents, {corpus['characters']:,} characters "
             f"from {corpus['source']} -> {corpus_path}")
    with lap("tokenizer"):
        tokenizer_path = out_dir / "tokenizer" / "tokenizer.json"
        # Trained on the corpus file itself, so it sees exactly the documents the shards hold.
        texts = (r.text for r in iter_records(corpus_path, 0) if r.text is not None)
        vocab = train_bpe_tokenizer(texts, tokenizer_path, vocab_size=qs["vocab_size"])
        _say(f"tokenizer: byte-level BPE, {vocab} ids -> {tokenizer_path}")
    with lap("preprocess"):
        data_dir = out_dir / "data"
        manifest = preprocess([corpus_path], tokenizer_path, data_dir, workers=1)
        _say(f"preprocess: {manifest['totals']['tokens']:,} tokens -> {data_dir}")
    return {"corpus": corpus, "tokenizer_path": tokenizer_path, "vocab": vocab,
            "data_dir": data_dir}


def prepare_last_word(settings: dict[str, Any], out_dir: Path, data: dict[str, Any],
                      lap: _Laps) -> Path:
    """The LAMBADA-style task file (engine/quickstart/last_word.py): passages of held-out
    standard-library files, each within the distill stage's seq_len and MAX_PASSAGE_TOKENS."""
    qs = settings["quickstart"]
    with lap("last-word task"):
        path = out_dir / "tasks" / "last_word.jsonl"
        encoder = TextEncoder(data["tokenizer_path"])
        seq_len = stage_config(settings, "distill", {}, check=False).batch.seq_len
        task = build_last_word_task(path, corpus_max_bytes=qs["corpus_max_bytes"],
                                    items=qs["last_word_items"],
                                    encode_batch=encoder.encode_batch,
                                    max_tokens=min(seq_len, MAX_PASSAGE_TOKENS))
        _say(f"last-word task: {task['items']} passages of {task['files']} held-out files "
             f"-> {path}")
    return path


def train_stages(settings: dict[str, Any], out_dir: Path, data: dict[str, Any],
                 lap: _Laps) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Pretrain the teacher and the student base, then distill (and the CE-only control);
    returns ({stage: run result}, {stage: Config})."""
    runs: dict[str, dict[str, Any]] = {}
    configs: dict[str, Any] = {}

    def fill(stage: str, **sections) -> dict[str, dict[str, Any]]:
        base = {
            # val_batches: each run validates on the very tokens the table scores, so the
            # held-out ppl of curves.png and of the table are one number for one model.
            "run": {"out_dir": str(out_dir / stage), "resume": "none",
                    "tokenizer": str(data["tokenizer_path"]),
                    "val_batches": settings["quickstart"]["eval_batches"]},
            "data": {"path": str(data["data_dir"]), "valid_vocab": data["vocab"]},
        }
        for name, table in sections.items():
            base.setdefault(name, {}).update(table)
        return base

    for stage in STAGES:
        if stage == "control" and not settings["quickstart"]["control"]:
            continue
        if stage in ("teacher_pretrain", "student_base"):
            stage_fill = fill(stage, student={"vocab_size": data["model_vocab"]},
                              teacher={"path": ""})
        else:
            teacher = runs["teacher_pretrain"]["export_dir"] if stage == "distill" else ""
            stage_fill = fill(stage, teacher={"path": teacher}, student={
                "init": "pretrained", "path": runs["student_base"]["export_dir"]})
            if stage == "distill":  # watch the last-word score while distilling
                stage_fill["eval"] = {"tasks": [f"lambada={data['last_word']}"]}
        config = configs[stage] = stage_config(settings, stage, stage_fill)
        _say(f"{stage}: {config.run.steps} steps of {config.batch.micro_batch} x "
             f"{config.batch.seq_len} tokens"
             + (f", teacher {config.teacher.path}" if config.teacher.path else ", CE only"))
        with lap(stage):
            result = train_run(config)
        if result.get("status") != "completed":
            raise QuickstartError(f"{stage}: training ended with status {result.get('status')!r}")
        runs[stage] = result
    return runs, configs


def evaluate_stages(runs: dict[str, dict[str, Any]], reference, data: dict[str, Any],
                    eval_batches: int) -> list[dict[str, Any]]:
    """One held-out row per exported model, each against the pretrained teacher."""
    base_steps = runs["student_base"]["steps"]
    models = [
        ("student base (CE pretrain)", "student_base", base_steps),
        ("teacher (CE pretrain)", "teacher_pretrain", runs["teacher_pretrain"]["steps"]),
    ]
    if "control" in runs:
        models.append(("student + CE only (control)", "control",
                       base_steps + runs["control"]["steps"]))
    models.append(("student distilled (KD + CE)", "distill",
                   base_steps + runs["distill"]["steps"]))
    rows = []
    teacher_export = runs["teacher_pretrain"]["export_dir"]
    for label, stage, steps in models:
        export = runs[stage]["export_dir"]
        metrics = held_out(export, data["data_dir"], reference,
                           teacher_dir=teacher_export if stage != "teacher_pretrain" else None,
                           eval_batches=eval_batches, last_word=data["last_word"],
                           tokenizer_path=data["tokenizer_path"])
        rows.append({"model": label, "stage": stage, "steps": steps, "path": export, **metrics})
    return rows


def draw_curves(runs: dict[str, dict[str, Any]], out_dir: Path) -> str | None:
    """curves.png: the distilled student's training against the CE-only control's (when
    matplotlib is installed; the plot extra)."""
    if importlib.util.find_spec("matplotlib") is None:
        _say("curves: skipped (pip install matplotlib, or '.[plot]', to get curves.png)")
        return None
    stages = [stage for stage in ("distill", "control") if stage in runs]
    path = out_dir / "curves.png"
    plot_runs([runs[stage]["out_dir"] for stage in stages], path)
    _say(f"curves: {' vs '.join(stages)} -> {path}")
    return str(path)


def run_pipeline(settings: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The whole quickstart under out_dir; returns the table rows and where everything is."""
    qs = settings["quickstart"]
    if qs["torch_threads"] > 0:
        # These models are far too small for intra-op threads to pay; on a busy machine the
        # spinning worker threads made every step several times slower than one thread.
        torch.set_num_threads(qs["torch_threads"])
    lap = _Laps()
    _prepare_out_dir(out_dir)
    data = prepare_data(qs, out_dir, lap)
    # Model vocab rounded up like Pythia's 50304 rows for 50277 ids; padding rows excluded
    # from every softmax through data.valid_vocab.
    data["model_vocab"] = _round_up(data["vocab"], 64)
    data["last_word"] = prepare_last_word(settings, out_dir, data, lap)
    runs, configs = train_stages(settings, out_dir, data, lap)
    curves = draw_curves(runs, out_dir)
    with lap("evaluation"):
        rows = evaluate_stages(runs, configs["distill"], data, qs["eval_batches"])
    lap.timings["total"] = round(time.perf_counter() - lap.started, 2)
    return {
        "rows": rows,
        "timings_s": lap.timings,
        "corpus": data["corpus"],
        "tokenizer": {"path": str(data["tokenizer_path"]), "vocab": data["vocab"],
                      "model_vocab": data["model_vocab"]},
        "data_dir": str(data["data_dir"]),
        "last_word_task": str(data["last_word"]),
        "curves": curves,
        "runs": {k: {"out_dir": v["out_dir"], "metrics_path": v.get("metrics_path"),
                     "checkpoint": v.get("checkpoint"), "export_dir": v["export_dir"]}
                 for k, v in runs.items()},
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'model':<30}{'params':>10}{'steps':>7}{'held-out CE':>13}{'ppl':>10}"
              f"{'KD to teacher':>15}{'last-word ppl':>15}{'acc':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        kd = f"{row['kd']:.4f}" if "kd" in row else "-"
        lines.append(
            f"{row['model']:<30}{row['params'] / 1e6:>9.2f}M{row['steps']:>7}"
            f"{row['ce']:>13.4f}{row['ppl']:>10.2f}{kd:>15}"
            f"{row['last_word_ppl']:>15.2f}{row['last_word_acc']:>8.3f}"
        )
    tokens = rows[0].get("tokens")
    lines.append(f"(held-out: {int(tokens) if tokens else '?'} tokens of the val split, "
                 "never trained on, the same the runs validate on (curves.png); "
                 "KD = mean T^2 KL(teacher || model), T = 2)")
    lines.append(f"(last word: LAMBADA-style, {rows[0]['last_word_items']} passages of "
                 "standard-library files left out of the corpus, each ending with a name its "
                 "earlier lines use; ppl of that word, acc = greedy match)")
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]]) -> tuple[bool, list[str]]:
    """(distilled ahead of its base, explanatory lines)."""
    by_stage = {row["stage"]: row for row in rows}
    base, distilled = by_stage["student_base"], by_stage["distill"]
    teacher = by_stage["teacher_pretrain"]
    notes = []
    ok = math.isfinite(distilled["ppl"]) and distilled["ppl"] < base["ppl"]
    gain = 100 * (1 - distilled["ppl"] / base["ppl"])
    notes.append(f"distilled student vs its base: ppl {distilled['ppl']:.2f} vs {base['ppl']:.2f} "
                 f"({gain:+.1f}%) -> {'AHEAD' if ok else 'NOT AHEAD'}")
    change = 100 * (distilled["last_word_ppl"] / base["last_word_ppl"] - 1)
    notes.append(f"last word (LAMBADA-style) of the distilled student vs its base: ppl "
                 f"{distilled['last_word_ppl']:.2f} vs {base['last_word_ppl']:.2f} "
                 f"({change:+.1f}%), acc {distilled['last_word_acc']:.3f} vs "
                 f"{base['last_word_acc']:.3f}")
    if teacher["ppl"] >= base["ppl"]:
        notes.append("warning: the teacher is not better than the student's base; the "
                     "teacher needs more pretraining steps for distillation to mean anything")
    if "control" in by_stage:
        control = by_stage["control"]
        better = distilled["ppl"] < control["ppl"]
        notes.append(
            f"distilled vs the same steps with CE only: ppl {distilled['ppl']:.2f} vs "
            f"{control['ppl']:.2f} -> "
            + ("the teacher helped" if better else "no gain from the teacher at this tiny scale")
        )
    return ok, notes


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="neox-distill quickstart",
        description="Offline CPU quickstart: stdlib corpus -> BPE tokenizer -> shards -> "
        "pretrain teacher and student base -> distill -> held-out comparison.",
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--out-dir", default=None, help="run folder (default from the config)")
    parser.add_argument("--tiny", action="store_true",
                        help="a much smaller run of every step (for tests), about a minute")
    return parser.parse_args(sys.argv[1:] if argv is None else argv)


def print_summary(result: dict[str, Any], out_dir: Path) -> None:
    """The table, the verdict's notes, and where every artefact is."""
    print()
    print("Held-out perplexity and LAMBADA-style last word (Table-1 style)")
    print(format_table(result["rows"]))
    print()
    for line in result["notes"]:
        print(line)
    print()
    print(f"run folder : {out_dir}")
    for stage, info in result["runs"].items():
        print(f"  {stage:<17} metrics {info['metrics_path']}  checkpoint {info['checkpoint']}"
              f"  export {info['export_dir']}")
    print(f"  corpus {result['corpus']['path']}, tokenizer {result['tokenizer']['path']}, "
          f"shards {result['data_dir']}")
    print(f"  summary {out_dir / MARKER}"
          + (f", curves {result['curves']}" if result.get("curves") else ""))
    laps = ", ".join(f"{k} {v:.0f}s" for k, v in result["timings_s"].items())
    print(f"wall time: {result['wall_s']:.1f} s  ({laps})")


def main(argv: list[str] | None = None) -> int:
    """Run the quickstart; 0 when the distilled student is ahead of its base, 1 when it is
    not, 2 when it could not run (the message says why)."""
    args = _parse_args(argv)
    started = time.perf_counter()
    try:
        settings = load_settings(args.config)
        if args.tiny:
            settings = shrink(settings)
        out_dir = Path(args.out_dir or settings["quickstart"]["out_dir"])
        _say(f"offline CPU quickstart ({args.config}{', tiny' if args.tiny else ''}) -> {out_dir}")
        result = run_pipeline(settings, out_dir)
    except (QuickstartError, ConfigError, ValueError, OSError) as exc:
        print(f"quickstart: error: {exc}", file=sys.stderr)
        return 2
    ok, notes = verdict(result["rows"])
    wall = time.perf_counter() - started
    result.update(ok=ok, notes=notes, wall_s=round(wall, 1), tiny=args.tiny)
    write_json_atomic(out_dir / MARKER, result, default=str)
    print_summary(result, out_dir)
    if not ok:
        print(
            "quickstart: FAILED: the distilled student is not ahead of its base. Continued "
            "training alone should lower held-out perplexity, so a loss, optimizer, data or "
            "checkpoint path is broken (or the settings were changed to train too little).",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
