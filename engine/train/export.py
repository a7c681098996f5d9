"""The end of a run: the student as a plain Hugging Face folder (+ tokenizer, model card).

The export loads unchanged in transformers' GPTNeoXForCausalLM and AutoTokenizer and in
lm-evaluation-harness (docs/formats.md). It is staged and swapped in whole, so a crash leaves
the previous export. Every export carries a marker file, written last, with the sha256 of each
file and the run folder that exported it; an existing folder is replaced only when it is empty
or carries that marker with every file unchanged since (and, without run.overwrite, was
exported by the same run), so an export can never delete a folder the engine did not export
(a model's source folder, a run folder, anything of the user's), an edit made to an export
since, nor another run's export.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from engine.data.atomic import staged_folder
from engine.data.owned_folder import read_folder_marker, write_folder_marker
from engine.model.hf_io import (
    MODEL_MARKER,
    MODEL_MARKER_FORMAT,
    model_folder_refusal,
    write_model_files,
)
from engine.train.file_writes import WRITE_ERRORS, WriteFailed, describe_write_error, follow_umask
from engine.train.model_card import CARD_NAME, write_tokenizer_files

TOKENIZER_NAME = "tokenizer.json"
EXPORT_MARKER = MODEL_MARKER
EXPORT_FORMAT = MODEL_MARKER_FORMAT


def replace_refusal(folder: Path, *, run_dir: str | os.PathLike | None = None,
                    overwrite: bool = False) -> str | None:
    """Why an export must not replace `folder`, or None when it may: only an export of ours
    whose every file is still as its marker records it (sha256) is replaced; a file added or
    edited since (evaluation results, an edited README.md) would be lost with it. With
    `run_dir`, an export another run folder wrote is replaced only with run.overwrite."""
    fix = "choose another run.export_dir, or move the folder away"
    refusal = model_folder_refusal(folder, fix)
    if refusal or run_dir is None or not folder.is_dir():
        return refusal
    record = read_folder_marker(folder, EXPORT_MARKER, EXPORT_FORMAT)
    writer = (record or {}).get("run_dir")
    if writer and not overwrite and Path(writer).resolve() != Path(run_dir).resolve():
        return (f"{folder}: the export of another run ({writer}); not replacing it without "
                f"run.overwrite=true ({fix})")
    return None


def export_student(
    student: torch.nn.Module,
    export_dir: str | os.PathLike,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    model_card: str | None = None,
    pad_id: int | None = None,
    source: dict | None = None,
    write_weights=None,
) -> Path:
    """Write the student as a plain Hugging Face folder, atomically: with `tokenizer_path`
    also tokenizer.json and the AutoTokenizer settings (engine/train/model_card.py, `pad_id`
    the pad token), with `model_card` a README.md.

    `source` (e.g. the run folder and step) goes into the marker. `write_weights(folder)`
    replaces the model files' writer (engine/train/gathered_export.py: an FSDP student's
    weights gathered one by one). Raises FileExistsError for a folder this engine did not
    export and WriteFailed when the disk refuses the files.
    """
    export_dir = Path(export_dir)
    refusal = replace_refusal(export_dir)
    if refusal:
        raise FileExistsError(refusal)
    try:
        with staged_folder(export_dir) as staged:
            if write_weights is not None:
                write_weights(staged)
            else:
                write_model_files(student, staged, dtype)
            if tokenizer_path:
                shutil.copyfile(tokenizer_path, staged / TOKENIZER_NAME)
                write_tokenizer_files(staged, student.config, pad_id,
                                      source=Path(tokenizer_path))
            if model_card is not None:
                (staged / CARD_NAME).write_text(model_card, encoding="utf-8")
            follow_umask(staged)
            # Last: a folder holding the marker is a complete export of ours, and the sha256
            # of each file it lists tells a later export whether the file is still ours.
            write_folder_marker(staged, EXPORT_MARKER, EXPORT_FORMAT,
                                {"exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                 **(source or {})})
    except WRITE_ERRORS as exc:
        raise WriteFailed(
            f"{export_dir}: cannot export the student: {describe_write_error(exc)}"
        ) from None
    return export_dir
