"""neox-distill: the one import root of the distribution (docs/architecture.md).

engine.kernels (pure compute) <- engine.data (files, shards, loader) <- the rest of engine (model,
training, evaluation, the `neox-distill` command). This file imports nothing, so that importing
engine.kernels loads no more than the kernels.
"""
