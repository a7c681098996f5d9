"""The offline quickstart: `python -m engine.train` with no arguments (or engine.quickstart).

    pipeline.py  corpus -> tokenizer -> shards -> pretrain -> distill -> held-out table
    corpus.py    the Pile-format corpus from this machine's Python standard library, and
                 the BPE tokenizer trained on it

Built on the training loop (engine.train.loop), never imported by it.
"""
