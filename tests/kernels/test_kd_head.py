"""The fused heads + loss (engine.kernels.kd_head) against the float64 reference and the unfused
path.

Issue 11 "Must show", kernel part: loss, d hidden and d weight for odd shapes, valid_vocab < V,
ignored tokens, every T, alpha and divergence, fp32 and bf16, torch path (full grid) and Triton
path (interpreter, covering set); no [tokens x vocab] allocation; autocast behaviour.
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels.divergences import DIVERGENCES
from engine.kernels.kd_head import head_chunk_tokens, kd_head_loss, kd_head_loss_reference
from engine.kernels.kd_loss import kd_loss, kd_loss_reference
from tests.kernels.alloc_tracking import AllocationRecorder
from tests.kernels.kd_cases import ALPHAS, TEMPERATURES, rel_err, tolerances

pytestmark = pytest.mark.usefixtures("one_thread")

EXTRA = {"jsd": {"beta": 0.3}, "skew_forward_kl": {"skew": 0.2}, "skew_reverse_kl": {"skew": 0.6}}


def head_inputs(shape=(37,), hs=23, ht=41, vocab=1003, valid_vocab=1000, dtype=torch.float32,
                seed=0):
    """Hidden states, head weights (scaled like a trained head: logits of a few units) and
    labels with ~20% ignored tokens (always at least one of each)."""
    gen = torch.Generator().manual_seed(seed)
    h_s = torch.randn(*shape, hs, generator=gen)
    w_s = torch.randn(vocab, hs, generator=gen) * (2.0 / hs**0.5)
    h_t = torch.randn(*shape, ht, generator=gen)
    w_t = torch.randn(vocab, ht, generator=gen) * (2.0 / ht**0.5)
    labels = torch.randint(0, valid_vocab, shape, generator=gen)
    flat = labels.view(-1)
    flat[torch.rand(flat.shape, generator=gen) < 0.2] = -100
    flat[0], flat[-1] = -100, 1
    return (*(x.to(dtype) for x in (h_s, w_s, h_t, w_t)), labels)


def reference_grads(h_s, w_s, h_t, w_t, labels, **kwargs):
    """Float64 loss, d hidden, d weight of the reference on the (already rounded) inputs.

    For bf16 inputs the logits are rounded to bf16 as the bf16 matmul rounds them (identity
    gradient): that rounding belongs to the precision, not to the implementation under test.
    """
    hs64 = h_s.detach().double().requires_grad_(True)
    ws64 = w_s.detach().double().requires_grad_(True)
    if h_s.dtype == torch.float32:
        loss, stats = kd_head_loss_reference(hs64, ws64, h_t.double(), w_t.double(), labels,
                                             **kwargs)
    else:
        logits = hs64 @ ws64.t()
        logits = logits + (logits.to(h_s.dtype).double() - logits).detach()
        teacher = (h_t.double() @ w_t.double().t()).to(h_s.dtype).double()
        loss, stats = kd_loss_reference(logits, teacher, labels, **kwargs)
    loss.backward()
    return loss.detach(), hs64.grad, ws64.grad, stats


def fused_grads(h_s, w_s, h_t, w_t, labels, **kwargs):
    hs = h_s.detach().clone().requires_grad_(True)
    ws = w_s.detach().clone().requires_grad_(True)
    loss, stats = kd_head_loss(hs, ws, h_t, w_t, labels, **kwargs)
    loss.backward()
    return loss.detach(), hs.grad, ws.grad, stats


def check_grid(inputs, *, backend, divergence, temperatures, alphas, chunk_tokens):
    """Ours at each (T, alpha) against the reference (linear in alpha: CE once, KD per T)."""
    dtype = inputs[0].dtype
    loss_tol, grad_tol = tolerances(dtype)
    common = dict(valid_vocab=1000, divergence=divergence, **EXTRA.get(divergence, {}))
    ce = reference_grads(*inputs, alpha=1.0, **common)
    for temperature in temperatures:
        kd = reference_grads(*inputs, alpha=0.0, temperature=temperature, **common)
        for alpha in alphas:
            ref = [(1 - alpha) * k + alpha * c for k, c in zip(kd[:3], ce[:3], strict=True)]
            ours = fused_grads(*inputs, alpha=alpha, temperature=temperature, backend=backend,
                               chunk_tokens=chunk_tokens, **common)
            case = f"{divergence} {dtype} T={temperature} alpha={alpha}"
            assert rel_err(ours[0], ref[0]) <= loss_tol, case
            assert rel_err(ours[1], ref[1]) <= grad_tol, case
            assert rel_err(ours[2], ref[2]) <= grad_tol, case
            assert ours[1].dtype == dtype and ours[2].dtype == dtype, case
        assert rel_err(ours[3]["kd_sum"], kd[3]["kd_sum"]) <= loss_tol, case
        assert ours[3]["valid_tokens"] == kd[3]["valid_tokens"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_torch_path_against_float64_reference(divergence, dtype):
    """[3, 13] tokens in chunks of 8 (a partial last chunk), odd hidden sizes, V 1003 > 1000."""
    inputs = head_inputs(shape=(3, 13), dtype=dtype, seed=1)
    check_grid(inputs, backend="torch", divergence=divergence, temperatures=TEMPERATURES,
               alphas=ALPHAS, chunk_tokens=8)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("divergence", "temperature", "alpha", "dtype"), [
    (name, TEMPERATURES[i % 4], ALPHAS[i % 3], (torch.float32, torch.bfloat16)[i % 2])
    for i, name in enumerate(DIVERGENCES + DIVERGENCES[:2])
], ids=str)
def test_triton_path_against_float64_reference(divergence, temperature, alpha, dtype):
    pytest.importorskip("triton")
    inputs = head_inputs(shape=(11,), vocab=1003, dtype=dtype, seed=2)
    check_grid(inputs, backend="triton", divergence=divergence, temperatures=(temperature,),
               alphas=(alpha,), chunk_tokens=4)


def test_never_allocates_a_tokens_by_vocab_tensor():
    """The largest storage the fused forward + backward creates is one chunk's logit block;
    the unfused path (which the recorder must catch, or it proves nothing) makes several of
    [tokens x vocab]."""
    n_tokens, vocab = 1024, 2053
    inputs = head_inputs(shape=(n_tokens,), hs=16, ht=24, vocab=vocab, valid_vocab=2048,
                         seed=3)
    h_s, w_s, h_t, w_t, labels = inputs
    full = n_tokens * vocab * 4
    hs, ws = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    with AllocationRecorder() as fused:
        loss, _ = kd_head_loss(hs, ws, h_t, w_t, labels, valid_vocab=2048, chunk_tokens=64)
        loss.backward()
    assert max(fused.sizes) <= 64 * vocab * 4 < full / 8
    with AllocationRecorder() as unfused:
        loss, _ = kd_loss(h_s.requires_grad_(True) @ w_s.t(), h_t @ w_t.t(), labels,
                          valid_vocab=2048)
        loss.backward()
    assert unfused.count_at_least(full) >= 3  # both logits and the gradient


def test_chunk_rule_splits_the_tokens_evenly():
    """The largest chunk the budget allows, evened out: the seed shapes on CUDA (4096 tokens,
    V 50304, bf16, two blocks of at most 256 MiB) run as 4 x 1024, not 3 x 1334 + 94."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert head_chunk_tokens(4096, 50304, True, 4, cpu) == 256
    assert head_chunk_tokens(100, 50304, True, 4, cpu) == 100
    assert head_chunk_tokens(4096, 50304, True, 2, cuda) == 1024
    assert head_chunk_tokens(4096, 50304, False, 2, cuda) == 2048  # one block: twice the rows
    assert head_chunk_tokens(1000, 50304, True, 2, cuda) == 1000
    assert head_chunk_tokens(4096, 50304, True, 2, cuda, requested=3072) == 2048
    for n_tokens in (1, 37, 4095, 24 * 2048 + 1):
        chunk = head_chunk_tokens(n_tokens, 50304, True, 2, cuda)
        sizes = [min(chunk, n_tokens - start) for start in range(0, n_tokens, chunk)]
        assert chunk * 2 * 2 * 50304 <= 256 << 20 and max(sizes) - min(sizes) < len(sizes)


