"""Teacher logits -> cache records -> the loss's SparseTargets: the two cache kinds' arithmetic.

A cache record holds, per position, up to K (column id, value) entries plus 8 bytes:

    top_k    the teacher's k most likely columns at the cache temperature T, ids ascending,
             value = log-probability (float16); aux = log of the mass on every other column
             (float32, exact: a log-sum-exp over those columns, never log(1 - sum));
    sampled  S draws with replacement from the teacher's distribution at T, as the distinct
             columns drawn (ascending) and how often each was drawn (value = count, uint16);
             aux = the teacher's entropy at T (float32), so the KD estimate is unbiased too.

`targets_from_records` turns a batch of records into engine.kernels.sparse_targets.SparseTargets:
top-k masses are renormalised together with the tail so the buckets sum to 1 exactly
(float16 rounding would otherwise leave them a few 1e-4 off), sampled masses are count / S,
an unbiased estimate of the teacher's probability (the proposal is the teacher itself, so each
draw's importance weight p / proposal is 1 and the estimate is the plain frequency).
"""

from __future__ import annotations

import numpy as np
import torch

from engine.kernels.sparse_targets import SparseTargets

KINDS = ("top_k", "sampled")
# float16's most negative finite value: a log-probability below it is stored as this (its
# probability is 0 in every float format the loss computes in).
LOG_PROB_FLOOR = -65504.0


def record_dtype(width: int, id_dtype: str, value_dtype: str) -> np.dtype:
    """The record of one position: 2 x `width` entries + aux (f4) + count (u2) + flags (u2).

    Packed, little-endian, no alignment padding: 4 * width + 8 bytes with uint16 ids."""
    return np.dtype([("ids", f"<{np.dtype(id_dtype).str[1:]}", (width,)),
                     ("values", f"<{np.dtype(value_dtype).str[1:]}", (width,)),
                     ("aux", "<f4"), ("count", "<u2"), ("flags", "<u2")])


def teacher_scores(logits: torch.Tensor, temperature: float, valid_vocab: int):
    """(logits / T over the first valid_vocab columns, their log-sum-exp per row), in float32
    (float64 stays float64): log p = scores - lse, without forming log p for every column."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scores = logits[..., :valid_vocab].to(compute) * (1.0 / temperature)  # a new tensor
    top = scores.amax(dim=-1, keepdim=True)
    lse = scores.sub(top).exp_().sum(-1).log_().add_(top.squeeze(-1))
    return scores, lse


def teacher_log_probs(logits: torch.Tensor, temperature: float, valid_vocab: int):
    """log softmax(logits / T) over the first valid_vocab columns (float32; float64 stays)."""
    scores, lse = teacher_scores(logits, temperature, valid_vocab)
    return scores.sub_(lse[..., None])


# Above this mass on the listed columns, the tail 1 - mass is taken from a log-sum-exp over
# the other columns instead of log1p(-mass) (whose relative error is ~1e-7 / (1 - mass)).
EXACT_TAIL_ABOVE = 0.99


def top_k_entries(scores: torch.Tensor, k: int, lse: torch.Tensor | None = None, *,
                  sync_free: bool = False):
    """(ids [n, k] ascending, log-probabilities [n, k], log tail mass [n]) of the rows
    softmax(scores) (lse: their log-sum-exp; None: scores are log-probabilities already).

    sync_free: the exact tail is computed for every row and kept where the listed mass is
    above EXACT_TAIL_ABOVE, instead of for the selected rows only (selecting them reads a row
    count back to the host: a device synchronisation). Same values, one more pass over the
    block: the device encoder's choice, where the pass is cheap and a sync is not."""
    lse = torch.zeros(scores.shape[:1], dtype=scores.dtype, device=scores.device) \
        if lse is None else lse
    top = torch.topk(scores, k, dim=-1, sorted=False)
    ids, order = torch.sort(top.indices, dim=-1)
    values = top.values.gather(1, order).sub_(lse[:, None])
    if k == scores.shape[-1]:
        return ids, values, torch.full_like(lse, float("-inf"))
    mass = values.exp().sum(-1)
    log_tail = torch.log1p(-mass.clamp_max(EXACT_TAIL_ABOVE))
    if sync_free:
        rows = scores.clone().scatter_(1, ids, float("-inf"))
        exact = torch.logsumexp(rows, dim=-1) - lse
        return ids, values, torch.where(mass > EXACT_TAIL_ABOVE, exact, log_tail)
    peaked = (mass > EXACT_TAIL_ABOVE).nonzero().squeeze(1)
    if peaked.numel():  # exact: a log-sum-exp over the unlisted columns of those rows
        rows = scores.index_select(0, peaked).scatter_(1, ids.index_select(0, peaked),
                                                       float("-inf"))
        log_tail[peaked] = torch.logsumexp(rows, dim=-1) - lse.index_select(0, peaked)
    return ids, values, log_tail


