"""The loss specification: every setting of the KD + CE loss in one frozen, checked value.

The engine builds one `LossSpec` from the configuration's `loss` section (and data.valid_vocab)
and passes it to everything that computes or reports the loss: the training step, the teacher
signals, held-out scoring. The public kernel functions (engine.kernels) keep their keyword form
for users; `spec.keywords()` is that form. Checked once, when built: a bad value is a
ValueError naming the field, as the kernels word it.
"""

from __future__ import annotations

import dataclasses

from engine.kernels.constants import IGNORE_INDEX
from engine.kernels.divergences import resolve_divergence

# "epilogue": the Triton kernels, and for kd_head_loss the head whose matmul epilogue reduces
# the logits (engine/kernels/head_epilogue.py) where it supports the call; on logits it is
# "triton".
BACKENDS = ("auto", "triton", "torch", "epilogue")


def check_hyperparameters(alpha, temperature) -> None:
    """ValueError unless alpha is in [0, 1] and temperature > 0."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature={temperature} must be > 0")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What the loss computes (docs/loss.md): alpha * CE + (1 - alpha) * KD.

    alpha: weight of the hard-label cross-entropy; temperature: the KD softmaxes' T;
    divergence (beta for jsd, skew for the skew KLs) and t2_scale: the KD term;
    valid_vocab: logit columns >= it are excluded (None: all); ignore_index: unscored labels;
    backend: which kernels run (BACKENDS); fused_head: both LM heads run inside the loss
    (no [tokens x vocab] logits) rather than on the models' full logits.
    """

    alpha: float = 0.5
    temperature: float = 2.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    t2_scale: bool = True
    valid_vocab: int | None = None
    ignore_index: int = IGNORE_INDEX
    backend: str = "auto"
    fused_head: bool = True

    def __post_init__(self) -> None:
        check_hyperparameters(self.alpha, self.temperature)
        if not isinstance(self.t2_scale, bool):
            raise ValueError(f"t2_scale={self.t2_scale!r} must be True or False")
        resolve_divergence(self)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} must be one of {BACKENDS}")

    def keywords(self) -> dict:
        """The public kernel functions' keyword arguments for this spec (kd_loss, kd_head_loss,
        sparse_kd_loss, sparse_kd_head_loss take them all)."""
        return dict(alpha=self.alpha, temperature=self.temperature,
                    ignore_index=self.ignore_index, valid_vocab=self.valid_vocab,
                    backend=self.backend, divergence=self.divergence, beta=self.beta,
                    skew=self.skew, t2_scale=self.t2_scale)

    def kd_keywords(self) -> dict:
        """The KD term's definition alone (temperature, divergence, beta, skew, t2_scale): what
        held-out scoring and the float64 references take. No alpha (scoring reports the CE
        and KD sums apart) and no backend (scoring picks its own)."""
        return dict(temperature=self.temperature, divergence=self.divergence, beta=self.beta,
                    skew=self.skew, t2_scale=self.t2_scale)

    def replace(self, **changes) -> LossSpec:
        """A copy with `changes` (checked again)."""
        return dataclasses.replace(self, **changes)

    def divergence_label(self) -> str:
        """The KD term's name as metrics report it: "forward_kl", "jsd(beta=0.3)",
        "skew_reverse_kl(skew=0.1)", with ", no T^2" when t2_scale is off."""
        args = {"jsd": f"beta={self.beta:g}", "skew_forward_kl": f"skew={self.skew:g}",
                "skew_reverse_kl": f"skew={self.skew:g}"}.get(self.divergence, "")
        if not self.t2_scale:
            args = f"{args}, no T^2" if args else "no T^2"
        return f"{self.divergence}({args})" if args else self.divergence
