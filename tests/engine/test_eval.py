"""engine.eval: held-out metrics and lm-evaluation-harness scoring against transformers.

Every expected number here is computed independently inside the test from the logits of a
transformers GPTNeoXForCausalLM, one unpadded sequence at a time, in float64; our code batches,
pads, sorts, chunks and (for our own GPTNeoX) projects only the scored rows.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from engine.eval import heldout_metrics, score_batch
from engine.eval.__main__ import main as eval_main
from engine.eval.requests import EvalInputError, TextEncoder, read_jsonl
from engine.eval.tasks import ScoringSetup, evaluate_lambada, evaluate_mc, evaluate_ppl
from tests.hf_models import random_pythia

TINY_VOCAB = 96


@pytest.fixture(scope="module")
def tiny_pair():
    student = random_pythia("tiny", seed=1, vocab_size=TINY_VOCAB, max_positions=64)
    teacher = random_pythia("tiny", seed=2, vocab_size=TINY_VOCAB, max_positions=64)
    return student, teacher


def _random_batches(seed: int, shapes, vocab: int, ignore_fraction: float = 0.3):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for batch, length in shapes:
        input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
        labels = torch.randint(0, vocab, (batch, length), generator=generator)
        ignored = torch.rand(batch, length, generator=generator) < ignore_fraction
        labels[ignored] = -100
        batches.append({"input_ids": input_ids, "labels": labels})
    return batches


def _direct_metrics(student, teacher, batches, temperature, valid_vocab):
    """Float64 CE / KD / teacher CE straight from transformers' full logits."""
    ce = kd = teacher_ce = 0.0
    tokens = 0
    with torch.no_grad():
        for batch in batches:
            keep = batch["labels"] != -100
            targets = batch["labels"][keep]
            s = student(batch["input_ids"]).logits.double()[keep][:, :valid_vocab]
            t = teacher(batch["input_ids"]).logits.double()[keep][:, :valid_vocab]
            ce += -s.log_softmax(-1).gather(1, targets[:, None]).sum().item()
            teacher_ce += -t.log_softmax(-1).gather(1, targets[:, None]).sum().item()
            pt = (t / temperature).softmax(-1)
            kl = pt * ((t / temperature).log_softmax(-1) - (s / temperature).log_softmax(-1))
            kd += temperature**2 * kl.sum().item()
            tokens += int(keep.sum())
    return {
        "ce": ce / tokens,
        "kd": kd / tokens,
        "teacher_ce": teacher_ce / tokens,
        "tokens": tokens,
    }


