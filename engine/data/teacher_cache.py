"""The teacher cache: a folder of per-position teacher targets beside a folder of token shards.

    neox-distill cache-teacher --teacher DIR --data SHARDS --out CACHE --top-k 64

writes it (engine/data/teacher_cache_job.py is the resumable job), and training reads it with
`teacher.cache = CACHE` instead of running the teacher. The layout (docs/formats.md):

    manifest.json           written last: the settings, fingerprints, shards and totals
    shard_00000.cache       one file per token shard, same name: one fixed-size record per
    shard_00001.cache       *token* of that shard, in the shard's token order

Alignment: record r of a shard belongs to token r of the same shard and holds the teacher's
distribution of the *next* token, as predicted at that position with the context the training
data mode gives it (a packed window, or the document from its start). So the cache depends on
the data mode and seq_len as well as the shards, and both are in its fingerprint. Positions
that are never a training target (a document's tokens past seq_len + 1 in padded mode, the
stream's last tokens in packed mode) hold an empty record (count 0, all zeros). Records are
4 * K + 8 bytes (engine/data/teacher_cache_encode.py), memory-mapped and read row range by row
range.

`CachedTargets(dataset, cache)` wraps a PackedDataset / PaddedDataset: each batch gains the
fields of engine.kernels.sparse_targets.SparseTargets under the keys in TARGET_KEYS, aligned with
its
labels, after checking that every trained label has a record and every record a label.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from engine.data.loader import PackedDataset, PaddedDataset
from engine.data.shards import FORMAT_NAME as SHARDS_FORMAT_NAME
from engine.data.shards import MANIFEST_NAME, PROGRESS_NAME, file_sha256
from engine.data.teacher_cache_encode import KINDS, record_dtype, targets_from_records
from engine.data.tokenizer_file import canonical_fingerprint
from engine.kernels.constants import IGNORE_INDEX
from engine.kernels.sparse_targets import SparseTargets

FORMAT_NAME = "neox-distill-teacher-cache"
# Version 2 added data.content, the sha256 of the shards' bytes (version 1 fingerprinted
# shards without a manifest.json by their shapes only).
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
SHARD_SUFFIX = ".cache"
# The batch keys of the targets, in SparseTargets' field order.
TARGET_KEYS = ("teacher_ids", "teacher_log_mass", "teacher_count", "teacher_log_tail",
               "teacher_entropy")


class CacheError(ValueError):
    """A cache folder that is missing, damaged, unfinished or does not match what training
    reads; the message names the file and the mismatch."""


def model_fingerprint(folder: str | Path) -> str:
    """sha256 identifying a model folder's content: its config.json (canonical JSON) and the
    sha256 of every safetensors weight file, by name. Reads every weight byte once."""
    folder = Path(folder)
    parts = {}
    config = folder / "config.json"
    if not config.is_file():
        raise CacheError(f"{config}: not found (a teacher folder needs config.json)")
    parts["config.json"] = canonical_fingerprint(json.loads(config.read_text()))
    for path in [*sorted(folder.glob("*.safetensors")), folder / "model.safetensors.index.json"]:
        if path.is_file():
            parts[path.name] = file_sha256(path)
    return canonical_fingerprint(parts)


def targets_of_batch(batch: dict) -> SparseTargets:
    """The SparseTargets a CachedTargets batch carries (KeyError when it carries none)."""
    return SparseTargets(*(batch[key] for key in TARGET_KEYS))


def job_record_kind(path: Path) -> str | None:
    """Which job wrote the .progress.json at `path`: "cache-teacher" (a record of a teacher
    cache build), "preprocess" (a token-shard job's), or None (unreadable or anything else)."""
    try:
        record = json.loads(path.read_text())
        made_by = record["settings"]["format"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None
    if made_by == FORMAT_NAME and isinstance(record, dict) and "state" in record:
        return "cache-teacher"
    return "preprocess" if made_by == SHARDS_FORMAT_NAME else None


def manifest_format(path: Path) -> str | None:
    """The "format" of the manifest.json at `path` (None when it is unreadable or has none)."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest.get("format") if isinstance(manifest, dict) else None


def shards_folder_message(folder: Path) -> str | None:
    """Why `folder` is token shards (a preprocess job's output, finished or not) rather than a
    teacher cache, in words; None when it is not."""
    if (folder / MANIFEST_NAME).is_file():
        if manifest_format(folder / MANIFEST_NAME) == SHARDS_FORMAT_NAME:
            return (f"{folder}: holds token shards (neox-distill preprocess output, "
                    f"{MANIFEST_NAME}), not a teacher cache")
        return None
    if job_record_kind(folder / PROGRESS_NAME) == "preprocess":
        return (f"{folder}: holds an unfinished neox-distill preprocess job (token shards and "
                f"its {PROGRESS_NAME}), not a teacher cache")
    return None


def read_cache_manifest(folder: Path) -> dict:
    """The manifest of a finished cache folder, or CacheError saying what the folder is."""
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise CacheError(f"{folder}: no such cache folder")
    shards = shards_folder_message(folder)
    if shards:
        raise CacheError(f"{shards}; point teacher.cache at a folder written by neox-distill "
                         "cache-teacher")
    if not path.is_file():
        if (folder / PROGRESS_NAME).is_file():
            try:  # a damaged record still marks the folder unfinished
                command = json.loads((folder / PROGRESS_NAME).read_text()).get("command")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                command = None
            raise CacheError(f"{folder}: an unfinished neox-distill cache-teacher job is in this "
                             f"folder; finish it with: {command or 'the same command'}")
        raise CacheError(f"{folder}: no {MANIFEST_NAME}: not a teacher cache")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{path}: not a teacher cache manifest (no \"format\": "
                         f"\"{FORMAT_NAME}\")")
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise CacheError(f"{path}: format_version {manifest.get('format_version')!r} is not "
                         f"one this neox-distill reads {READABLE_FORMAT_VERSIONS}; rebuild the "
                         "cache with this neox-distill")
    if manifest.get("kind") not in KINDS:
        raise CacheError(f"{path}: kind {manifest.get('kind')!r} is not one of {KINDS}")
    return manifest


class TeacherCache:
    """A finished cache folder, memory-mapped and checked against its manifest when opened:
    sizes always, and the sha256 of every file unless verify=False (which reads them all once,
    as a checkpoint is verified before a resume: a cache damaged in place would otherwise
    train on wrong targets without a word)."""

    def __init__(self, folder: str | Path, *, verify: bool = True):
        self.folder = Path(folder)
        self.manifest = read_cache_manifest(self.folder)
        fields = self.manifest["record"]
        self.kind = self.manifest["kind"]
        self.width = int(fields["width"])
        self.valid_vocab = int(self.manifest["valid_vocab"])
        self.dtype = record_dtype(self.width, fields["ids"], fields["values"])
        self.shards = [self._open_shard(entry, verify) for entry in self.manifest["shards"]]
        self.row_starts = np.zeros(len(self.shards) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in self.shards], out=self.row_starts[1:])
        self.total_rows = int(self.row_starts[-1])

    def shard_path(self, entry: dict) -> Path:
        return self.folder / f"{entry['name']}{SHARD_SUFFIX}"

    def _open_shard(self, entry: dict, verify: bool) -> np.ndarray:
        path = self.shard_path(entry)
        if not path.is_file():
            raise CacheError(f"{path}: cache shard not found (listed in {MANIFEST_NAME})")
        size = path.stat().st_size
        if size != entry["rows"] * self.dtype.itemsize:
            raise CacheError(f"{path}: {size} bytes, but {MANIFEST_NAME} says {entry['rows']} "
                             f"records of {self.dtype.itemsize} bytes")
        if verify and file_sha256(path) != entry["sha256"]:
            raise CacheError(f"{path}: damaged (its sha256 differs from the one {MANIFEST_NAME} "
                             "recorded when the cache was built); rebuild the cache")
        if entry["rows"] == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(entry["rows"],))

    def locate(self, row: int) -> tuple[Path, int]:
        """(the file holding record `row` of the whole stream, its index in that file)."""
        shard = int(np.searchsorted(self.row_starts, row, side="right")) - 1
        return self.shard_path(self.manifest["shards"][shard]), row - int(self.row_starts[shard])

    def rows(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Records [start, stop) of the whole stream (copied into `out` when given)."""
        if not 0 <= start <= stop <= self.total_rows:
            raise IndexError(f"{self.folder}: rows [{start}, {stop}) outside "
                             f"[0, {self.total_rows})")
        out = np.zeros(stop - start, dtype=self.dtype) if out is None else out
        filled = 0
        shard = int(np.searchsorted(self.row_starts, start, side="right")) - 1
        while filled < stop - start:
            local = start + filled - int(self.row_starts[shard])
            take = min(stop - start - filled, len(self.shards[shard]) - local)
            out[filled:filled + take] = self.shards[shard][local:local + take]
            filled += take
            shard += 1
        return out


# Slack for float rounding in the sign checks of stored log-probabilities and entropies.
_ROUNDING = 1e-3


def record_problem(records: np.ndarray, kind: str, valid_vocab: int) -> tuple[int, str] | None:
    """(index, what is wrong in words) of the first of the flat `records` that no build
    writes, or None when all are well-formed: at most `width` entries (top-k: exactly width),
    ids ascending inside [0, valid_vocab), top-k log-probabilities and log tail finite and
    <= 0, sampled counts >= 1 summing to the draws, a finite entropy >= 0. Empty records
    (count 0) are not looked into."""
    width = records.dtype["ids"].shape[0]
    count = records["count"].astype(np.int64)
    full = count > 0
    used = np.arange(width) < np.minimum(count, width)[:, None]
    ids = records["ids"].astype(np.int64)
    values = records["values"].astype(np.float64)
    aux = records["aux"].astype(np.float64)
    unordered = (np.diff(ids, axis=-1) <= 0) & used[:, 1:]
    checks = [(count > width, lambda i: f"count {count[i]} above the width {width}"),
              ((((ids < 0) | (ids >= valid_vocab)) & used).any(-1),
               lambda i: f"a token id outside [0, {valid_vocab})"),
              (unordered.any(-1), lambda i: "token ids not ascending")]
    if kind == "top_k":
        bad_value = ~(np.isfinite(values) & (values <= _ROUNDING)) & used
        checks += [(full & (count != width),
                    lambda i: f"count {count[i]}, not the width {width} of a top-k record"),
                   (bad_value.any(-1), lambda i: "a log-probability that is not finite and "
                    f"<= 0 ({values[i][bad_value[i]][0]})"),
                   (full & ~(aux <= _ROUNDING),
                    lambda i: f"a log tail mass that is not <= 0 ({aux[i]})")]
    else:
        draws = np.where(used, values, 0).sum(-1)
        checks += [(((values < 1) & used).any(-1), lambda i: "a token drawn 0 times"),
                   (full & (draws != width),
                    lambda i: f"{draws[i]:.0f} draws, not the {width} samples of the cache"),
                   (full & ~(np.isfinite(aux) & (aux >= -_ROUNDING)),
                    lambda i: f"an entropy that is not finite and >= 0 ({aux[i]})")]
    first = None
    for bad, words in checks:
        hits = np.flatnonzero(bad)
        if hits.size and (first is None or hits[0] < first[0]):
            first = (int(hits[0]), words)
    return None if first is None else (first[0], first[1](first[0]))


def item_rows(dataset, item: int) -> tuple[int, int]:
    """(first cache row, trained positions) of a dataset item: the rows of its labels."""
    if isinstance(dataset, PackedDataset):
        return item * dataset.seq_len, dataset.seq_len
    if isinstance(dataset, PaddedDataset):
        shards = dataset.shards
        shard = int(np.searchsorted(shards.doc_starts, item, side="right")) - 1
        local = item - int(shards.doc_starts[shard])
        ixd = shards.shards[shard]
        start = int(shards.token_starts[shard]) + int(ixd.pointers[local]) // ixd.dtype.itemsize
        return start, max(min(int(ixd.sizes[local]) - 1, dataset.seq_len), 0)
    raise CacheError(f"a teacher cache aligns with PackedDataset or PaddedDataset items, "
                     f"not {type(dataset).__name__}")


class CachedTargets:
    """A dataset whose batches also carry the cached teacher targets (module docstring)."""

    def __init__(self, dataset, cache: TeacherCache):
        self.dataset, self.cache = dataset, cache
        self.seq_len = dataset.seq_len

    def __getattr__(self, name):
        """Everything else (shards, pad_id, window, ...) is the wrapped dataset's."""
        if name == "dataset":  # not set yet (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def fingerprint(self) -> str:
        return self.dataset.fingerprint()  # the data order; the cache is in the run's config

    def records(self, indices: np.ndarray) -> np.ndarray:
        """[len(indices), seq_len] records aligned with the items' labels (empty past them)."""
        out = np.zeros((len(indices), self.seq_len), dtype=self.cache.dtype)
        for row, item in enumerate(indices.tolist()):
            start, trained = item_rows(self.dataset, int(item))
            self.cache.rows(start, start + trained, out=out[row, :trained])
        return out

    def get_batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        batch = self.dataset.get_batch(indices)
        records = self.records(indices)
        self._check_records(records, indices)
        self._check_alignment(batch["labels"], records, indices)
        targets = targets_from_records(records, self.cache.kind)
        for key, value in zip(TARGET_KEYS, (targets.ids, targets.log_mass, targets.count,
                                            targets.log_tail, targets.entropy), strict=True):
            batch[key] = value
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = self.get_batch(np.array([i]))
        return {k: v[0] for k, v in batch.items()}

    def _check_records(self, records: np.ndarray, indices) -> None:
        """CacheError naming the file and record of the first record no build writes (a
        non-finite or positive log-probability, an id outside the scored vocabulary, ...):
        the sha256 check at open time covers damage on disk, this covers a cache whose
        manifest was rewritten with it, or a file changed while the run reads it."""
        problem = record_problem(records.reshape(-1), self.cache.kind, self.cache.valid_vocab)
        if problem is None:
            return
        flat, words = problem
        row, col = divmod(flat, self.seq_len)
        path, local = self.cache.locate(item_rows(self.dataset, int(indices[row]))[0] + col)
        raise CacheError(f"{path}: record {local} is not one neox-distill cache-teacher writes "
                         f"({words}): the cache is damaged; rebuild it")

    def _check_alignment(self, labels: torch.Tensor, records: np.ndarray, indices) -> None:
        trained = labels.numpy() != IGNORE_INDEX
        mismatch = np.flatnonzero((trained != (records["count"] > 0)).reshape(-1))
        if mismatch.size:
            row, col = divmod(int(mismatch[0]), self.seq_len)
            start, _ = item_rows(self.dataset, int(indices[row]))
            what = "has no cached record" if trained[row, col] else "is not trained but has one"
            raise CacheError(f"{self.cache.folder}: position {col} of item {int(indices[row])} "
                             f"(cache row {start + col}) {what}: the cache does not match "
                             "these shards")


def _data_mismatch(manifest: dict, dataset) -> str | None:
    """How the data a cache was built for differs from `dataset`, in words; None if equal.

    The shapes first (mode, seq_len, pad_id, token counts: cheap), then the content: the
    sha256 of every shard file (format version 2). A version-1 cache recorded the content only
    through the shards' manifest.json; for shards without one it cannot tell two texts of the
    same shape apart and is refused."""
    built = manifest["data"]
    if built.get("fingerprint") != dataset.fingerprint():
        mode = "packed" if isinstance(dataset, PackedDataset) else "padded"
        differences = [f"{key} {built.get(key)!r} (training: {ours!r})"
                       for key, ours in (("mode", mode), ("seq_len", dataset.seq_len),
                                         ("pad_id", getattr(dataset, "pad_id", None)))
                       if built.get(key) != ours and not (key == "pad_id" and mode == "packed")]
        return ", ".join(differences) or "other token shards (their fingerprints differ)"
    if "content" not in built:
        if dataset.shards.manifest is None:
            return ("token shards without a manifest.json, which a cache of format_version "
                    f"{manifest['format_version']} identified by their shapes only (it cannot "
                    "tell other text of the same shape apart)")
        return None  # the fingerprint holds the sha256 the shards' manifest records
    if built["content"] != dataset.shards.content_fingerprint():
        return ("other token shards of the same shape (the sha256 of their .bin/.idx files "
                "differ)")
    return None


def check_cache_matches(cache: TeacherCache, dataset, *, temperature: float, valid_vocab: int,
                        tokenizer_fingerprint: str | None = None,
                        teacher_fingerprint: str | None = None) -> None:
    """CacheError naming the first thing that differs between what the cache was built from
    and what this training run reads: the data (shards, mode, seq_len, pad_id), the
    temperature, the scored vocabulary, the tokenizer and, when given, the teacher."""
    manifest, where = cache.manifest, cache.folder / MANIFEST_NAME
    problem = _data_mismatch(manifest, dataset)
    if problem:
        raise CacheError(f"{where}: built for other data: {problem}; rebuild it with "
                         "neox-distill cache-teacher for this data.path, data.mode and "
                         "batch.seq_len")
    if float(manifest["temperature"]) != float(temperature):
        raise CacheError(f"{where}: holds the teacher at temperature {manifest['temperature']}, "
                         f"but loss.temperature is {temperature}; rebuild it with --temperature "
                         f"{temperature} or set loss.temperature={manifest['temperature']}")
    if int(manifest["valid_vocab"]) != int(valid_vocab):
        raise CacheError(f"{where}: built over the first {manifest['valid_vocab']} vocabulary "
                         f"columns, but training scores {valid_vocab} (data.valid_vocab)")
    built_tokenizer = (manifest.get("tokenizer") or {}).get("fingerprint")
    if tokenizer_fingerprint and built_tokenizer and built_tokenizer != tokenizer_fingerprint:
        raise CacheError(f"{where}: built from shards of another tokenizer (fingerprint "
                         f"{built_tokenizer[:12]}..., run.tokenizer's "
                         f"{tokenizer_fingerprint[:12]}...)")
    built_teacher = manifest["teacher"]["fingerprint"]
    if teacher_fingerprint and built_teacher != teacher_fingerprint:
        raise CacheError(f"{where}: built from another teacher than teacher.path (fingerprints "
                         f"{built_teacher[:12]}... and {teacher_fingerprint[:12]}...)")
