"""The end of a run: the student as a plain Hugging Face folder (+ tokenizer, model card).

The export loads unchanged in transformers' GPTNeoXForCausalLM and AutoTokenizer and in
lm-evaluation-harness (docs/formats.md). It is staged and swapped in whole, so a crash leaves
the previous export. Every export carries a marker file, written last; an existing folder is
replaced only when it carries that marker (or is empty), so an export can never delete a
folder the engine did not export (a model's source folder, a run folder, anything of the
user's).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from engine.data.atomic import staged_folder
from engine.model.hf_io import write_model_files
from engine.train.file_writes import WRITE_ERRORS, WriteFailed, describe_write_error, follow_umask
from engine.train.model_card import CARD_NAME, write_tokenizer_files

TOKENIZER_NAME = "tokenizer.json"
EXPORT_MARKER = "neox_distill_export.json"
EXPORT_FORMAT = "neox-distill-export"


def exported_files(folder: Path) -> list[str] | None:
    """The files an export of this engine wrote in `folder`, as its marker (written last)
    lists them; None when the folder holds no such marker."""
    try:
        marker = json.loads((folder / EXPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != EXPORT_FORMAT:
        return None
    files = marker.get("files")
    return files if isinstance(files, list) else None


def replace_refusal(folder: Path) -> str | None:
    """Why an export must not replace `folder`, or None when it may: only an export of ours
    holding nothing but the files its marker lists is replaced (a user's file added to it
    since, e.g. evaluation results, would be lost with it)."""
    if not folder.exists():
        return None
    if not folder.is_dir():
        return f"{folder}: exists and is not a folder; not replacing it"
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return None
    files = exported_files(folder)
    if files is None:
        return (f"{folder}: exists and was not exported by neox-distill (no {EXPORT_MARKER} "
                "listing its files); not replacing it (choose another run.export_dir, or move "
                "the folder away)")
    added = [name for name in entries if name not in (*files, EXPORT_MARKER)]
    if added:
        return (f"{folder}: an export of neox-distill, but {', '.join(added[:6])} "
                f"{'was' if len(added) == 1 else 'were'} added to it since; not replacing it "
                "(move them away, or choose another run.export_dir)")
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
            # Last: a folder holding the marker is a complete export of ours.
            marker = {"format": EXPORT_FORMAT, "format_version": 1,
                      "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(source or {}),
                      "files": sorted(p.name for p in staged.iterdir())}
            (staged / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n",
                                                encoding="utf-8")
    except WRITE_ERRORS as exc:
        raise WriteFailed(
            f"{export_dir}: cannot export the student: {describe_write_error(exc)}"
        ) from None
    return export_dir
