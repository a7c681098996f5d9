"""What an export says about itself: a model card (README.md) and the tokenizer's settings.

The card follows the Hugging Face model-card form of the Pythia cards (YAML front matter:
license, language, tags, datasets, base model; then prose and tables) and holds only facts of
the run that wrote it: the models, the data fingerprint, the tokens seen, the resolved recipe
and the held-out metrics the run measured, and the commands that load and evaluate the folder.

tokenizer_config.json and special_tokens_map.json make the folder complete for transformers'
AutoTokenizer: GPT-NeoX's <|endoftext|> (the model's eos id) as bos, eos and unk, and the
data's pad id token as pad, as the Pythia folders have them.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

from engine.data.tokenizer_file import TokenizerFileError, read_tokenizer_file
from engine.memory import parameter_count
from engine.model.config import PYTHIA_COMMON, PYTHIA_SHAPES, GPTNeoXConfig

CARD_NAME = "README.md"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"
HARNESS_TASKS = "piqa,winogrande,lambada_openai,arc_easy,sciq,wsc"


# --------------------------------------------------------------------------------------
# Tokenizer files
# --------------------------------------------------------------------------------------


def tokenizer_settings(tokenizer_json: Path, model_config: GPTNeoXConfig,
                       pad_id: int | None) -> tuple[dict[str, Any], dict[str, str]]:
    """(tokenizer_config.json, special_tokens_map.json) for the tokenizer.json beside them.

    Tokens are named by id from the tokenizer itself (the model's bos/eos ids, the data's pad
    id), so a tokenizer whose ids differ from GPT-NeoX's is described as it is.
    """
    tokenizer = read_tokenizer_file(tokenizer_json).tokenizer  # TokenizerFileError names it
    roles = {"bos_token": model_config.bos_token_id, "eos_token": model_config.eos_token_id,
             "unk_token": model_config.eos_token_id, "pad_token": pad_id}
    special = {role: tokenizer.id_to_token(i) for role, i in roles.items() if i is not None}
    special = {role: token for role, token in special.items() if token is not None}
    config = {
        "tokenizer_class": "GPTNeoXTokenizer",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_config.max_positions,
    }
    return config, special


def write_tokenizer_files(folder: Path, model_config: GPTNeoXConfig, pad_id: int | None,
                          *, source: Path | None = None) -> bool:
    """tokenizer_config.json + special_tokens_map.json beside folder/tokenizer.json (in a
    staged folder: the caller swaps it into place), read from `source`, the file it was copied
    from. False, with a warning naming it, when the tokenizers library cannot read it: the
    finished run's export still happens."""
    try:
        config, special = tokenizer_settings(source or folder / "tokenizer.json", model_config,
                                             pad_id)
    except TokenizerFileError as error:
        warnings.warn(f"{error}; exported as is, without {TOKENIZER_CONFIG_NAME} and "
                      f"{SPECIAL_TOKENS_MAP_NAME}", RuntimeWarning, stacklevel=2)
        return False
    for name, payload in ((TOKENIZER_CONFIG_NAME, config), (SPECIAL_TOKENS_MAP_NAME, special)):
        (folder / name).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return True


# --------------------------------------------------------------------------------------
# Facts of a run
# --------------------------------------------------------------------------------------


def pythia_name(config: GPTNeoXConfig) -> str | None:
    """"pythia-70m" when `config` is exactly a Pythia size's shape, else None."""
    for name, shape in PYTHIA_SHAPES.items():
        wanted = {**PYTHIA_COMMON, **shape}
        if all(getattr(config, key) == value for key, value in wanted.items()):
            return name
    return None


def describe_shape(config: GPTNeoXConfig) -> str:
    shape = (f"{config.num_layers} layers, hidden {config.hidden_size}, {config.num_heads} heads, "
             f"MLP {config.intermediate_size}, vocab {config.vocab_size}, "
             f"context {config.max_positions}")
    name = pythia_name(config)
    return f"{name} ({shape})" if name else f"custom GPT-NeoX ({shape})"