@pytest.mark.parametrize("valid_vocab", [None, 83])
def test_heldout_metrics_equal_direct_computation(tiny_pair, valid_vocab):
    student, teacher = tiny_pair
    vocab_for_labels = valid_vocab or TINY_VOCAB
    batches = _random_batches(0, [(3, 17), (1, 5), (2, 31)], vocab_for_labels)
    expected = _direct_metrics(student, teacher, batches, 1.7, valid_vocab or TINY_VOCAB)
    got = heldout_metrics(
        student, batches, teacher=teacher, temperature=1.7, valid_vocab=valid_vocab, chunk_rows=7
    )
    assert got["tokens"] == expected["tokens"]
    for key in ("ce", "kd", "teacher_ce"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert got["ppl"] == pytest.approx(math.exp(expected["ce"]), rel=1e-5)
    assert got["kd"] > 0


def test_heldout_metrics_without_teacher_and_mode_restored(tiny_pair):
    student, teacher = tiny_pair
    batches = _random_batches(1, [(2, 9), (3, 4)], TINY_VOCAB)
    student.train()
    got = heldout_metrics(student, iter(batches))
    assert student.training, "the student's train mode must be restored"
    student.eval()
    assert set(got) == {"ce", "ppl", "tokens"}
    expected = _direct_metrics(student, teacher, batches, 2.0, TINY_VOCAB)
    assert got["ce"] == pytest.approx(expected["ce"], rel=1e-5)
    assert torch.is_grad_enabled(), "no_grad must not leak out of heldout_metrics"


def test_heldout_metrics_rejects_empty_and_out_of_vocab(tiny_pair):
    student, _ = tiny_pair
    batch = _random_batches(2, [(2, 6)], TINY_VOCAB)[0]
    with pytest.raises(ValueError, match="no labelled token"):
        heldout_metrics(
            student,
            [{"input_ids": batch["input_ids"], "labels": torch.full_like(batch["labels"], -100)}],
        )
    bad = dict(batch, labels=batch["labels"].clamp(min=0).fill_(90))
    with pytest.raises(ValueError, match=r"\[0, 80\)"):
        heldout_metrics(student, [bad], valid_vocab=80)
    late = dict(batch, labels=batch["labels"].clamp(0, 79))
    late["labels"][-1, -1] = 90  # out of range in the last chunk only
    with pytest.raises(ValueError, match=r"\[0, 80\).*max 90"):
        heldout_metrics(student, [late], valid_vocab=80, chunk_rows=3)
    with pytest.raises(ValueError, match=r"\[0, 80\).*max 90"):
        score_batch(student, late["input_ids"], late["labels"], valid_vocab=80, chunk_rows=3)
    with pytest.raises(ValueError, match="batch 0"):
        heldout_metrics(student, [{"input_ids": batch["input_ids"]}])


def test_score_batch_rows(tiny_pair):
    student, _ = tiny_pair
    batch = _random_batches(3, [(4, 11)], TINY_VOCAB, ignore_fraction=0.6)[0]
    batch["labels"][2] = -100  # a row with nothing scored
    with torch.no_grad():
        loglik, greedy, counts = score_batch(
            student, batch["input_ids"], batch["labels"], chunk_rows=5
        )
        logits = student(batch["input_ids"]).logits.double()
    for row in range(4):
        keep = batch["labels"][row] != -100
        logp = logits[row][keep].log_softmax(-1)
        targets = batch["labels"][row][keep]
        assert loglik[row].item() == pytest.approx(
            logp.gather(1, targets[:, None]).sum().item(), abs=1e-5
        )
        assert bool(greedy[row]) == bool((logp.argmax(-1) == targets).all())
        assert counts[row].item() == int(keep.sum())
    assert bool(greedy[2]) and counts[2].item() == 0


# --------------------------------------------------------------------------------------
# Harness tasks against an independent computation from transformers' logits
# --------------------------------------------------------------------------------------


TASK_VOCAB = 320  # model rows; the tokenizer below has 300 ids
WORD_TEXT = (
    "the a cat dog house river mountain quickly slowly ran jumped over under big small red "
    "blue green happy sad extraordinary incomprehensibly, counterrevolutionaries. Zyx"
)
WORDS = WORD_TEXT.split()


def _sentences(seed: int, count: int, low: int = 3, high: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(count)
    ]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """A small byte-level BPE tokenizer, two random tiny models saved by transformers, data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("eval_tasks")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_sentences(0, 400), trainer)
    tokenizer.save(str(root / "tokenizer.json"))
    hf_models = {}
    for name, seed in (("student", 11), ("teacher", 12)):
        model = random_pythia("tiny", seed=seed, vocab_size=TASK_VOCAB, max_positions=64)
        model.save_pretrained(root / name)
        hf_models[name] = model
    return root, hf_models


def _write_jsonl(path, objects):
    with open(path, "w", encoding="utf-8") as handle:
        for obj in objects:
            handle.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
    return path


def _harness_loglik(hf_model, tokenizer, context, continuation, max_length):
    """lm-evaluation-harness's loglikelihood for one request, unbatched, in float64."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if context == "":
        context_ids, continuation_ids = [0], encode(continuation)
    else:
        whole = encode(context + continuation)
        context_ids = encode(context)
        continuation_ids = whole[len(context_ids) :]
    inputs = (context_ids + continuation_ids)[-(max_length + 1) :][:-1]
    with torch.no_grad():
        logits = hf_model(torch.tensor([inputs])).logits[0].double()
    logp = logits[len(inputs) - len(continuation_ids) :].log_softmax(-1)
    target = torch.tensor(continuation_ids)
    ll = logp.gather(1, target[:, None]).sum().item()
    return ll, bool((logp.argmax(-1) == target).all()), len(continuation_ids), len(context_ids)


def _models_under_test(root, hf_models, which="student"):
    """The transformers model itself (full-logit path) and our GPTNeoX (scored rows only)."""
    from engine.model import load_pretrained

    return {"transformers": hf_models[which], "ours": load_pretrained(root / which)}


LAMBADA_TEXTS = [
    *_sentences(5, 5),
    "incomprehensibly",  # one word: empty context, so EOS stands in front
    "the cat  extraordinary",  # double space: the context's trailing space moves over
    *_sentences(6, 4, low=30, high=60),  # longer than max_length: left truncation
]


@pytest.mark.parametrize("kind", ["transformers", "ours"])
def test_lambada_matches_harness(task_files, kind, tmp_path):
    root, hf_models = task_files
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    path = _write_jsonl(tmp_path / "lambada.jsonl", [{"text": t} for t in LAMBADA_TEXTS])
    max_length = 24
    expected = []
    for text in LAMBADA_TEXTS:
        words = text.split(" ")
        expected.append(
            _harness_loglik(
                hf_models["student"], tokenizer, " ".join(words[:-1]), " " + words[-1], max_length
            )
        )
    # The data really exercises multi-token targets and truncation.
    assert max(e[2] for e in expected) >= 3
    assert sum(e[2] + e[3] > max_length + 1 for e in expected) >= 3

    model = _models_under_test(root, hf_models)[kind]
    setup = ScoringSetup(model=model, max_length=max_length, batch_size=4, progress=False)
    got = evaluate_lambada(setup, TextEncoder(root / "tokenizer.json"), path, samples=True)
    lls = [s["ll"] for s in got["samples"]]
    assert lls == pytest.approx([e[0] for e in expected], abs=1e-5)
    assert [s["greedy"] for s in got["samples"]] == [e[1] for e in expected]
    mean_ll = sum(e[0] for e in expected) / len(expected)
    assert got["ppl"] == pytest.approx(math.exp(-mean_ll), rel=1e-5)
    assert got["acc"] == pytest.approx(sum(e[1] for e in expected) / len(expected))
    assert got["documents"] == len(LAMBADA_TEXTS)


def _mc_lines():
    rng = random.Random(7)
    lines = []
    for index, question in enumerate(_sentences(8, 7, high=30)):
        choices = rng.sample(WORDS, rng.randint(2, 4))
        lines.append(
            {
                "context": f"Question: {question}\nAnswer:",
                "choices": choices,
                "gold": index % len(choices),
            }
        )
    lines.insert(2, {"context": "", "choices": ["big cat", "extraordinary"], "gold": 0})
    for sentence in _sentences(9, 3, low=4, high=12):
        words = sentence.split(" ")
        words[len(words) // 2] = "_"
        lines.append(
            {
                "context": " ".join(words),
                "choices": ["the dog", "a river"],
                "gold": 1,
                "partial": True,
            }
        )
    return lines


@pytest.mark.parametrize("kind", ["transformers", "ours"])
def test_mc_matches_harness(task_files, kind, tmp_path):
    root, hf_models = task_files
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    lines = _mc_lines()
    path = _write_jsonl(tmp_path / "mc.jsonl", lines)
    max_length = 20
    acc = acc_norm = 0
    expected_ll = []
    for line in lines:
        if line.get("partial"):
            blank = line["context"].index("_")
            rest = " " + line["context"][blank + 1 :].strip()
            requests = [(line["context"][:blank] + c, rest) for c in line["choices"]]
            lengths = [len(rest)] * len(line["choices"])
        else:
            requests = [(line["context"], " " + c) for c in line["choices"]]
            lengths = [len(c) for c in line["choices"]]
        lls = [
            _harness_loglik(hf_models["student"], tokenizer, ctx, cont, max_length)[0]
            for ctx, cont in requests
        ]
        expected_ll.append(lls)
        acc += max(range(len(lls)), key=lambda i: lls[i]) == line["gold"]
        acc_norm += max(range(len(lls)), key=lambda i: lls[i] / lengths[i]) == line["gold"]

    model = _models_under_test(root, hf_models)[kind]
    setup = ScoringSetup(model=model, max_length=max_length, batch_size=5, progress=False)
    got = evaluate_mc(setup, TextEncoder(root / "tokenizer.json"), path, samples=True)
    for sample, lls in zip(got["samples"], expected_ll, strict=True):
        assert sample["ll"] == pytest.approx(lls, abs=1e-5)
    assert got["acc"] == pytest.approx(acc / len(lines))
    assert got["acc_norm"] == pytest.approx(acc_norm / len(lines))
    assert got["documents"] == len(lines)


def _expected_ppl(hf_model, documents, max_length, stride):
    """Every token's log-probability from its own window, windows defined from scratch."""
    nll = 0.0
    count = 0
    with torch.no_grad():
        for tokens in documents:
            sequence = [0, *tokens]
            n = len(tokens)
            # Token at sequence index i is predicted by the first window whose last predicted
            # index `end` reaches i; that window reads sequence[max(0, end - L):end]. Windows
            # end at L, L + S, L + 2S, ... (capped at n).
            ends = [min(n, max_length)]
            while ends[-1] < n:
                ends.append(min(n, ends[-1] + stride))
            previous = 0
            for end in ends:  # one forward per window; each token scored where it first fits
                begin = max(0, end - max_length)
                logits = hf_model(torch.tensor([sequence[begin:end]])).logits[0].double()
                for i in range(previous + 1, end + 1):
                    nll -= logits[i - 1 - begin].log_softmax(-1)[sequence[i]].item()
                    count += 1
                previous = end
    return nll / count, count


@pytest.mark.parametrize(("kind", "stride"), [("transformers", 16), ("ours", 5)])
def test_ppl_matches_window_definition(task_files, kind, stride, tmp_path):
    root, hf_models = task_files
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    texts = _sentences(10, 5, low=2, high=25)
    names = ["Pile-CC", "Github", "Pile-CC", None, "Github"]
    objects = [
        {"text": t, "meta": {"pile_set_name": n}} if n else {"text": t}
        for t, n in zip(texts, names, strict=True)
    ]
    path = _write_jsonl(tmp_path / "corpus.jsonl", objects)
    documents = [[*tokenizer.encode(t, add_special_tokens=False).ids, 0] for t in texts]
    assert max(len(d) for d in documents) > 16  # several windows per long document
    expected_ce, expected_tokens = _expected_ppl(hf_models["student"], documents, 16, stride)

    model = _models_under_test(root, hf_models)[kind]
    setup = ScoringSetup(model=model, max_length=16, batch_size=3, progress=False)
    got = evaluate_ppl(
        setup, TextEncoder(root / "tokenizer.json"), path, model_vocab=TASK_VOCAB, stride=stride
    )
    assert got["tokens"] == expected_tokens
    assert got["ce"] == pytest.approx(expected_ce, rel=1e-6)
    assert got["ppl"] == pytest.approx(math.exp(expected_ce), rel=1e-5)
    by_set = got["by_set"]
    assert set(by_set) == {"Pile-CC", "Github"}
    assert by_set["Pile-CC"]["tokens"] == len(documents[0]) + len(documents[2])
    assert by_set["Github"]["documents"] == 2
    cc_ce, _ = _expected_ppl(hf_models["student"], [documents[0], documents[2]], 16, stride)
    assert by_set["Pile-CC"]["ce"] == pytest.approx(cc_ce, rel=1e-6)


def test_heldout_metrics_with_our_model(task_files):
    """The scored-rows-only path (hidden_states + embed_out) gives the same numbers."""
    root, hf_models = task_files
    ours = _models_under_test(root, hf_models)["ours"]
    from engine.model import load_pretrained

    our_teacher = load_pretrained(root / "teacher")
    batches = _random_batches(4, [(2, 13), (3, 7)], 300)
    expected = _direct_metrics(hf_models["student"], hf_models["teacher"], batches, 2.0, 300)
    got = heldout_metrics(ours, batches, teacher=our_teacher, valid_vocab=300, chunk_rows=6)
    for key in ("ce", "kd", "teacher_ce"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key
    assert got["divergence"] == "forward_kl"


@pytest.mark.parametrize(("settings", "label"), [
    (dict(divergence="reverse_kl"), "reverse_kl"),
    (dict(divergence="jsd", beta=0.3, t2_scale=False), "jsd(beta=0.3, no T^2)"),
    (dict(divergence="skew_forward_kl", skew=0.2), "skew_forward_kl(skew=0.2)"),
    (dict(divergence="tvd", t2_scale=False), "tvd(no T^2)"),
])
def test_heldout_divergences_fused_heads_equal_the_reference(task_files, settings, label):
    """Our models go through the training loss's fused heads (forward only), transformers'
    through full logits and the float64-capable reference: the same KD term either way, with
    the chosen divergence named beside it."""
    root, hf_models = task_files
    from engine.model import load_pretrained

    ours, our_teacher = load_pretrained(root / "student"), load_pretrained(root / "teacher")
    batches = _random_batches(6, [(2, 13), (3, 7)], 300)
    common = dict(valid_vocab=300, temperature=1.5, **settings)
    got = heldout_metrics(ours, batches, teacher=our_teacher, **common)
    expected = heldout_metrics(hf_models["student"], batches, teacher=hf_models["teacher"],
                               chunk_rows=5, **common)
    assert got.pop("divergence") == expected.pop("divergence") == label
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)  # the jsd's kd is ~2e-3
    assert got["kd"] > 0
    with torch.enable_grad():
        assert all(p.grad is None for p in ours.parameters())
    with pytest.raises(ValueError, match=r"beta=2"):
        heldout_metrics(ours, batches, teacher=our_teacher, divergence="jsd", beta=2)


# --------------------------------------------------------------------------------------
# Bad input and the command line
# --------------------------------------------------------------------------------------


def test_malformed_lines_name_file_and_line(tmp_path, task_files):
    root, _ = task_files
    bad_json = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "a b"}, "", '{"text": "c d"', {}])
    with pytest.raises(EvalInputError, match=r"bad\.jsonl:3: malformed JSON"):
        list(read_jsonl(bad_json))
    missing = _write_jsonl(tmp_path / "missing.jsonl", [{"text": "a b"}, {"txt": "c"}])
    setup = ScoringSetup(model=random_pythia("tiny", vocab_size=TASK_VOCAB), max_length=16)
    encoder = TextEncoder(root / "tokenizer.json")
    with pytest.raises(EvalInputError, match=r"missing\.jsonl:2: missing field 'text'"):
        evaluate_lambada(setup, encoder, missing)
    bad_gold = _write_jsonl(
        tmp_path / "gold.jsonl", [{"context": "x", "choices": ["a", "b"], "gold": 2}]
    )
    with pytest.raises(EvalInputError, match=r"gold\.jsonl:1: 'gold' 2"):
        evaluate_mc(setup, encoder, bad_gold)
    (tmp_path / "utf.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(EvalInputError, match=r"utf\.jsonl:2: invalid UTF-8"):
        list(read_jsonl(tmp_path / "utf.jsonl"))

    # Through the CLI: non-zero exit, the message on stderr.
    code = eval_main(
        [
            "--model",
            str(root / "student"),
            "--tokenizer",
            str(root / "tokenizer.json"),
            "--task",
            "lambada",
            "--data",
            str(bad_json),
            "--no-progress",
        ]
    )
    assert code == 2


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path, task_files, capsys):
    root, _ = task_files
    small = random_pythia("tiny", seed=3, vocab_size=256, max_positions=64)
    small.save_pretrained(tmp_path / "small")
    data = _write_jsonl(tmp_path / "l.jsonl", [{"text": "the cat ran"}])
    code = eval_main(
        [
            "--model",
            str(tmp_path / "small"),
            "--tokenizer",
            str(root / "tokenizer.json"),
            "--task",
            "lambada",
            "--data",
            str(data),
            "--no-progress",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "300" in err and "256" in err and "tokenizer.json" in err


def test_cli_json_and_compare_table(tmp_path, task_files, capsys):
    root, hf_models = task_files
    from engine.eval.compare import matplotlib_available

    lambada = _write_jsonl(tmp_path / "lambada_openai.jsonl", [{"text": t} for t in LAMBADA_TEXTS])
    piqa = _write_jsonl(tmp_path / "piqa.jsonl", _mc_lines()[:4])
    common = [
        "--tokenizer",
        str(root / "tokenizer.json"),
        "--task",
        "lambada",
        "mc",
        "--data",
        str(lambada),
        str(piqa),
        "--batch-size",
        "3",
        "--max-length",
        "24",
        "--no-progress",
    ]
    out = tmp_path / "out" / "single.json"
    assert eval_main(["--model", str(root / "student"), *common, "--json", str(out)]) == 0
    single = json.loads(out.read_text())
    assert [r["task"] for r in single["results"]] == ["lambada", "mc"]
    setup = ScoringSetup(model=hf_models["student"], max_length=24, batch_size=7, progress=False)
    direct = evaluate_lambada(setup, TextEncoder(root / "tokenizer.json"), lambada)
    assert single["results"][0]["ppl"] == pytest.approx(direct["ppl"], rel=1e-5)

    png = tmp_path / "table.png"
    capsys.readouterr()
    code = eval_main(
        [
            "--model",
            str(root / "student"),
            "--compare",
            str(root / "teacher"),
            *common,
            "--json",
            str(tmp_path / "both.json"),
            "--png",
            str(png),
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    table = captured.out.strip().splitlines()
    assert table[0].startswith("| model | lambada_openai ppl")
    assert "piqa acc_norm" in table[0]
    assert table[2].startswith("| student |") and table[3].startswith("| teacher |")
    assert "**" in captured.out  # the better model of each column is marked
    both = json.loads((tmp_path / "both.json").read_text())
    assert {r["model_label"] for r in both["results"]} == {"student", "teacher"}
    if matplotlib_available():
        assert png.read_bytes()[:4] == b"\x89PNG"
    else:
        assert "matplotlib is not installed" in captured.err and not png.exists()


def test_ppl_over_shards_equals_jsonl_and_heldout_matches_training_validation(task_files, tmp_path):
    """Shards written by engine.data.preprocess give the jsonl's numbers; --heldout reproduces the
    training loop's validation (same loader split, same heldout_metrics), batch size aside."""
    from engine.data.loader import BatchLoader, PackedDataset
    from engine.data.preprocess import preprocess
    from engine.model import load_pretrained

    root, _ = task_files
    texts = _sentences(12, 24, low=2, high=30)
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in texts])
    shards = tmp_path / "shards"
    preprocess([corpus], root / "tokenizer.json", shards, show_progress=False)

    student = load_pretrained(root / "student")
    teacher = load_pretrained(root / "teacher")
    setup = ScoringSetup(model=student, max_length=16, batch_size=4, progress=False)
    encoder = TextEncoder(root / "tokenizer.json")
    from_text = evaluate_ppl(setup, encoder, corpus, model_vocab=TASK_VOCAB, teacher=teacher)
    from_shards = evaluate_ppl(setup, None, shards, model_vocab=TASK_VOCAB, teacher=teacher)
    assert from_shards["tokens"] == from_text["tokens"]
    assert from_shards["documents"] == len(texts)
    for key in ("ce", "kd", "teacher_ce"):
        assert from_shards[key] == pytest.approx(from_text[key], rel=1e-6), key

    out = tmp_path / "heldout.json"
    code = eval_main(
        [
            "--model",
            str(root / "student"),
            "--teacher",
            str(root / "teacher"),
            "--task",
            "ppl",
            "--data",
            str(shards),
            "--heldout",
            "packed",
            "--val-fraction",
            "0.2",
            "--max-length",
            "16",
            "--valid-vocab",
            "300",
            "--batch-size",
            "3",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    row = json.loads(out.read_text())["results"][0]
    training_view = BatchLoader(
        PackedDataset(shards, 16), 2, split="val", val_fraction=0.2, drop_last=False
    )
    expected = heldout_metrics(student, training_view, teacher=teacher, valid_vocab=300)
    assert row["tokens"] == expected["tokens"] > 0
    for key in ("ce", "ppl", "kd", "teacher_ce"):
        assert row[key] == pytest.approx(expected[key], rel=1e-6), key
    assert row["divergence"] == "forward_kl"

    # The run's divergence settings reach --heldout's KD term through the flags.
    flags = ["--divergence", "skew_reverse_kl", "--skew", "0.3", "--no-t2-scale"]
    code = eval_main([*sys_args_of(out, root, shards), *flags])
    assert code == 0
    document = json.loads(out.read_text())
    assert document["settings"]["divergence"] == "skew_reverse_kl(skew=0.3, no T^2)"
    row = document["results"][0]
    expected = heldout_metrics(student, training_view, teacher=teacher, valid_vocab=300,
                               divergence="skew_reverse_kl", skew=0.3, t2_scale=False)
    assert row["kd"] == pytest.approx(expected["kd"], rel=1e-6)
    assert row["divergence"] == expected["divergence"]
    assert eval_main([*sys_args_of(out, root, shards), "--divergence", "jsd",
                      "--beta", "-1"]) == 2


def sys_args_of(out, root, shards) -> list[str]:
    """The --heldout command line of the test above (JSON to `out`)."""
    return ["--model", str(root / "student"), "--teacher", str(root / "teacher"), "--task",
            "ppl", "--data", str(shards), "--heldout", "packed", "--val-fraction", "0.2",
            "--max-length", "16", "--valid-vocab", "300", "--batch-size", "3", "--json",
            str(out), "--no-progress"]


def test_shard_token_beyond_model_vocab_is_refused(task_files, tmp_path):
    from engine.data.preprocess import preprocess

    root, _ = task_files
    corpus = _write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in _sentences(13, 4)])
    preprocess([corpus], root / "tokenizer.json", tmp_path / "shards", show_progress=False)
    setup = ScoringSetup(model=random_pythia("tiny", vocab_size=TASK_VOCAB), max_length=16)
    with pytest.raises(EvalInputError, match=r"token id \d+ but the model's vocab_size is 40"):
        evaluate_ppl(setup, None, tmp_path / "shards", model_vocab=40)


def test_real_neox_tokenizer_as_the_harness_uses_it(neox_tokenizer_path):
    encoder = TextEncoder(neox_tokenizer_path)
    assert encoder.eos_id == 0 and encoder.vocab_size == 50277
    assert encoder.encode_batch(["Hello world, this is the Pile."]) == [
        [12092, 1533, 13, 436, 310, 253, 367, 587, 15]
    ]
    encoder.check_fits(50304, "pythia-70m")
    with pytest.raises(EvalInputError, match="50277 tokens but model m has vocab_size 50000"):
        encoder.check_fits(50000, "m")
    # The continuation's first token is the one produced at the boundary of the whole string.
    from engine.eval.requests import encode_requests

    (request,) = encode_requests(encoder, [("Hello world, this is the", " Pile.")])
    assert request.context == [12092, 1533, 13, 436, 310, 253]
    assert request.continuation == [367, 587, 15]


@pytest.mark.distributed
def test_heldout_metrics_reduce_across_ranks_single_process_group(tiny_pair, tmp_path):
    import torch.distributed as dist

    student, teacher = tiny_pair
    batches = _random_batches(5, [(2, 8)], TINY_VOCAB)
    local = heldout_metrics(student, batches, teacher=teacher)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        reduced = heldout_metrics(student, batches, teacher=teacher, reduce_across_ranks=True)
        wrapped = torch.nn.parallel.DistributedDataParallel(student)
        through_ddp = heldout_metrics(wrapped, batches, teacher=teacher)
    finally:
        dist.destroy_process_group()
    assert reduced.pop("divergence") == through_ddp.pop("divergence") == local.pop(
        "divergence") == "forward_kl"
    assert reduced == pytest.approx(local, rel=1e-12)
    assert through_ddp == pytest.approx(local, rel=1e-6)


def test_progress_bar_draws_only_when_enabled(capsys):
    from engine.data.progress import Progress

    quiet = Progress("lambada", 10, "requests", enabled=False)
    quiet.update(10, tokens=100)
    quiet.close()
    assert capsys.readouterr().err == ""
    shown = Progress("lambada", 10, "requests", enabled=True)
    shown.update(4, tokens=100)
    shown.update(6, tokens=100)
    shown.close()
    err = capsys.readouterr().err
    assert "10/10 requests" in err and "tok/s" in err and err.endswith("\n")


def test_zstd_input_and_truncated_stream(task_files, tmp_path):
    zstandard = pytest.importorskip("zstandard")
    root, hf_models = task_files
    lines = "".join(json.dumps({"text": t}) + "\n" for t in LAMBADA_TEXTS[:5]).encode()
    packed = zstandard.ZstdCompressor().compress(lines)
    (tmp_path / "l.jsonl.zst").write_bytes(packed)
    _write_jsonl(tmp_path / "l.jsonl", [{"text": t} for t in LAMBADA_TEXTS[:5]])
    setup = ScoringSetup(model=hf_models["student"], max_length=32, batch_size=2, progress=False)
    encoder = TextEncoder(root / "tokenizer.json")
    from_zst = evaluate_lambada(setup, encoder, tmp_path / "l.jsonl.zst")
    from_plain = evaluate_lambada(setup, encoder, tmp_path / "l.jsonl")
    assert from_zst == from_plain
    (tmp_path / "cut.jsonl.zst").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(EvalInputError, match=r"cut\.jsonl\.zst"):
        list(read_jsonl(tmp_path / "cut.jsonl.zst"))