def test_the_head_runs_equal_chunks(monkeypatch):
    """chunk_tokens=3072 over 4096 tokens runs two chunks of 2048 (not 3072 + 1024)."""
    import engine.kernels.kd_head as kd_head

    rows, real = [], kd_head.loss_and_grad

    def recording(backend, s, *args):
        rows.append(s.shape[0])
        return real(backend, s, *args)

    monkeypatch.setattr(kd_head, "loss_and_grad", recording)
    inputs = head_inputs(shape=(4096,), hs=8, ht=8, vocab=67, valid_vocab=64, seed=4)
    kd_head_loss(*inputs, valid_vocab=64, backend="torch", chunk_tokens=3072)
    assert rows == [2048, 2048]


def unfused(h_s, w_s, h_t, w_t, labels, **kwargs):
    loss, stats = kd_loss(torch.nn.functional.linear(h_s, w_s),
                          torch.nn.functional.linear(h_t, w_t).detach(), labels, **kwargs)
    loss.backward()
    return loss.detach(), stats


@pytest.mark.parametrize("precision", ["fp32", "bf16-pure", "bf16-autocast"])
def test_equals_the_unfused_path_under_each_precision(precision):
    """Same loss and gradients (and gradient dtypes) as F.linear + kd_loss. Under autocast the
    logits are bf16 for both, so the losses agree far closer than either agrees with fp32 (the
    gradients differ by bf16 rounding either way: one product rounded, or one per chunk)."""
    dtype = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    inputs = head_inputs(shape=(2, 19), dtype=dtype, seed=4)
    kwargs = dict(alpha=0.5, temperature=2.0, valid_vocab=1000)
    results = []
    for fused in (True, False):
        h_s, w_s = (x.clone().requires_grad_(True) for x in inputs[:2])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            if fused:
                loss, _ = kd_head_loss(h_s, w_s, *inputs[2:], chunk_tokens=16, **kwargs)
                loss.backward()
            else:
                loss, _ = unfused(h_s, w_s, *inputs[2:], **kwargs)
        assert h_s.grad.dtype == dtype and w_s.grad.dtype == dtype
        results.append((loss.detach().float(), h_s.grad.float(), w_s.grad.float()))
    tol = 1e-5 if precision == "fp32" else 3e-3
    for ours, theirs in zip(results[0], results[1], strict=True):
        assert rel_err(ours, theirs) <= tol, precision
    if precision == "bf16-autocast":
        fp32 = fused_grads(*inputs, chunk_tokens=16, **kwargs)
        assert rel_err(results[0][0], results[1][0]) < rel_err(fp32[0], results[1][0]) / 10


