"""The loss kernels: fused softmax-with-temperature divergence + cross-entropy (docs/loss.md).

The public API, importable as `from engine.kernels import kd_head_loss`:

- on logits: `kd_loss` (teacher logits) and `sparse_kd_loss` (a teacher cache's targets);
- on hidden states and head weights, never forming a [tokens x vocab] logit tensor:
  `kd_head_loss`, `sparse_kd_head_loss` and `ce_head_loss` (cross-entropy only);
- their float64 references: `kd_loss_reference`, `kd_head_loss_reference`,
  `sparse_kd_reference`, `sparse_kd_head_loss_reference`;
- `DIVERGENCES`, the names `divergence=` takes, and `IGNORE_INDEX`;
- `LossSpec`, every setting of the loss in one frozen, checked value (`spec.keywords()` is the
  keyword form the functions above take).

This package imports nothing else of ours (tests/test_architecture.py); Triton is imported only
when a Triton path runs.
"""

from engine.kernels.constants import IGNORE_INDEX
from engine.kernels.divergences import DIVERGENCES
from engine.kernels.kd_head import ce_head_loss, kd_head_loss, kd_head_loss_reference
from engine.kernels.kd_loss import kd_loss, kd_loss_reference
from engine.kernels.loss_spec import LossSpec
from engine.kernels.sparse_kd import sparse_kd_loss
from engine.kernels.sparse_kd_head import sparse_kd_head_loss, sparse_kd_head_loss_reference
from engine.kernels.sparse_kd_torch import sparse_kd_reference
from engine.kernels.sparse_targets import SparseTargets

__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "LossSpec",
    "SparseTargets",
    "ce_head_loss",
    "kd_head_loss",
    "kd_head_loss_reference",
    "kd_loss",
    "kd_loss_reference",
    "sparse_kd_head_loss",
    "sparse_kd_head_loss_reference",
    "sparse_kd_loss",
    "sparse_kd_reference",
]
