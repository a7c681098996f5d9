"""Evaluation: the scoring core training shares, the harness tasks, and their command line.

    scoring.py   score_batch, heldout_metrics (also the training loop's validation)
    heldout.py   the held-out split of a token dataset (training, quickstart, --heldout)
    requests.py  data files -> token requests and windows (harness tokenisation)
    tasks.py     lambada / multiple choice / perplexity metrics
    samples.py   the samples task: a teacher's NLL of the model's own samples (on-policy)
    compare.py   the --compare table and chart
    __main__.py  python -m engine.eval
"""

from engine.eval.scoring import heldout_metrics, score_batch

__all__ = ["heldout_metrics", "score_batch"]