def hub_base_model(path: str, config: GPTNeoXConfig) -> str | None:
    """EleutherAI/pythia-70m(-deduped) when a pretrained student's folder is a Pythia
    download of the same shape (its name, or a hub cache's models--EleutherAI--... folder)."""
    name = pythia_name(config)
    if not path or name is None:
        return None
    for part in reversed(Path(path).parts):
        match = re.search(rf"(?<![a-z0-9])({re.escape(name)}(-deduped)?)(?![\w.-])", part,
                          re.IGNORECASE)
        if match:
            return f"EleutherAI/{match.group(1).lower()}"
    return None


def data_inputs(dataset) -> tuple[list[str], int]:
    """(the input files engine.data.preprocess read, tokens in the shards) from the manifest."""
    shards = dataset.shards
    manifest = shards.manifest or {}
    inputs = [str(entry.get("path", "?")) for entry in manifest.get("inputs", [])]
    return inputs, int(shards.total_tokens)


def run_facts(trainer) -> dict[str, Any]:
    """The numbers the card states, read from a finished engine.train.loop.Trainer."""
    config = trainer.config
    inputs, total_tokens = data_inputs(trainer.dataset)
    teacher = trainer.teacher
    teacher_config = teacher.config if teacher is not None else None
    teacher_params = teacher.num_parameters() if teacher is not None else 0
    cached = trainer.signal if trainer.signal.from_cache else None
    if cached is not None and teacher is None:  # the teacher as the cache recorded it
        teacher_config = GPTNeoXConfig.from_hf_dict(cached.manifest["teacher"]["config"],
                                                    source=f"{cached.cache.folder} manifest")
        teacher_params = parameter_count(teacher_config)["total"]
    return {
        "config": config,
        "student_config": trainer.student.config,
        "student_params": trainer.student.num_parameters(),
        "teacher_config": teacher_config,
        "teacher_params": teacher_params,
        "teacher_cache": cached.describe() if cached is not None else None,
        "fingerprint": trainer.dataset.fingerprint(),
        "inputs": inputs,
        "shard_tokens": total_tokens,
        "steps": trainer.step,
        "tokens_per_step": trainer.tokens_per_step,
        "micro_batch": trainer.micro_batch,
        "accum_steps": trainer.accum_steps,
        "world_size": trainer.info.world_size,
        "val": trainer.last_val,
    }


# --------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------


def front_matter(facts: dict[str, Any]) -> str:
    config = facts["config"]
    from_pile = any("pile" in path.lower() for path in facts["inputs"])
    distilled = facts["teacher_config"] is not None
    tags = ["pytorch", "causal-lm", "gpt_neox", "neox-distill"]
    tags += ["pythia"] if pythia_name(facts["student_config"]) else []
    tags += ["knowledge-distillation"] if distilled else []
    lines = ["---", "license: apache-2.0"]
    lines += ["language:", "- en"] if from_pile else []
    lines += ["library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {tag}" for tag in tags]
    lines += ["datasets:", "- EleutherAI/pile"] if from_pile else []
    base = hub_base_model(config.student.path, facts["student_config"]) \
        if config.student.init == "pretrained" else None
    lines += [f"base_model: {base}"] if base else []
    return "\n".join([*lines, "---"])


def _models_section(facts: dict[str, Any]) -> list[str]:
    config = facts["config"]
    student_from = (f"`{config.student.path}`" if config.student.init == "pretrained"
                    else "fresh weights (`student.init = \"scratch\"`)")
    rows = [f"| student | {student_from} | {describe_shape(facts['student_config'])} | "
            f"{facts['student_params']:,} |"]
    if facts["teacher_config"] is not None:
        source = (f"`{config.teacher.path}`" if config.teacher.path
                  else f"read from its cache `{config.teacher.cache}`")
        rows.append(f"| teacher (frozen, {config.teacher.dtype}) | {source} | "
                    f"{describe_shape(facts['teacher_config'])} | {facts['teacher_params']:,} |")
    return ["## Models", "", "| role | from | config | parameters |", "|---|---|---|---:|",
            *rows, ""]


