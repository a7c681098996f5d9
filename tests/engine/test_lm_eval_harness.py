"""The README's lm-evaluation-harness recipe, run for real (skipped unless lm_eval is installed).

lm_eval is heavy and not a dev dependency; to run this test:

    python -m venv /tmp/lmeval && . /tmp/lmeval/bin/activate
    pip install torch==2.13.0 "lm_eval[hf]==0.4.13" -e ".[dev]"
    pytest tests/engine/test_lm_eval_harness.py

The harness (its own command line, offline) scores a small exported student on a local file
in lambada_openai's format with lambada_openai's task definition; engine.eval scores the
same file. Every document's log-likelihood, the perplexity and the accuracy agree to 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.eval.__main__ import main as eval_main
from engine.model import load_pretrained
from engine.quickstart.corpus import train_bpe_tokenizer
from engine.train.export import export_student
from tests.engine.test_train import VALID_VOCAB, make_assets

pytest.importorskip("lm_eval")

# lambada_openai's definition (lm-evaluation-harness tasks/lambada), reading a local file.
TASK_YAML = """\
task: local_lambada
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def lambada_texts(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefgh"))
    return [" ".join("".join(rng.choice(letters, size=int(rng.integers(1, 5))))
                     for _ in range(int(rng.integers(4, 10)))) for _ in range(count)]


def predictable_texts(folder: Path, contexts: list[str], limit: int) -> list[str]:
    """Contexts completed by the model's own greedy next word, so that accuracy is not 0."""
    import torch
    from tokenizers import Tokenizer

    model, tokenizer = load_pretrained(folder), Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = []
    for context in contexts:
        with torch.no_grad():
            logits = model(torch.tensor([tokenizer.encode(context).ids]))[0, -1]
        word = tokenizer.decode([int(logits.argmax())])
        if word.startswith(" ") and word[1:].isalpha():
            texts.append(context + word)
    return texts[:limit]


def run_harness(folder: Path, data: Path, tmp: Path) -> tuple[dict, list[dict]]:
    """lm_eval's own command line on the local task; (aggregate results, samples)."""
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "local_lambada.yaml").write_text(TASK_YAML.format(data=data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp / "hf-datasets"), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={folder},dtype=float32", "--device", "cpu",
               "--tasks", "local_lambada", "--include_path", str(tasks), "--batch_size", "4",
               "--output_path", str(tmp / "harness"), "--log_samples"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(next((tmp / "harness").rglob("results_*.json")).read_text())
    samples_file = next((tmp / "harness").rglob("samples_local_lambada_*.jsonl"))
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return results["results"]["local_lambada"], sorted(samples, key=lambda s: s["doc_id"])


def test_harness_and_engine_eval_agree_on_an_exported_student(tmp_path, capsys):
    texts = lambada_texts(24, 1)
    tokenizer = tmp_path / "tokenizer.json"
    train_bpe_tokenizer(texts * 4, tokenizer, vocab_size=VALID_VOCAB)
    assets = make_assets(tmp_path / "assets")
    folder = export_student(load_pretrained(assets["student"]), tmp_path / "final",
                            tokenizer_path=tokenizer, pad_id=1)
    texts += predictable_texts(folder, lambada_texts(200, 2), limit=8)
    data = tmp_path / "lambada.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    harness, samples = run_harness(folder, data, tmp_path)
    ours_json = tmp_path / "ours.json"
    assert eval_main(["--model", str(folder), "--task", "lambada", "--data", str(data),
                      "--samples", "--json", str(ours_json), "--no-progress"]) == 0
    ours = json.loads(ours_json.read_text())["results"][0]
    assert len(samples) == len(ours["samples"]) == len(texts)
    for theirs, mine in zip(samples, ours["samples"], strict=True):
        assert theirs["perplexity"] == pytest.approx(mine["ll"], abs=1e-4)  # per document
        assert theirs["acc"] == int(mine["greedy"])
    assert harness["perplexity,none"] == pytest.approx(ours["ppl"], rel=1e-4)
    assert harness["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)
    assert 0 < ours["acc"] < 1
