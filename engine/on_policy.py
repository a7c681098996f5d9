"""On-policy batches: the student continues prompts, and only its own tokens are labelled.

`student_batch` turns a batch of training windows into the batch an on-policy loss reads: the
first `prompt_tokens` of every row are the prompt, the student samples `new_tokens` after it
(engine/sampling.py, no gradient), and the result is relabelled so that only the positions
whose next token the student wrote carry a label (the prompt and everything after a row's stop
token are IGNORE_INDEX). The teacher then scores prompt + completion in one prefill, and the
divergence between the two models runs over the completion alone. `teacher_nll_sum` is the
quantity on-policy training lowers: the teacher's negative log-likelihood of the student's
own samples. Training (engine/train/on_policy_signal.py) and evaluation (engine.eval's
`samples` task) share both.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kernels.constants import IGNORE_INDEX
from engine.model.network import autocast_context
from engine.sampling import check_sampling, sample


@dataclass(frozen=True)
class SamplingSettings:
    """How the student writes: prompt and completion lengths, the sampling cut, the stop."""

    prompt_tokens: int
    new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop_token: int | None = None
    valid_vocab: int | None = None

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)
        for name in ("prompt_tokens", "new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value}")

    @classmethod
    def of(cls, onpolicy, valid_vocab: int | None) -> SamplingSettings:
        """From a config's `onpolicy` section (0 top_k, 1 top_p, -1 stop_token: none)."""
        return cls(prompt_tokens=onpolicy.prompt_tokens, new_tokens=onpolicy.new_tokens,
                   temperature=onpolicy.temperature, top_k=onpolicy.top_k or None,
                   top_p=onpolicy.top_p if onpolicy.top_p < 1 else None,
                   stop_token=onpolicy.stop_token if onpolicy.stop_token >= 0 else None,
                   valid_vocab=valid_vocab)

    @property
    def length(self) -> int:
        """Positions of an on-policy row: prompt + completion."""
        return self.prompt_tokens + self.new_tokens


def relabel(prompts: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> dict:
    """{"input_ids", "labels"} of prompt + completion, labelled on the completion only.

    input_ids[t] predicts labels[t]: the prediction of the first new token sits at the
    prompt's last position, and the last new token is a label only, never an input."""
    sequence = torch.cat((prompts, tokens), dim=1)
    labels = torch.full_like(sequence, IGNORE_INDEX)
    labels[:, prompts.shape[1]:] = torch.where(mask, tokens, IGNORE_INDEX)
    return {"input_ids": sequence[:, :-1], "labels": labels[:, 1:]}


def student_batch(student: torch.nn.Module, input_ids: torch.Tensor, settings: SamplingSettings,
                  *, generator: torch.Generator | None = None,
                  autocast_dtype: torch.dtype | None = None,
                  labels: torch.Tensor | None = None,
                  gathered=contextlib.nullcontext) -> dict:
    """The on-policy batch of `input_ids` [B, T >= prompt_tokens] (module docstring), plus
    "generated": the tokens each row really wrote [B]. Every row runs all new_tokens decode
    steps (rows that stop are masked), so ranks that shard the student stay in step.
    With the window's `labels`, a row whose prompt holds padding (an ignored label: a padded
    document shorter than the prompt) is sampled but masked whole: it has no real prompt.
    `gathered(student)` is a context that makes the student's root weights whole (FSDP)."""
    if input_ids.shape[1] < settings.prompt_tokens:
        raise ValueError(f"prompt_tokens: {settings.prompt_tokens} is longer than the batch's "
                         f"{input_ids.shape[1]} tokens")
    prompts = input_ids[:, : settings.prompt_tokens]
    with gathered(student), autocast_context(prompts.device.type, autocast_dtype):
        drawn = sample(student, prompts, settings.new_tokens, temperature=settings.temperature,
                       top_k=settings.top_k, top_p=settings.top_p,
                       stop_token=settings.stop_token, valid_vocab=settings.valid_vocab,
                       generator=generator, stop_early=False)
    mask = drawn.mask
    if labels is not None:
        whole = (labels[:, : settings.prompt_tokens - 1] != IGNORE_INDEX).all(dim=1)
        mask = mask & whole.to(mask.device)[:, None]
    batch = relabel(prompts.to(drawn.tokens.device), drawn.tokens, mask)
    return {**batch, "generated": mask.sum(dim=1)}


def teacher_nll_sum(teacher_out: torch.Tensor, labels: torch.Tensor,
                    head: torch.Tensor | None = None) -> torch.Tensor:
    """Summed negative log-likelihood (fp32, temperature 1) the teacher gives the labelled
    tokens. `teacher_out` is its logits [B, T, V], or its final hidden states when `head`
    (the teacher's head weight, cut to the shared vocabulary) is given: only the labelled
    positions then go through the head."""
    keep = labels != IGNORE_INDEX
    rows, targets = teacher_out[keep], labels[keep]
    if head is not None:
        rows = rows.float() @ head.float().t()
    return F.cross_entropy(rows.float(), targets, reduction="sum")