def test_second_backward_recomputes_and_scales():
    inputs = head_inputs(seed=5)
    h_s, w_s = (x.clone().requires_grad_(True) for x in inputs[:2])
    loss, _ = kd_head_loss(h_s, w_s, *inputs[2:], valid_vocab=1000, chunk_tokens=10)
    loss.backward(retain_graph=True)
    first = h_s.grad.clone(), w_s.grad.clone()
    loss.backward(torch.tensor(2.0))
    torch.testing.assert_close(h_s.grad, 3 * first[0])
    torch.testing.assert_close(w_s.grad, 3 * first[1])
    with pytest.raises(RuntimeError, match=r"once_differentiable|does not require grad"):
        loss2, _ = kd_head_loss(h_s, w_s, *inputs[2:], valid_vocab=1000)
        (grad,) = torch.autograd.grad(loss2, h_s, create_graph=True)
        grad.sum().backward()


def test_only_the_gradients_asked_for_and_none_for_the_teacher():
    inputs = head_inputs(seed=6)
    h_s, w_s, h_t, w_t, labels = inputs
    h_t.requires_grad_(True)
    w_t.requires_grad_(True)
    _, ref_h, ref_w, _ = reference_grads(*inputs, valid_vocab=1000)
    ws = w_s.clone().requires_grad_(True)
    loss, _ = kd_head_loss(h_s, ws, h_t, w_t, labels, valid_vocab=1000)
    loss.backward()
    assert rel_err(ws.grad, ref_w) <= 1e-4 and h_t.grad is None and w_t.grad is None
    hs = h_s.clone().requires_grad_(True)
    (grad_h,) = torch.autograd.grad(kd_head_loss(hs, w_s, h_t, w_t, labels,
                                                 valid_vocab=1000)[0], hs)
    assert rel_err(grad_h, ref_h) <= 1e-4
    with torch.no_grad():
        loss, stats = kd_head_loss(h_s, w_s, h_t, w_t, labels, valid_vocab=1000)
    assert not loss.requires_grad and stats["valid_tokens"] == (labels != -100).sum()


