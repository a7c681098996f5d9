"""Tiny assets for the teacher cache tests: a BPE tokenizer, three token shards written by
engine.data.preprocess (so windows cross shard boundaries), a teacher and a student."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.data.preprocess import preprocess
from engine.model import GPTNeoX, GPTNeoXConfig, load_pretrained, save_pretrained
from tests.data.common import docs_lines, random_texts, train_tokenizer, write_jsonl

VOCAB = 320  # model rows; the tokenizer has 300 ids
VALID_VOCAB = 300
SEQ_LEN = 32


def make_cache_assets(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    texts = random_texts(120, seed=1)
    corpus = write_jsonl(root / "docs.jsonl", docs_lines(texts))
    tokenizer = train_tokenizer(root / "tokenizer.json", texts, vocab_size=VALID_VOCAB)
    preprocess([corpus], tokenizer, root / "data", shard_tokens=3000, show_progress=False)
    torch.manual_seed(0)
    shapes = {"teacher": dict(hidden_size=64, num_heads=4, intermediate_size=136),
              "student": dict(hidden_size=32, num_heads=2, intermediate_size=72)}
    for name, shape in shapes.items():
        model = GPTNeoX(GPTNeoXConfig(vocab_size=VOCAB, num_layers=2, max_positions=64, **shape))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))  # a teacher with opinions
        save_pretrained(model, root / name)
    return {"teacher": root / "teacher", "student": root / "student", "data": root / "data",
            "tokenizer": tokenizer}


def teacher_logits(assets: dict[str, Path], input_ids: torch.Tensor) -> torch.Tensor:
    """The fp32 teacher's logits [B, T, V] of a batch, for comparisons."""
    teacher = load_pretrained(assets["teacher"], dtype=torch.float32).eval()
    with torch.no_grad():
        return teacher(input_ids)
