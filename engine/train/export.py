"""The end of a run: the student as a plain Hugging Face folder (+ tokenizer, model card).

The export loads unchanged in transformers' GPTNeoXForCausalLM and AutoTokenizer and in
lm-evaluation-harness (docs/formats.md). It is staged and swapped in whole, so a crash leaves
the previous export.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from data.atomic import staged_folder
from engine.model.hf_io import CONFIG_NAME, write_model_files
from engine.train.model_card import CARD_NAME, write_tokenizer_files

TOKENIZER_NAME = "tokenizer.json"


def export_student(
    student: torch.nn.Module,
    export_dir: str | os.PathLike,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    model_card: str | None = None,
    pad_id: int | None = None,
) -> Path:
    """Write the student as a plain Hugging Face folder, atomically: with `tokenizer_path`
    also tokenizer.json and the AutoTokenizer settings (engine/train/model_card.py, `pad_id`
    the pad token), with `model_card` a README.md.

    An existing folder is replaced only when it is a model folder (has config.json).
    """
    export_dir = Path(export_dir)
    if export_dir.exists() and not (export_dir / CONFIG_NAME).is_file():
        raise FileExistsError(
            f"{export_dir}: exists and is not a model folder (no config.json); not replacing it"
        )
    with staged_folder(export_dir) as staged:
        write_model_files(student, staged, dtype)
        if tokenizer_path:
            tokenizer_path = Path(tokenizer_path)
            if not tokenizer_path.is_file():
                raise FileNotFoundError(f"run.tokenizer: {tokenizer_path} is not a file")
            shutil.copyfile(tokenizer_path, staged / TOKENIZER_NAME)
            write_tokenizer_files(staged, student.config, pad_id, source=tokenizer_path)
        if model_card is not None:
            (staged / CARD_NAME).write_text(model_card, encoding="utf-8")
    return export_dir
