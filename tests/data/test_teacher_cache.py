"""The teacher cache format: round trip against the teacher, alignment with the token shards
in both data modes (windows crossing shard boundaries), record sizes, refusals of a cache
that does not match, and the unbiasedness of the sampled estimator."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from engine.data.loader import build_dataset
from engine.data.teacher_cache import (
    CachedTargets,
    CacheError,
    TeacherCache,
    check_cache_matches,
    item_rows,
    model_fingerprint,
    targets_of_batch,
)
from engine.data.teacher_cache_encode import (
    sampled_entries,
    sampled_targets,
    teacher_log_probs,
    top_k_entries,
    top_k_targets,
)
from engine.data.tokenizer_file import read_tokenizer_file
from engine.kernels.constants import IGNORE_INDEX
from engine.kernels.kd_loss import kd_loss_reference
from engine.kernels.sparse_kd import sparse_kd_loss
from engine.teacher_cache import build_teacher_cache
from tests.cache_assets import SEQ_LEN, VALID_VOCAB, make_cache_assets, teacher_logits


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_cache_assets(tmp_path_factory.mktemp("cache-assets"))


def build(assets, out, **kwargs):
    options = dict(top_k=None, samples=None, seq_len=SEQ_LEN, dtype="fp32", device="cpu",
                   batch=8, show_progress=False)
    options.update(kwargs)
    return build_teacher_cache(str(assets["teacher"]), str(assets["data"]), str(out), **options)


@pytest.fixture(scope="module")
def caches(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    specs = {"topk_packed": dict(top_k=8), "sampled_padded": dict(samples=16, mode="padded")}
    for name, spec in specs.items():
        build(assets, root / name, **spec)
    return {name: root / name for name in specs}


def crossing_items(dataset, count=6):
    """Items whose rows start in one token shard and end in the next, plus a few others."""
    starts = dataset.shards.token_starts[1:-1]
    crossing = [i for i in range(len(dataset))
                if any(item_rows(dataset, i)[0] < s < sum(item_rows(dataset, i)) + 1
                       for s in starts)]
    assert crossing, "the assets must have windows across shard boundaries"
    return np.array(sorted({*crossing[:count], 0, len(dataset) - 1}))


def test_top_k_round_trip_matches_the_teacher_in_packed_mode(assets, caches):
    dataset = build_dataset(assets["data"], "packed", SEQ_LEN)
    cached = CachedTargets(dataset, TeacherCache(caches["topk_packed"], verify=True))
    indices = crossing_items(dataset)
    batch = cached.get_batch(indices)
    targets = targets_of_batch(batch).flat()
    log_p = teacher_log_probs(teacher_logits(assets, batch["input_ids"]).reshape(-1, 320),
                              2.0, VALID_VOCAB)
    ids, values, log_tail = top_k_entries(log_p, 8)
    assert torch.equal(targets.ids.long(), ids) and torch.all(targets.count == 8)
    # Renormalised masses and tail: the teacher's own to float16 storage precision.
    assert torch.allclose(targets.log_mass, values, atol=2e-2, rtol=1e-3)
    assert torch.allclose(targets.log_tail, log_tail, atol=1e-3, rtol=1e-3)
    total = targets.log_mass.exp().sum(-1) + targets.log_tail.exp()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_sampled_round_trip_and_alignment_in_padded_mode(assets, caches):
    dataset = build_dataset(assets["data"], "padded", SEQ_LEN)
    cache = TeacherCache(caches["sampled_padded"])
    cached = CachedTargets(dataset, cache)
    indices = np.arange(len(dataset))
    batch = cached.get_batch(indices)
    trained = batch["labels"] != IGNORE_INDEX
    count = batch["teacher_count"]
    assert torch.equal(count > 0, trained)  # a record exactly where a label is trained
    draws = (batch["teacher_log_mass"].exp() * 16).round()
    used = torch.arange(16) < count[..., None]
    assert torch.all((draws * used).sum(-1)[trained] == 16)
    log_p = teacher_log_probs(teacher_logits(assets, batch["input_ids"]), 2.0, VALID_VOCAB)
    entropy = -(log_p.exp() * log_p).sum(-1)
    assert torch.allclose(batch["teacher_entropy"][trained], entropy[trained], atol=1e-5)
    # Every drawn id is one the teacher gives visible probability at that very position.
    drawn_logp = log_p.gather(-1, batch["teacher_ids"].long())
    assert torch.all(drawn_logp[used & trained[..., None]] > -30)
    # Rows the items do not train (past seq_len + 1 in a document) are empty on disk.
    rows = np.concatenate([cache.shards[i] for i in range(len(cache.shards))])
    assert int((rows["count"] > 0).sum()) == int(trained.sum())


def test_record_sizes_and_files(assets, caches):
    for name, width in (("topk_packed", 8), ("sampled_padded", 16)):
        manifest = json.loads((caches[name] / "manifest.json").read_text())
        assert manifest["record"]["bytes"] == 4 * width + 8
        tokens = build_dataset(assets["data"], "packed", SEQ_LEN).shards.total_tokens
        assert manifest["totals"] == {"shards": 3, "rows": tokens,
                                      "bytes": tokens * (4 * width + 8),
                                      "bytes_per_token": 4 * width + 8}
        names = sorted(p.name for p in caches[name].iterdir())
        assert names == ["manifest.json", "shard_00000.cache", "shard_00001.cache",
                         "shard_00002.cache"]


def test_a_cache_that_does_not_match_is_refused(assets, caches, tmp_path):
    cache = TeacherCache(caches["topk_packed"])
    packed = build_dataset(assets["data"], "packed", SEQ_LEN)
    check_cache_matches(cache, packed, temperature=2.0, valid_vocab=VALID_VOCAB,
                        tokenizer_fingerprint=read_tokenizer_file(assets["tokenizer"]).fingerprint,
                        teacher_fingerprint=model_fingerprint(assets["teacher"]))
    wrong = [
        (dict(dataset=build_dataset(assets["data"], "padded", SEQ_LEN)),
         r"other data: mode 'packed' \(training: 'padded'\)"),
        (dict(dataset=build_dataset(assets["data"], "packed", 16)), r"seq_len 32 \(training: 16\)"),
        (dict(temperature=1.0), r"temperature 2.0, but loss.temperature is 1.0"),
        (dict(valid_vocab=320), "first 300 vocabulary columns, but training scores 320"),
        (dict(tokenizer_fingerprint="0" * 64), "another tokenizer"),
        (dict(teacher_fingerprint=model_fingerprint(assets["student"])), "another teacher"),
    ]
    for change, message in wrong:
        kwargs = {"dataset": packed, "temperature": 2.0, "valid_vocab": VALID_VOCAB, **change}
        with pytest.raises(CacheError, match=message):
            check_cache_matches(cache, kwargs.pop("dataset"), **kwargs)
    other = tmp_path / "other-shards"
    shutil.copytree(assets["data"], other)
    (other / "shard_00001.bin").write_bytes(b"\x05\x00" * ((other / "shard_00001.bin")
                                                          .stat().st_size // 2))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["shards"][1]["bin_sha256"] = "f" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="other token shards"):
        check_cache_matches(cache, build_dataset(other, "packed", SEQ_LEN), temperature=2.0,
                            valid_vocab=VALID_VOCAB)


def test_damaged_or_unfinished_caches_are_refused_with_the_file(caches, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(caches["topk_packed"], copy)
    with open(copy / "shard_00001.cache", "ab") as handle:
        handle.write(b"\x00" * 40)
    with pytest.raises(CacheError, match=r"shard_00001.cache: \d+ bytes, but manifest.json"):
        TeacherCache(copy)
    with pytest.raises(CacheError, match=r"no manifest\.json: not a teacher cache"):
        TeacherCache(tmp_path)
    (copy / "manifest.json").unlink()
    (copy / ".progress.json").write_text(json.dumps({"command": "resume-me"}))
    with pytest.raises(CacheError, match=r"unfinished.*finish it with: resume-me"):
        TeacherCache(copy)


def test_sampled_gradient_is_unbiased_and_top_k_is_not():
    """The mean sampled gradient over D draws converges to the dense one as 1/sqrt(D); the
    top-k gradient (k = 4 of 50) stays a fixed distance away."""
    gen = torch.Generator().manual_seed(0)
    n, vocab, samples = 4, 50, 8
    student = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2
    labels = torch.zeros(n, dtype=torch.long)  # alpha = 0: the labels only say "trained"
    kwargs = dict(alpha=0.0, temperature=2.0, normalizer=float(n))
    dense = student.clone().requires_grad_(True)
    kd_loss_reference(dense, teacher, labels, **kwargs)[0].backward()
    log_p = teacher_log_probs(teacher, 2.0, vocab)

    def mean_sampled_gradient(draws):
        """Mean over `draws` independent caches: rows repeated, then averaged."""
        ids, counts, count, entropy = sampled_entries(log_p.repeat(draws, 1), samples, gen)
        targets = sampled_targets(ids.int(), counts.double(), count.int(), entropy)
        s = student.repeat(draws, 1).requires_grad_(True)
        sparse_kd_loss(s, targets, labels.repeat(draws), backend="torch", **kwargs)[0].backward()
        per_draw = s.grad.reshape(draws, n, vocab)
        return per_draw.mean(0), per_draw.var(0).sum()

    scale = dense.grad.norm().item()
    errors = {}
    for draws in (400, 6400):
        mean, variance = mean_sampled_gradient(draws)
        errors[draws] = (mean - dense.grad).norm().item()
        expected = math.sqrt(variance.item() / draws)  # the standard error of the mean
        assert errors[draws] < 3 * expected, (draws, errors[draws], expected)
    assert 2.5 < errors[400] / errors[6400] < 6.5  # sqrt(16) = 4
    assert errors[6400] < 0.02 * scale
    ids, values, log_tail = top_k_entries(log_p, 4)
    top = top_k_targets(ids.int(), values, torch.full((n,), 4, dtype=torch.int32), log_tail)
    s = student.clone().requires_grad_(True)
    sparse_kd_loss(s, top, labels, backend="torch", **kwargs)[0].backward()
    assert (s.grad - dense.grad).norm().item() > 10 * errors[6400]
