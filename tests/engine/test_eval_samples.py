"""engine.eval's `samples` task: the teacher's NLL of a model's own samples.

The expected numbers are computed here from the teacher's full logits in float64, one row at a
time, over the tokens the sampler wrote (engine.sampling.sample, checked on its own in
test_sampling.py, replayed with the same seed and batches); the task batches, relabels and
projects only the generated positions through the teacher's head.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from engine.data.loader import BatchLoader, build_dataset
from engine.data.shards import ShardSet
from engine.eval.__main__ import main as eval_main
from engine.eval.requests import EvalInputError
from engine.eval.samples import sampled_teacher_nll
from engine.model import GPTNeoXConfig, load_pretrained
from engine.on_policy import SamplingSettings
from engine.sampling import new_generator, sample
from tests.engine.test_generate import prompts, random_model
from tests.engine.test_model import perturbed
from tests.engine.test_train import VALID_VOCAB, assets  # noqa: F401 (the fixture)


def reference_nll(model, teacher, prompt_rows, settings, seed, batch_size):
    """(mean NLL per generated token, generated tokens) in float64 from full teacher logits."""
    generator = new_generator(seed)
    columns = settings.valid_vocab or model.config.vocab_size
    total, count = 0.0, 0
    for start in range(0, len(prompt_rows), batch_size):
        rows = prompt_rows[start: start + batch_size, : settings.prompt_tokens]
        drawn = sample(model, rows, settings.new_tokens, temperature=settings.temperature,
                       top_k=settings.top_k, top_p=settings.top_p,
                       stop_token=settings.stop_token, valid_vocab=settings.valid_vocab,
                       generator=generator, stop_early=False)
        for row in range(rows.shape[0]):
            sequence = torch.cat((rows[row], drawn.tokens[row]))[None]
            with torch.no_grad():
                logits = teacher(sequence)[0].double()[:, :columns]
            logp = logits.log_softmax(-1)
            for step in range(settings.new_tokens):
                if drawn.mask[row, step]:
                    position = rows.shape[1] - 1 + step  # predicts new token `step`
                    total -= float(logp[position, drawn.tokens[row, step]])
                    count += 1
    return total / count, count


def test_teacher_nll_equals_a_float64_reference_with_stops_and_valid_vocab():
    model, teacher = random_model(seed=3), random_model(seed=5)
    model.train()
    rows = prompts(batch=5, length=8, seed=2)
    # 4 columns and stop token 0: rows stop at different steps, so the mask matters.
    settings = SamplingSettings(prompt_tokens=6, new_tokens=9, temperature=1.0, stop_token=0,
                                valid_vocab=4)
    got = sampled_teacher_nll(model, teacher, rows, settings, seed=7, batch_size=2)
    expected, count = reference_nll(model, teacher, rows, settings, seed=7, batch_size=2)
    assert got["tokens"] == count
    assert 5 < count < 5 * 9  # some rows really stopped early
    assert got["teacher_nll"] == pytest.approx(expected, rel=1e-5)
    assert got["teacher_ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert got["mean_new_tokens"] == count / 5 and got["documents"] == 5
    assert model.training and not teacher.training  # modes restored


def test_same_seed_same_numbers_other_seed_other_samples():
    model, teacher = random_model(seed=3), random_model(seed=5)
    rows = prompts(batch=4, length=6, seed=4)
    settings = SamplingSettings(prompt_tokens=6, new_tokens=12, temperature=1.0, top_k=50)
    first = sampled_teacher_nll(model, teacher, rows, settings, seed=1, batch_size=3)
    again = sampled_teacher_nll(model, teacher, rows, settings, seed=1, batch_size=3)
    other = sampled_teacher_nll(model, teacher, rows, settings, seed=2, batch_size=3)
    assert first == again
    assert other["teacher_nll"] != first["teacher_nll"]


def test_the_model_grading_its_own_greedy_samples_beats_another_teacher():
    model, stranger = random_model(seed=3), random_model(seed=6)
    rows = prompts(batch=6, length=5, seed=8)
    greedy = SamplingSettings(prompt_tokens=5, new_tokens=10, temperature=0.0)
    own = sampled_teacher_nll(model, model, rows, greedy)
    other = sampled_teacher_nll(model, stranger, rows, greedy)
    assert own["teacher_nll"] < other["teacher_nll"] - 1.0
    # Greedy tokens are each position's argmax: their NLL is at most log(vocab) each.
    assert own["teacher_nll"] < math.log(model.config.vocab_size)


def test_python_entry_refuses_bad_prompts_and_a_smaller_teacher_vocabulary():
    model = random_model(seed=3)
    small = perturbed(GPTNeoXConfig(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4,
                                    intermediate_size=192, max_positions=128), seed=1)
    settings = SamplingSettings(prompt_tokens=4, new_tokens=2)
    with pytest.raises(EvalInputError, match="teacher's vocab_size 100 is smaller"):
        sampled_teacher_nll(model, small, prompts(batch=2, length=4), settings)
    with pytest.raises(EvalInputError, match=r"prompts: expected a non-empty \[N, P\]"):
        sampled_teacher_nll(model, model, torch.zeros(0, 4, dtype=torch.long), settings)
    with pytest.raises(ValueError, match="prompt_tokens: 4 is longer than the batch's 3"):
        sampled_teacher_nll(model, model, prompts(batch=2, length=3), settings)


def _cli(assets, out, *extra):  # noqa: F811 (the fixture's name)
    return ["--model", str(assets["student"]), "--teacher", str(assets["teacher"]),
            "--task", "samples", "--data", str(assets["data"]), "--json", str(out),
            "--no-progress", "--batch-size", "4", *extra]


def test_cli_skips_short_documents_and_equals_the_python_entry(assets, tmp_path):  # noqa: F811
    out = tmp_path / "samples.json"
    flags = ["--prompt-tokens", "20", "--new-tokens", "6", "--top-p", "0.9", "--seed", "5",
             "--valid-vocab", str(VALID_VOCAB), "--limit", "9"]
    assert eval_main(_cli(assets, out, *flags)) == 0
    document = json.loads(out.read_text())
    row = document["results"][0]
    assert document["settings"]["top_p"] == 0.9 and document["settings"]["seed"] == 5

    shards = ShardSet(assets["data"])
    docs = [np.asarray(shards.doc(i), dtype=np.int64) for i in range(len(shards))]
    long_enough = [i for i, d in enumerate(docs) if len(d) > 20][:9]
    skipped = sum(len(d) <= 20 for d in docs[: long_enough[-1] + 1])
    assert skipped > 0 and row["skipped_short"] == skipped
    assert row["task"] == "samples" and row["documents"] == 9
    model, teacher = load_pretrained(assets["student"]), load_pretrained(assets["teacher"])
    rows = torch.as_tensor(np.stack([docs[i][:20] for i in long_enough]))
    settings = SamplingSettings(prompt_tokens=20, new_tokens=6, top_p=0.9,
                                valid_vocab=VALID_VOCAB)
    expected = sampled_teacher_nll(model, teacher, rows, settings, seed=5, batch_size=4)
    for key in ("teacher_nll", "teacher_ppl", "mean_new_tokens", "tokens"):
        assert row[key] == pytest.approx(expected[key], rel=1e-6), key
    reference, _ = reference_nll(model, teacher, rows, settings, seed=5, batch_size=4)
    assert row["teacher_nll"] == pytest.approx(reference, rel=1e-5)

    # Nothing long enough: one line naming the file, exit 2.
    assert eval_main(_cli(assets, out, "--prompt-tokens", "60", "--new-tokens", "2")) == 2


def test_cli_heldout_prompts_are_the_validation_windows(assets, tmp_path):  # noqa: F811
    out = tmp_path / "heldout.json"
    flags = ["--heldout", "packed", "--val-fraction", "0.1", "--max-length", "16",
             "--prompt-tokens", "8", "--new-tokens", "5", "--sample-temperature", "0.7"]
    assert eval_main(_cli(assets, out, *flags)) == 0
    row = json.loads(out.read_text())["results"][0]
    loader = BatchLoader(build_dataset(assets["data"], "packed", 16), 4, split="val",
                         val_fraction=0.1, drop_last=False)
    rows = torch.cat([batch["input_ids"][:, :8] for batch in loader])
    model, teacher = load_pretrained(assets["student"]), load_pretrained(assets["teacher"])
    settings = SamplingSettings(prompt_tokens=8, new_tokens=5, temperature=0.7)
    expected = sampled_teacher_nll(model, teacher, rows, settings, seed=0, batch_size=4)
    assert row["documents"] == len(rows) > 0 and row["skipped_short"] == 0
    assert row["teacher_nll"] == pytest.approx(expected["teacher_nll"], rel=1e-6)


def test_cli_errors_are_one_line(assets, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "x.json"
    no_teacher = ["--model", str(assets["student"]), "--task", "samples", "--data",
                  str(assets["data"]), "--no-progress"]
    assert eval_main(no_teacher) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --task samples needs --teacher: the model that scores the samples"
    for flags, message in ((["--top-p", "1.5"], "--top-p: must be in (0, 1]"),
                           (["--prompt-tokens", "0"], "--prompt-tokens: must be an integer"),
                           (["--sample-temperature", "-1"], "--sample-temperature: must be"),
                           (["--new-tokens", "60"], "new_tokens: prompt (32 tokens)")):
        assert eval_main(_cli(assets, out, *flags)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not out.exists()


def test_samples_rows_join_the_comparison_table(assets, tmp_path, capsys):  # noqa: F811
    flags = ["--compare", str(assets["teacher"]), "--prompt-tokens", "20", "--new-tokens", "3",
             "--limit", "4"]
    assert eval_main(_cli(assets, tmp_path / "c.json", *flags)) == 0
    table = capsys.readouterr().out
    assert "data teacher_nll ↓" in table and "| student |" in table and "| teacher |" in table

