"""Files, shards, the batch loader and atomic I/O: imports engine.kernels at most."""
