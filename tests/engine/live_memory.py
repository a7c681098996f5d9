"""Peak bytes of live tensors while some code runs, on any device (the CPU in the tests).

A TorchDispatchMode sees every ATen op below autograd (inside custom autograd Functions and
during backward too). Each output whose storage is new is counted until the last tensor
viewing that storage is garbage collected (PyTorch keeps a tensor's Python object alive for as
long as C++ holds the tensor, so its finalizer marks the real release). Storages that existed
before (weights, gradients being accumulated into) are not counted: the peak is what the code
adds on top of them, which is what the memory plan's activation and loss groups predict.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """`with LiveBytes() as live: ...` then live.peak: the most bytes alive at once."""

    def __init__(self):
        super().__init__()
        self.owners: dict[int, list[int]] = {}  # storage pointer -> [live tensors, bytes]
        self.live = 0
        self.peak = 0

    def _release(self, pointer: int) -> None:
        entry = self.owners.get(pointer)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.owners[pointer]

    def _track(self, tensor: torch.Tensor, input_pointers: set[int]) -> None:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer == 0 or (pointer in input_pointers and pointer not in self.owners):
            return  # empty, or a view / in-place result of a tensor made before
        entry = self.owners.get(pointer)
        if entry is None:
            entry = self.owners[pointer] = [0, storage.nbytes()]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(tensor, self._release, pointer)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        input_ids = {id(t) for t in inputs}
        input_pointers = {t.untyped_storage().data_ptr() for t in inputs}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and id(tensor) not in input_ids:
                self._track(tensor, input_pointers)
        return out
