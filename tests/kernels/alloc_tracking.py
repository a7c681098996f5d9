"""Record every new tensor storage that ATen ops create, with its size (CPU or GPU).

A TorchDispatchMode sits below autograd, so it sees the ops inside custom autograd Functions
and the backward pass too. An op's output counts as an allocation when its storage is not the
storage of one of the op's inputs (views and in-place ops reuse storage).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocationRecorder(TorchDispatchMode):
    """`with AllocationRecorder() as rec: ...` then rec.sizes: bytes of each new storage;
    rec.ops: the name of every op that ran (e.g. "aten.mm.default")."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append(str(func))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.sizes.append(t.untyped_storage().nbytes())
        return out

    def count_at_least(self, n_bytes: int) -> int:
        return sum(size >= n_bytes for size in self.sizes)