def _data_section(facts: dict[str, Any]) -> list[str]:
    config = facts["config"]
    inputs = ", ".join(f"`{p}`" for p in facts["inputs"][:5])
    if len(facts["inputs"]) > 5:
        inputs += f" and {len(facts['inputs']) - 5} more"
    origin = (f"made by `neox-distill preprocess` from {inputs}" if inputs
              else "no manifest.json, so their source files are not recorded")
    tokens_seen = facts["steps"] * facts["tokens_per_step"]
    return [
        "## Data", "",
        f"- token shards: `{config.data.path}` ({facts['shard_tokens']:,} tokens), {origin}",
        f"- shard fingerprint: `{facts['fingerprint']}`",
        f"- sequences: `{config.data.mode}`, {config.batch.seq_len} tokens; "
        f"held out for validation: {config.data.val_fraction:g} of them, never trained on",
        f"- tokens seen: {tokens_seen:,} ({facts['steps']} optimizer steps x "
        f"{facts['tokens_per_step']:,} tokens)", "",
    ]


def _recipe_section(facts: dict[str, Any]) -> list[str]:
    config = facts["config"]
    loss, optim = config.loss, config.optim
    rows = [("steps", f"{facts['steps']} (of {config.run.steps} planned)"),
            ("batch", f"{facts['micro_batch']} sequences x {facts['accum_steps']} accumulation "
                      f"x {facts['world_size']} rank(s) x {config.batch.seq_len} tokens = "
                      f"{facts['tokens_per_step']:,} tokens per step"),
            ("precision", config.precision),
            ("learning rate", f"{optim.lr:g}, {optim.schedule}, {optim.warmup_steps} warm-up "
                              f"steps, min {optim.min_lr:g}"),
            ("optimizer", f"AdamW, betas {tuple(optim.betas)}, weight decay "
                          f"{optim.weight_decay:g}, grad clip {optim.grad_clip or 'none'}"),
            ("seed", str(config.run.seed))]
    if facts["teacher_config"] is not None:
        rows[:0] = [("loss", f"{loss.alpha:g} x CE + {1 - loss.alpha:g} x KD"),
                    ("temperature T", f"{loss.temperature:g}"),
                    ("divergence", loss.divergence)]
        if facts.get("teacher_cache"):
            rows.insert(1, ("teacher signal", facts["teacher_cache"]))
    else:
        rows[:0] = [("loss", "cross-entropy only (no teacher)")]
    return ["## Training recipe", "", "| setting | value |", "|---|---|",
            *(f"| {name} | {value} |" for name, value in rows), "",
            "The resolved configuration is `config.toml` in the run folder "
            f"(`{config.run.out_dir}`).", ""]


def non_finite_metrics(val: dict[str, Any] | None) -> dict[str, Any]:
    """The held-out metrics of a validation that the card would publish and that are not
    finite numbers (NaN, inf, null): a run holding any of them has no result to publish."""
    names = ("val_ce", "val_ppl", "val_kd", "val_teacher_ce", "val_tokens")
    return {key: (val or {})[key] for key in names if key in (val or {})
            and not (isinstance(val[key], (int, float)) and math.isfinite(val[key]))}


def _metrics_section(facts: dict[str, Any]) -> list[str]:
    val = facts["val"]
    bad = non_finite_metrics(val)
    if bad:  # the run refuses to finish before this (engine.train.loop._check_final_state)
        raise ValueError(f"held-out metrics that are not finite: {bad}; no model card")
    if not val:
        return ["## Held-out metrics", "", "Not measured: the run held out no data "
                "(`data.val_fraction = 0`).", ""]
    names = {"val_ce": "cross-entropy (nats per token)", "val_ppl": "perplexity",
             "val_kd": f"KD to the teacher ({val.get('val_divergence', 'forward_kl')}, "
                       "per token; docs/loss.md)",
             "val_teacher_ce": "teacher's cross-entropy on the same tokens",
             "val_tokens": "tokens scored"}
    if val.get("val_kd_source") == "cache":
        names["val_kd"] = "KD to the teacher cache (the training loss's KD term against it)"
    rows = [f"| {label} | {val[key]:.6g} |" for key, label in names.items() if key in val]
    return ["## Held-out metrics", "",
            f"Measured by the run at step {facts['steps']} on its validation split:", "",
            "| metric | value |", "|---|---:|", *rows, ""]


