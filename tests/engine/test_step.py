"""engine.train.step: gradients, normaliser semantics, frozen teacher; the fused head + loss
(the default) against the full-logits path, wrapped models and whole-step allocations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.kd_loss import kd_loss_reference
from engine.kernels.loss_spec import LossSpec
from engine.model import GPTNeoX, GPTNeoXConfig
from engine.train.step import distill_micro_step
from engine.train.teacher_signal import LiveTeacher, NoTeacher

VOCAB = 97  # odd on purpose
VALID_VOCAB = 90



def live(teacher):
    """The teacher model as the step's teacher signal (None: cross-entropy only)."""
    return LiveTeacher(teacher) if teacher is not None else NoTeacher()


def micro_step(student, signal, batch, *, normalizer, autocast_dtype=None, inplace_grad=True,
               chunk_tokens=None, **spec_fields):
    """distill_micro_step with the LossSpec's fields as keywords (None: CE only)."""
    return distill_micro_step(student, signal if signal is not None else NoTeacher(), batch,
                              LossSpec(**spec_fields), normalizer=normalizer,
                              autocast_dtype=autocast_dtype, inplace_grad=inplace_grad,
                              chunk_tokens=chunk_tokens)

def tiny_model(seed: int, hidden: int = 32, heads: int = 2) -> GPTNeoX:
    torch.manual_seed(seed)
    model = GPTNeoX(
        GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            num_layers=2,
            num_heads=heads,
            intermediate_size=2 * hidden + 6,
            max_positions=32,
        )
    )
    with torch.no_grad():  # LayerNorm 1 / bias 0 would hide a missing term
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def random_batch(seed: int, rows: int = 4, seq: int = 11) -> dict[str, torch.Tensor]:
    """Random tokens; labels ignored on a different number of positions per row."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VALID_VOCAB, (rows, seq), generator=gen)
    labels = torch.randint(0, VALID_VOCAB, (rows, seq), generator=gen)
    for r in range(rows):
        labels[r, seq - 2 * r - 1 :] = -100  # row r: 2r+1 ignored targets at the end
    labels[0, 0] = -100
    return {"input_ids": input_ids, "labels": labels}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("with_teacher", [True, False])
def test_accumulation_equals_one_big_batch(with_teacher):
    teacher = tiny_model(1, hidden=48, heads=3).eval() if with_teacher else None
    if teacher is not None:
        teacher.requires_grad_(False)
    big = random_batch(0)
    kwargs = dict(alpha=0.3, temperature=1.7, valid_vocab=VALID_VOCAB)

    student = tiny_model(0)
    whole = micro_step(student, live(teacher), big, normalizer=None, **kwargs)
    expected = grads(student)

    student.zero_grad(set_to_none=True)
    total_valid = float((big["labels"] != -100).sum())
    sums = torch.zeros(4)
    for rows in ([0], [1, 2], [3]):  # uneven micro-batches, uneven valid counts
        part = {k: v[rows] for k, v in big.items()}
        stats = micro_step(student, live(teacher), part, normalizer=total_valid, **kwargs)
        sums += torch.stack(
            [stats["loss"], stats["ce_sum"], stats["kd_sum"], stats["valid_tokens"]]
        )
    for name, grad in grads(student).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(sums[0], whole["loss"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sums[1], whole["ce_sum"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sums[2], whole["kd_sum"], rtol=1e-6, atol=1e-6)
    assert sums[3] == whole["valid_tokens"] == total_valid


def test_loss_matches_float64_reference_and_teacher_stays_frozen():
    student, teacher = tiny_model(0), tiny_model(1, hidden=48, heads=3).eval()
    teacher.requires_grad_(False)
    batch = random_batch(3, rows=3, seq=9)
    stats = micro_step(
        student, live(teacher), batch, alpha=0.5, temperature=2.0, valid_vocab=VALID_VOCAB,
        normalizer=17.0,
    )
    with torch.no_grad():
        ref_loss, ref_stats = kd_loss_reference(
            student(batch["input_ids"]).double(),
            teacher(batch["input_ids"]).double(),
            batch["labels"],
            alpha=0.5,
            temperature=2.0,
            valid_vocab=VALID_VOCAB,
            normalizer=17.0,
        )
    torch.testing.assert_close(stats["loss"].double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["kd_sum"].double(), ref_stats["kd_sum"].double(), rtol=1e-5,
                               atol=1e-5)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    for value in stats.values():
        assert value.dim() == 0 and value.dtype == torch.float32 and not value.requires_grad


def test_without_teacher_it_is_plain_cross_entropy():
    student = tiny_model(0)
    batch = random_batch(5)
    stats = micro_step(
        student, None, batch, alpha=0.5, temperature=2.0, valid_vocab=VALID_VOCAB, normalizer=None
    )
    expected_grads = grads(student)
    student.zero_grad(set_to_none=True)
    logits = student(batch["input_ids"])[..., :VALID_VOCAB]
    loss = F.cross_entropy(logits.reshape(-1, VALID_VOCAB), batch["labels"].reshape(-1))
    loss.backward()
    torch.testing.assert_close(stats["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
    assert stats["kd_sum"] == 0
    for name, grad in grads(student).items():
        torch.testing.assert_close(expected_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_autocast_runs_and_stays_close():
    student, teacher = tiny_model(0), tiny_model(1, hidden=48, heads=3).eval()
    teacher.requires_grad_(False)
    batch = random_batch(7)
    kwargs = dict(alpha=0.5, temperature=2.0, valid_vocab=None, normalizer=None)
    fp32 = micro_step(student, live(teacher), batch, **kwargs)
    bf16 = micro_step(student, live(teacher), batch, autocast_dtype=torch.bfloat16,
                              **kwargs)
    assert torch.isfinite(bf16["loss"])
    torch.testing.assert_close(bf16["loss"], fp32["loss"], rtol=0.05, atol=0.05)
    assert all(p.dtype == torch.float32 for p in student.parameters())


def test_bad_batches_are_named():
    student = tiny_model(0)
    kwargs = dict(alpha=0.5, temperature=2.0, valid_vocab=None, normalizer=None)
    with pytest.raises(ValueError, match="'input_ids' and 'labels'"):
        micro_step(student, None, {"input_ids": torch.zeros(1, 3, dtype=torch.long)},
                           **kwargs)
    bad = {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.ones(2, 4,
                                                                                  dtype=torch.long)}
    with pytest.raises(ValueError, match=r"must both be \[B, T\]"):
        micro_step(student, None, bad, **kwargs)


def test_in_place_logit_gradient_changes_nothing():
    teacher = tiny_model(1, hidden=48, heads=3).eval()
    teacher.requires_grad_(False)
    batch = random_batch(11)
    results = []
    for inplace in (True, False):
        student = tiny_model(0)
        stats = micro_step(student, live(teacher), batch, alpha=0.5, temperature=2.0,
                                   valid_vocab=VALID_VOCAB, normalizer=None, inplace_grad=inplace,
                                   fused_head=False)
        results.append((stats, grads(student)))
    (stats_a, grads_a), (stats_b, grads_b) = results
    assert torch.equal(stats_a["loss"], stats_b["loss"])
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name


# ------------------------------------------------------------------ fused head vs full logits


class RecordingSignal:
    """A teacher signal of a test's own, with no base class (as the on-policy source will be):
    the step must run it through the protocol alone. Delegates to `inner`, noting each call."""

    teaches, from_cache = True, False

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def describe(self) -> str:
        return "recording " + self.inner.describe()

    def teacher_side(self, batch, input_ids, spec, autocast_dtype):
        self.calls.append("teacher_side")
        return self.inner.teacher_side(batch, input_ids, spec, autocast_dtype)

    def head_loss(self, side, *args, **kwargs):
        self.calls.append("head_loss")
        return self.inner.head_loss(side, *args, **kwargs)

    def logits_loss(self, side, *args, **kwargs):
        self.calls.append("logits_loss")
        return self.inner.logits_loss(side, *args, **kwargs)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-head", "logits"])
def test_a_new_teacher_signal_plugs_in_without_touching_the_step(fused):
    """The step's one path: any object with the TeacherSignal methods is a teacher; it gets
    the teacher's side before the student and the loss after, nothing else."""
    teacher = tiny_model(1, hidden=48, heads=3).eval().requires_grad_(False)
    batch = random_batch(5)
    spec = LossSpec(alpha=0.3, temperature=1.7, valid_vocab=VALID_VOCAB, fused_head=fused)
    student = tiny_model(0)
    expected = distill_micro_step(student, LiveTeacher(teacher), batch, spec, normalizer=None)
    expected_grads = grads(student)
    student = tiny_model(0)
    recording = RecordingSignal(LiveTeacher(teacher))
    got = distill_micro_step(student, recording, batch, spec, normalizer=None)
    assert recording.calls == ["teacher_side", "head_loss" if fused else "logits_loss"]
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    for name, grad in grads(student).items():
        assert torch.equal(grad, expected_grads[name]), name


