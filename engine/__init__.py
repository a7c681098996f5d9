"""The engine: the model, training, evaluation and generation (docs/architecture.md).

Sits on data/ and kernels/ and never imports tools/, benchmarks/ or tests/.
"""