def heldout_command(facts: dict[str, Any], folder: str) -> str:
    """The engine.eval call that scores this run's validation split as the run did."""
    config = facts["config"]
    data = config.data
    args = [f"neox-distill eval --model {folder} --task ppl --data {data.path}",
            f"--heldout {data.mode} --val-fraction {data.val_fraction:g}",
            f"--max-length {config.batch.seq_len} --batch-size {facts['micro_batch']}"]
    if data.mode == "padded":
        args.append(f"--pad-id {data.pad_id}")
    if data.valid_vocab:
        args.append(f"--valid-vocab {data.valid_vocab}")
    if config.run.val_batches:
        args.append(f"--limit {config.run.val_batches * facts['micro_batch']}")
    if facts["teacher_config"] is not None and config.teacher.path:
        args.append(f"--teacher {config.teacher.path} --temperature {config.loss.temperature:g}")
        loss = config.loss
        kd = {"--divergence": loss.divergence, "--beta": f"{loss.beta:g}",
              "--skew": f"{loss.skew:g}"}
        if (loss.divergence, loss.beta, loss.skew, loss.t2_scale) != ("forward_kl", 0.5, 0.1,
                                                                      True):
            args.append(" ".join(f"{flag} {value}" for flag, value in kd.items())
                        + ("" if loss.t2_scale else " --no-t2-scale"))
    return " \\\n    ".join(args)


def _usage_section(facts: dict[str, Any], export_dir: Path, has_tokenizer: bool) -> list[str]:
    folder = str(export_dir)
    ranks = facts["world_size"]
    split_note = (f" (the run's {ranks} ranks each scored their own share of it, so this "
                  "single-process call can differ slightly)" if ranks > 1 else "")
    tokenizer_note = [] if has_tokenizer else [
        "", "No tokenizer was exported with this folder (`run.tokenizer` was not set): pass "
        "the student's own tokenizer to `AutoTokenizer` and `--tokenizer`."]
    return [
        "## Use and evaluate", "",
        "```python",
        "from transformers import AutoTokenizer, GPTNeoXForCausalLM",
        f'tokenizer = AutoTokenizer.from_pretrained("{folder}")',
        f'model = GPTNeoXForCausalLM.from_pretrained("{folder}")',
        "```", *tokenizer_note, "",
        "lm-evaluation-harness, the Pythia paper's zero-shot tasks:", "",
        "```bash",
        f"lm_eval --model hf --model_args pretrained={folder},dtype=float32 \\",
        f"    --tasks {HARNESS_TASKS} --batch_size 16",
        "```", "",
        "neox-distill's own scoring with the harness's definitions (data files in its jsonl "
        "format), and the held-out metrics above, recomputed" + split_note + ":", "",
        "```bash",
        f"neox-distill eval --model {folder} --task lambada --data lambada_openai.jsonl",
        heldout_command(facts, folder),
        "```", "",
    ]


def _title(config, export_dir: Path) -> str:
    """The export folder's name, or the run folder's for the default <out_dir>/final."""
    name = Path(export_dir).resolve().name
    return Path(config.run.out_dir).resolve().name if name == "final" else name


def render_model_card(facts: dict[str, Any], export_dir: Path, *, has_tokenizer: bool) -> str:
    """The README.md of an export, from run_facts()."""
    config = facts["config"]
    student = pythia_name(facts["student_config"]) or "GPT-NeoX"
    if facts["teacher_config"] is not None:
        teacher = pythia_name(facts["teacher_config"]) or "GPT-NeoX"
        summary = (f"A {student} student distilled from a {teacher} teacher "
                   f"(alpha {config.loss.alpha:g}, T {config.loss.temperature:g})")
    else:
        summary = f"A {student} model trained with cross-entropy alone (no teacher)"
    lines = [
        front_matter(facts), "", f"# {_title(config, export_dir)}", "",
        f"{summary} by neox-distill for {facts['steps']} steps "
        f"({facts['steps'] * facts['tokens_per_step']:,} tokens). Loads unchanged in "
        "transformers' `GPTNeoXForCausalLM` and in lm-evaluation-harness.", "",
        *_models_section(facts), *_data_section(facts), *_recipe_section(facts),
        *_metrics_section(facts), *_usage_section(facts, export_dir, has_tokenizer),
    ]
    return "\n".join(lines)


def model_card_for(trainer, export_dir: Path) -> str:
    """The card of a finished Trainer's export."""
    return render_model_card(run_facts(trainer), export_dir,
                             has_tokenizer=bool(trainer.config.run.tokenizer))