def sampled_entries(scores: torch.Tensor, samples: int, generator: torch.Generator,
                    lse: torch.Tensor | None = None):
    """(distinct ids [n, S] ascending then 0-padded, counts [n, S], distinct per row [n],
    entropy [n]) of `samples` draws with replacement from softmax(scores) (lse as above).

    torch.multinomial draws by inverse CDF with the cumulative sums in float64; the counts
    come from a sort and a run-length count per row, vectorised over the rows."""
    lse = torch.zeros(scores.shape[:1], dtype=scores.dtype, device=scores.device) \
        if lse is None else lse
    log_p = scores - lse[:, None]
    p = log_p.exp()
    entropy = -torch.linalg.vecdot(p, log_p)
    drawn = torch.multinomial(p, samples, replacement=True, generator=generator)
    drawn, _ = torch.sort(drawn, dim=-1)
    starts = torch.ones_like(drawn, dtype=torch.bool)
    starts[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    run = starts.cumsum(-1) - 1  # which distinct id each draw belongs to
    counts = torch.zeros_like(drawn).scatter_add_(1, run, torch.ones_like(drawn))
    ids = torch.zeros_like(drawn).scatter_(1, run, drawn)  # every draw of a run: the same id
    return ids, counts, starts.sum(-1), entropy


# Logit elements encoded at once on the CPU: 4 MB of fp32 per pass, which stays in cache
# between the passes over a block, so a row encodes faster than in one 1024-row block
# (benchmarks/README.md). On a GPU, blocks that small would be launch-bound: a block there is
# up to 2**26 elements (256 MiB of fp32 scores, a whole 1024-row chunk at V = 50304).
ENCODE_BLOCK_ELEMENTS = 1 << 20
DEVICE_BLOCK_ELEMENTS = 1 << 26
ENTRY_FIELDS = ("ids", "values", "aux", "count")


def _encode_block(logits, *, kind, width, temperature, valid_vocab, generator, sync_free):
    """The entries of one block of logit rows as tensors on the logits' device."""
    scores, lse = teacher_scores(logits, temperature, valid_vocab)
    if kind == "top_k":
        ids, values, aux = top_k_entries(scores, width, lse, sync_free=sync_free)
        count = torch.full((scores.shape[0],), width, device=scores.device)
        values = values.clamp_min(LOG_PROB_FLOOR)
    else:
        ids, values, count, aux = sampled_entries(scores, width, generator, lse)
    return {"ids": ids, "values": values, "aux": aux.float(), "count": count}


def entries_to_host(entries: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The one device-to-host copy of a batch's encoded entries (numpy, dtypes unchanged).

    On a GPU every field is copied asynchronously (into pinned memory) and the host waits once,
    on an event recorded after the copies: not for the stream's later work (the builder's next
    teacher forward, enqueued from the other thread). CPU tensors are only viewed as numpy."""
    device = entries["ids"].device
    if device.type == "cpu":
        return {name: tensor.numpy() for name, tensor in entries.items()}
    host = {name: tensor.to("cpu", non_blocking=True) for name, tensor in entries.items()}
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(device))
    copied.synchronize()
    return {name: tensor.numpy() for name, tensor in host.items()}


def encode_batch(chunks, *, kind: str, width: int, temperature: float, valid_vocab: int,
                 dtype: np.dtype, generator: torch.Generator | None = None,
                 sync_free: bool | None = None) -> np.ndarray:
    """Records (numpy, `dtype` from record_dtype) of a batch of teacher logit chunks (each
    [n, V], any float dtype, all on one device), in order.

    Each chunk is encoded a block at a time (ENCODE_BLOCK_ELEMENTS on the CPU,
    DEVICE_BLOCK_ELEMENTS elsewhere) into tensors on its device; the batch's entries then
    reach the host in one copy (entries_to_host) and are cast to the record's field types
    there, so a GPU build synchronises once per batch, not per block. sync_free (default:
    off the CPU) picks top_k_entries' variant that reads nothing back."""
    chunks = [chunk for chunk in chunks if chunk.shape[0]]
    records = np.zeros(sum(chunk.shape[0] for chunk in chunks), dtype=dtype)
    if not chunks:
        return records
    device = chunks[0].device
    sync_free = device.type != "cpu" if sync_free is None else sync_free
    budget = ENCODE_BLOCK_ELEMENTS if device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
    step = max(1, budget // max(1, chunks[0].shape[-1]))
    blocks = [_encode_block(chunk[start:start + step], kind=kind, width=width,
                            temperature=temperature, valid_vocab=valid_vocab,
                            generator=generator, sync_free=sync_free)
              for chunk in chunks for start in range(0, chunk.shape[0], step)]
    host = entries_to_host({name: torch.cat([block[name] for block in blocks])
                            for name in ENTRY_FIELDS})
    for name in ENTRY_FIELDS:
        records[name] = host[name]
    return records


def encode_records(logits, *, kind: str, width: int, temperature: float, valid_vocab: int,
                   dtype: np.dtype, generator: torch.Generator | None = None) -> np.ndarray:
    """Records of one tensor of teacher logits [n, V]: encode_batch of that one chunk."""
    return encode_batch([logits], kind=kind, width=width, temperature=temperature,
                        valid_vocab=valid_vocab, dtype=dtype, generator=generator)


def listed(count: torch.Tensor, width: int) -> torch.Tensor:
    """[n, width] bool: the entries a record uses (the first count[n])."""
    return torch.arange(width, device=count.device) < count[:, None]


def top_k_targets(ids, log_p, count, log_tail) -> SparseTargets:
    """SparseTargets of flat top-k entries: masses and tail renormalised to sum to 1, the
    entropy of those k + 1 buckets; an empty record (count 0) has neither mass nor tail."""
    used = listed(count, ids.shape[-1])
    masked = log_p.masked_fill(~used, float("-inf"))
    log_tail = torch.where(count > 0, log_tail, float("-inf"))
    log_total = torch.logaddexp(torch.logsumexp(masked, dim=-1), log_tail)
    log_total = torch.where(torch.isfinite(log_total), log_total, 0.0)  # an empty record
    log_mass = (log_p - log_total[:, None]).masked_fill(~used, 0.0)
    log_tail = log_tail - log_total
    tail = log_tail.exp()
    entropy = -(log_mass.exp() * log_mass).masked_fill(~used, 0.0).sum(-1) - torch.where(
        tail > 0, tail * log_tail, 0.0)
    return SparseTargets(ids, log_mass, count, log_tail, entropy)


def sampled_targets(ids, draws, count, entropy) -> SparseTargets:
    """SparseTargets of flat sampled entries: mass count / S, no tail, the teacher's entropy."""
    used = listed(count, ids.shape[-1])
    total = (draws * used).sum(-1, keepdim=True).clamp_min(1)
    log_mass = torch.where(used, (draws / total).log(), 0.0)
    log_tail = torch.full(count.shape, float("-inf"), dtype=log_mass.dtype,
                          device=log_mass.device)
    return SparseTargets(ids, log_mass, count, log_tail,
                         torch.where(count > 0, entropy, 0.0))


def targets_from_records(records: np.ndarray, kind: str) -> SparseTargets:
    """SparseTargets (CPU, float32 masses, int32 ids) of records of any leading shape."""
    shape, flat = records.shape, records.reshape(-1)
    ids = torch.from_numpy(flat["ids"].astype(np.int32))
    values = torch.from_numpy(flat["values"].astype(np.float32))
    count = torch.from_numpy(flat["count"].astype(np.int32))
    aux = torch.from_numpy(flat["aux"].astype(np.float32))
    build = top_k_targets if kind == "top_k" else sampled_targets
    targets = build(ids, values, count, aux)
    k = ids.shape[-1]
    return SparseTargets(targets.ids.reshape(*shape, k), targets.log_mass.reshape(*shape, k),
                         count.reshape(shape), targets.log_tail.reshape(shape),
                         targets.entropy.reshape(shape))