def _step_both_ways(make_student, teacher, batches, **settings):
    """(stats per micro-batch, gradients) with loss.fused_head on and off, same everything."""
    runs = []
    for fused in (True, False):
        student = make_student()
        stats = [micro_step(student, live(teacher), batch, fused_head=fused, **settings)
                 for batch in batches]
        runs.append((stats, grads(student)))
    return runs


def _assert_runs_close(runs, rtol, atol):
    (fused_stats, fused_grads), (full_stats, full_grads) = runs
    for fused, full in zip(fused_stats, full_stats, strict=True):
        for key in ("loss", "ce_sum", "kd_sum", "valid_tokens"):
            torch.testing.assert_close(fused[key], full[key], rtol=rtol, atol=atol, msg=key)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize(("divergence", "extra"), [
    ("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}),
    ("skew_forward_kl", {"skew": 0.2}), ("skew_reverse_kl", {"skew": 0.1}),
    ("tvd", {"t2_scale": False}), ("ce-only", {}),
])
def test_fused_head_equals_full_logits_fp32(divergence, extra):
    """Accumulated over uneven micro-batches with one window normaliser, checkpointed;
    "ce-only" is the run without a teacher (the fused CE head)."""
    teacher = None
    if divergence != "ce-only":
        teacher = tiny_model(1, hidden=48, heads=3).eval().requires_grad_(False)
        extra = {"divergence": divergence, **extra}
    big = random_batch(21)
    batches = [{k: v[rows] for k, v in big.items()} for rows in ([0], [1, 2], [3])]

    def make_student():
        student = tiny_model(0)
        student.set_activation_checkpointing(True)
        return student

    runs = _step_both_ways(make_student, teacher, batches, alpha=0.3, temperature=1.7,
                           valid_vocab=VALID_VOCAB,
                           normalizer=float((big["labels"] != -100).sum()), **extra)
    _assert_runs_close(runs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16-autocast", "bf16-pure"])
def test_fused_head_equals_full_logits_in_bf16(precision):
    """bf16 rounds the logits either way (per chunk or all at once): close, not equal."""
    teacher = tiny_model(1, hidden=48, heads=3).eval().requires_grad_(False)
    autocast = torch.bfloat16 if precision == "bf16-autocast" else None
    if precision == "bf16-pure":
        teacher = teacher.to(torch.bfloat16)

    def make_student():
        student = tiny_model(0)
        return student.to(torch.bfloat16) if precision == "bf16-pure" else student

    runs = _step_both_ways(make_student, teacher, [random_batch(22)], alpha=0.5,
                           temperature=2.0, valid_vocab=VALID_VOCAB, normalizer=None,
                           autocast_dtype=autocast)
    (fused_stats, fused_grads), (full_stats, full_grads) = runs
    torch.testing.assert_close(fused_stats[0]["loss"], full_stats[0]["loss"], rtol=1e-2,
                               atol=1e-2)
    for name, grad in fused_grads.items():
        assert grad.dtype == full_grads[name].dtype, name
        error = (grad.float() - full_grads[name].float()).norm() / full_grads[name].float().norm()
        assert error < 3e-2, name


def test_fused_head_through_compile_and_ddp_wrappers(tmp_path):
    """The forward runs through the wrapper (return_hidden=True), the head weight comes from
    the module inside it, and DDP's hooks see embed_out's gradient (one-rank gloo group)."""
    import torch.distributed as dist

    teacher = tiny_model(1, hidden=48, heads=3).eval().requires_grad_(False)
    batch = random_batch(23)
    settings = dict(alpha=0.5, temperature=2.0, valid_vocab=VALID_VOCAB, normalizer=None)
    plain = tiny_model(0)
    expected = micro_step(plain, live(teacher), batch, **settings)
    compiled = tiny_model(0)
    got = micro_step(torch.compile(compiled, backend="eager"),
                             live(torch.compile(teacher, backend="eager")), batch, **settings)
    torch.testing.assert_close(got["loss"], expected["loss"], rtol=1e-6, atol=1e-6)
    for name, grad in grads(compiled).items():
        torch.testing.assert_close(grad, grads(plain)[name], rtol=1e-5, atol=1e-7, msg=name)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        inner = tiny_model(0)
        wrapped = torch.nn.parallel.DistributedDataParallel(inner)
        seen = []

        def record_bucket(_state, bucket):
            seen.extend(bucket.parameters())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())  # one rank: the sum is the local gradient
            return future

        wrapped.register_comm_hook(None, record_bucket)
        micro_step(wrapped, live(teacher), batch, **settings)
    finally:
        dist.destroy_process_group()
    assert any(p is inner.embed_out.weight for p in seen), "DDP never reduced embed_out"
    for name, grad in grads(inner).items():
        torch.testing.assert_close(grad, grads(plain)[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_whole_training_step_never_allocates_tokens_by_vocab():
    """Every storage a fused training step creates (forward, fused head + loss, backward,
    clipping, AdamW), recorded through the dispatcher: none is [tokens x vocab]; the full
    logits path, which the recorder must catch or the test proves nothing, makes several."""
    from engine.train.step import train_step
    from tests.kernels.alloc_tracking import AllocationRecorder

    vocab, rows, seq = 50304, 2, 512  # Pythia's vocabulary, 1024 tokens: 3 CPU chunks of 320
    logits_bytes = rows * seq * vocab * 4

    def make(seed, hidden, heads):
        torch.manual_seed(seed)
        return GPTNeoX(GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_layers=1,
                                     num_heads=heads, intermediate_size=2 * hidden,
                                     max_positions=seq))

    teacher = make(1, 32, 2).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    window = [{name: torch.randint(0, 50277, (rows, seq), generator=gen)
               for name in ("input_ids", "labels")}]
    recorded = {}
    for fused in (True, False):
        student = make(0, 16, 2)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
        settings = dict(alpha=0.5, temperature=2.0, valid_vocab=50277, fused_head=fused)
        with AllocationRecorder() as recorder:
            result = train_step(student, student, live(teacher), optimizer, window,
                                spec=LossSpec(**settings), autocast_dtype=None,
                                max_grad_norm=1.0, lr=1e-3,
                                stop_requested=False)
        assert result.applied
        recorded[fused] = recorder
    assert max(recorded[True].sizes) < logits_bytes / 3
    assert recorded[True].count_at_least(rows * seq * vocab * 2) == 0  # not even in bf16
    assert recorded[False].count_at_least(logits_bytes) >= 2  # both models' logits