def test_accumulation_over_two_calls_equals_one_batch():
    inputs = head_inputs(shape=(30,), seed=7)
    h_s, w_s, h_t, w_t, labels = inputs
    window = (labels != -100).sum()
    hs, ws = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    for part in (slice(0, 12), slice(12, 30)):
        loss, _ = kd_head_loss(hs[part], ws, h_t[part], w_t, labels[part], valid_vocab=1000,
                               normalizer=window, chunk_tokens=5)
        loss.backward()
    _, ref_h, ref_w, _ = reference_grads(*inputs, valid_vocab=1000)
    assert rel_err(hs.grad, ref_h) <= 1e-4 and rel_err(ws.grad, ref_w) <= 1e-4


@pytest.mark.parametrize(("change", "match"), [
    (lambda x: {**x, "student_weight": x["student_weight"][:, :5]}, r"student_weight \(1003, 5\)"),
    (lambda x: {**x, "teacher_weight": x["teacher_weight"][:999]}, "vocabulary rows"),
    (lambda x: {**x, "teacher_hidden": x["teacher_hidden"][:5]}, "same leading dims"),
    (lambda x: {**x, "labels": x["labels"][:5]}, "labels' shape"),
    (lambda x: {**x, "labels": x["labels"].float()}, "integer"),
    (lambda x: {**x, "student_weight": x["student_weight"].double()}, "must share a dtype"),
    (lambda x: {**x, "chunk_tokens": 0}, "chunk_tokens=0"),
    (lambda x: {**x, "valid_vocab": 1004}, "valid_vocab=1004"),
    (lambda x: {**x, "divergence": "kl"}, "divergence='kl'"),
])
def test_bad_inputs_name_the_problem(change, match):
    h_s, w_s, h_t, w_t, labels = head_inputs(seed=8)
    kwargs = dict(student_hidden=h_s, student_weight=w_s, teacher_hidden=h_t,
                  teacher_weight=w_t, labels=labels)
    with pytest.raises(ValueError, match=match):
        kd_head_loss(**change(kwargs))


def test_weight_gradient_is_rounded_once_whatever_the_chunks():
    """bf16 inputs: d weight over 32 chunks is as close to float64 as d weight in one chunk
    (summed in fp32 and rounded to bf16 once, not rounded per chunk before the sum)."""
    inputs = head_inputs(shape=(4096,), hs=64, ht=64, vocab=2048, valid_vocab=2000,
                         dtype=torch.bfloat16, seed=5)
    kwargs = dict(valid_vocab=2000, alpha=0.5, temperature=2.0)
    ref_w = reference_grads(*inputs, **kwargs)[2]
    errors = {chunk: rel_err(fused_grads(*inputs, backend="torch", chunk_tokens=chunk,
                                         **kwargs)[2], ref_w)
              for chunk in (4096, 128)}
    assert errors[128] <= 1.1 * errors[4096], errors
