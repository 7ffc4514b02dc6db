"""Load preference, SFT and prompt data from files into one normalised schema.

Accepted files: ``.jsonl``, ``.json`` (a list of records, or ``{"data": [...]}``), ``.parquet``,
``.csv``, a Hugging Face dataset saved with ``save_to_disk`` (a ``DatasetDict``: its ``train``
split, or for a held-out set its ``test`` / ``validation`` split), or a directory of files (read
in sorted order). Record formats (TRL's, HH-RLHF, ShareGPT, Alpaca, OpenAI messages,
UltraFeedback) are detected per record or chosen: see ``rlhf_tasks.formats``.

Normalised columns: ``prompt``, ``chosen``, ``rejected`` (preferences) or ``prompt``,
``completion`` (sft) or ``prompt`` (prompts), plus optional ``id``, ``annotator``, ``margin``,
``source`` (where a pair came from, e.g. its Label Studio task).

Files are read as streams (``iter_chunks``: a chunk of rows at a time, memory bounded by the
chunk, not the file), except JSON documents, which are parsed whole.

Loading never raises on a bad row: the row is kept with its problem in ``_parse_error`` so that
the validation gate reports every problem with its file and line, instead of stopping at the first.
Provenance columns: ``_file`` and ``_line`` (1-based line of a JSONL/CSV record, index + 1 in a JSON
list or Parquet file).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlhf_tasks import formats
from rlhf_tasks.errors import ConfigError

TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    "preferences": ("prompt", "chosen", "rejected"),
    "sft": ("prompt", "completion"),
    "prompts": ("prompt",),
}
OPTIONAL_COLUMNS = ("id", "annotator", "margin", "source")
PROVENANCE_COLUMNS = ("_file", "_line", "_format", "_missing", "_parse_error")
# Rows per chunk when a data set is read as a stream (``iter_chunks``).
DEFAULT_CHUNK_ROWS = 20_000
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")

_SURROGATES = re.compile("[\ud800-\udfff]")
# U+FFFD stands in for bytes that were not valid UTF-8 (see _clean_text); the gate reports it.
REPLACEMENT_CHAR = "\ufffd"
BOM = "\ufeff"  # a UTF-8 byte-order mark that some editors and spreadsheets put first


Reading = formats.Reading
AUTO = Reading()
# Splits of a Hugging Face DatasetDict that a held-out data set reads, the first one present.
HELDOUT_SPLITS = ("test", "validation", "heldout", "eval")


@dataclass
class Dataset:
    kind: str  # preferences | sft | prompts
    frame: pd.DataFrame
    files: list[Path]

    @property
    def text_columns(self) -> tuple[str, ...]:
        return TEXT_COLUMNS[self.kind]


def _hf_split(path: Path, heldout: bool) -> Path:
    """The split of a Hugging Face DatasetDict (saved with ``save_to_disk``) that a data set
    reads: ``train``, or for a held-out set the first of HELDOUT_SPLITS. Each split is itself a
    saved Dataset in a subdirectory, which a path may also name directly."""
    splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    wanted = HELDOUT_SPLITS if heldout else ("train",)
    for name in wanted:
        if name in splits:
            return path / name
    raise ConfigError(
        f"{path}: a Hugging Face DatasetDict with splits {', '.join(splits)}, none of them "
        f"{' / '.join(wanted)}; name the split's directory instead ({path / splits[0]})"
    )


def is_hf_dataset(path: Path) -> bool:
    """A Dataset saved with Hugging Face's ``save_to_disk``."""
    return path.is_dir() and (path / "state.json").is_file()


def list_files(paths: Sequence[str | Path], heldout: bool = False) -> list[Path]:
    """Expand directories into their data files; raise ConfigError for a missing path. A saved
    Hugging Face Dataset is one entry (its directory); a DatasetDict, the split the data set
    reads (``train``, or a held-out split when ``heldout``)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and (path / "dataset_dict.json").is_file():
            files.append(_hf_split(path, heldout))
        elif is_hf_dataset(path):
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES)
            if not found:
                raise ConfigError(f"{path}: directory holds no {'/'.join(SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise ConfigError(f"{path}: unsupported file type (expected {', '.join(SUFFIXES)})")
            files.append(path)
        else:
            raise ConfigError(f"{path}: no such file or directory")
    return files


def _clean_text(value: Any) -> Any:
    """Lone surrogates (undecodable bytes, JSON escapes) become U+FFFD, which the gate flags."""
    if isinstance(value, str) and _SURROGATES.search(value):
        return _SURROGATES.sub(REPLACEMENT_CHAR, value)
    return value


def _text_problem(head: bytes) -> str | None:
    """What is wrong with a text file, judged by its first bytes: None if it may be UTF-8 text."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16 text (it starts with a UTF-16 byte-order mark); save the file as UTF-8"
    if b"\x00" in head:
        return "binary data, not text (it holds NUL bytes); expected UTF-8 text"
    return None


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            text = raw.decode("utf-8", errors="surrogateescape")
            if number == 1:
                text = text.removeprefix(BOM)
            if not text.strip():
                continue
            if "\x00" in text:
                yield number, None, "binary data (NUL bytes), not a line of JSON text"
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, None, f"malformed JSON: {exc.msg} (column {exc.colno})"
                continue
            if not isinstance(record, dict):
                yield number, None, f"expected a JSON object, got {type(record).__name__}"
                continue
            yield number, record, None


def _json_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    # A JSON document is parsed whole (its records are not known before its end): prefer JSONL,
    # CSV or Parquet for files that are large compared to memory.
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        yield exc.lineno, None, f"malformed JSON: {exc.msg} (column {exc.colno})"
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        yield 1, None, 'expected a JSON list of records (or {"data": [...]})'
        return
    for index, record in enumerate(data, start=1):
        if isinstance(record, dict):
            yield index, record, None
        else:
            yield index, None, f"expected a JSON object, got {type(record).__name__}"


def _csv_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    # utf-8-sig: spreadsheets write a byte-order mark, which would rename the first column.
    # strict: a stray quote is an error, not a field silently merged with its neighbours.
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh, strict=True)
        try:
            header = reader.fieldnames
        except csv.Error as exc:
            yield 1, None, f"malformed CSV header: {exc}"
            return
        if header is None:
            return
        while True:
            before = reader.line_num
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield before + 1, None, f"malformed CSV (check the quoting): {exc}"
                continue
            # Name a record by its first line (quoted fields may span several lines).
            start = reader.line_num - sum(v.count("\n") for v in row.values() if isinstance(v, str))
            if None in row:
                yield start, None, f"more fields than the header has ({len(header)})"
            elif any(v is None for v in row.values()):
                given = sum(v is not None for v in row.values())
                yield start, None, f"{given} field(s), the header has {len(header)}"
            else:
                yield start, dict(row), None


def _parquet_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        index = 0
        for batch in batches:  # one batch in memory at a time
            for record in batch.to_pylist():
                index += 1
                yield index, {k: _none_if_nan(v) for k, v in record.items()}, None
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        yield max(index, 1), None, f"unreadable Parquet file: {str(exc).splitlines()[0]}"


_READERS = {
    ".jsonl": _jsonl_records,
    ".json": _json_records,
    ".csv": _csv_records,
    ".parquet": _parquet_records,
}


def _hf_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """The rows of a saved Hugging Face Dataset, a batch at a time (memory-mapped Arrow)."""
    from datasets import load_from_disk

    index = 0
    try:
        dataset = load_from_disk(str(path))
        for batch in dataset.iter(batch_size=4096):
            for values in zip(*batch.values(), strict=True):
                index += 1
                yield index, {k: _none_if_nan(v) for k, v in zip(batch, values, strict=True)}, None
    except Exception as exc:  # datasets raises several types for a damaged directory
        yield max(index, 1), None, f"unreadable Hugging Face dataset: {str(exc).splitlines()[0]}"


def _read_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Yield (line, record, parse_error) for each record of one file, reading it as a stream
    (JSON documents excepted); a file that is not text, or holds no record, is one error."""
    # A directory is a saved Hugging Face Dataset: list_files lets no other directory in.
    reader = _hf_records if path.is_dir() else _READERS[path.suffix.lower()]
    if path.suffix.lower() != ".parquet" and not path.is_dir():
        with path.open("rb") as fh:
            problem = _text_problem(fh.read(4096))
        if problem:
            yield 1, None, problem
            return
    empty = True
    for item in reader(path):
        empty = False
        yield item
    if empty:
        yield 1, None, "the file holds no records"


def _none_if_nan(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if hasattr(value, "tolist"):  # numpy arrays from Parquet list columns
        return value.tolist()
    return value


def _row(
    path: Path,
    line: int,
    record: dict[str, Any] | None,
    error: str | None,
    kind: str,
    reading: Reading,
) -> dict[str, Any]:
    """One row of the normalised frame: the record's fields and its provenance."""
    row: dict[str, Any] = {"_file": str(path), "_line": line, "_format": None, "_missing": None}
    if record is not None:
        try:
            fields, fmt = formats.normalise(record, kind, reading.format, reading.columns)
        except ValueError as exc:
            error = str(exc)
        else:
            row |= {k: _clean_text(v) for k, v in fields.items()}
            row["_format"] = fmt
            missing = [c for c in TEXT_COLUMNS[kind] if c not in fields]
            row["_missing"] = ", ".join(missing) or None
    row["_parse_error"] = error
    return row


def _frame(rows: list[dict[str, Any]], kind: str) -> pd.DataFrame:
    optional = [c for c in OPTIONAL_COLUMNS if any(c in row for row in rows)]
    frame = pd.DataFrame(rows, columns=[*TEXT_COLUMNS[kind], *optional, *PROVENANCE_COLUMNS])
    frame = frame.astype(object).where(frame.notna(), None)
    frame["_line"] = frame["_line"].astype(int)
    return frame


def iter_chunks(
    paths: Sequence[str | Path],
    kind: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    *,
    reading: Reading = AUTO,
    heldout: bool = False,
) -> Iterator[Dataset]:
    """The data set as consecutive chunks of at most ``chunk_rows`` rows each (at least one
    chunk, possibly empty), reading the files as streams: memory is bounded by the chunk size,
    not the size of the files. ``kind=None`` detects it from the first good record; ``reading``
    says how records are read, ``heldout`` which split of a DatasetDict.

    Every chunk has all text columns of its kind (None where a record lacks the key, which
    ``_missing`` names) and the optional columns that its records have.
    """
    files = list_files(paths, heldout)
    if reading.format not in formats.FORMAT_NAMES:
        raise ConfigError(
            f"unknown data format {reading.format!r}; expected one of "
            f"{', '.join(formats.FORMAT_NAMES)}"
        )
    if kind is not None and kind not in TEXT_COLUMNS:
        raise ConfigError(f"unknown data kind {kind!r}; expected one of {', '.join(TEXT_COLUMNS)}")
    pending: list[tuple[Path, int, dict[str, Any] | None, str | None]] = []
    done = False

    def chunk() -> Dataset:
        nonlocal kind
        kind = kind or "preferences"
        rows = [_row(*item, kind, reading) for item in pending]
        pending.clear()
        return Dataset(kind=kind, frame=_frame(rows, kind), files=files)

    for path in files:
        for line, record, error in _read_records(path):
            pending.append((path, line, record, error))
            if kind is None and record is not None:
                kind = formats.detect_kind(formats.rename(record, reading.columns), reading.format)
            if len(pending) >= chunk_rows:
                yield chunk()
                done = True
    if pending or not done:
        yield chunk()


def load(
    paths: Sequence[str | Path],
    kind: str | None = None,
    *,
    reading: Reading = AUTO,
    heldout: bool = False,
) -> Dataset:
    """Load files into one normalised Dataset (all rows in memory; see ``iter_chunks``)."""
    (dataset,) = iter_chunks(paths, kind, sys.maxsize, reading=reading, heldout=heldout)
    return dataset


class KeyIndex:
    """Where each key (a tuple of strings) was first seen, for duplicate detection over data that
    is read in chunks: 8-byte hashes in sorted numpy arrays, about 16 bytes per distinct key."""

    def __init__(self) -> None:
        self._hashes = np.empty(0, dtype=np.uint64)
        self._where = np.empty(0, dtype=np.int64)

    @staticmethod
    def _hash(key: tuple[Any, ...]) -> int:
        text = "\x1f".join("" if k is None else str(k).strip() for k in key)
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def add(self, keys: Sequence[tuple[Any, ...]], where: Sequence[int]) -> list[int | None]:
        """Record ``keys`` (found at ``where``); for each, the ``where`` of an earlier occurrence
        (an earlier call or earlier in ``keys``), or None for the first."""
        hashes = np.fromiter((self._hash(k) for k in keys), dtype=np.uint64, count=len(keys))
        where_arr = np.asarray(where, dtype=np.int64)
        unique, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        earlier = where_arr[first][inverse]  # first occurrence within this batch
        if len(self._hashes):
            pos = np.minimum(np.searchsorted(self._hashes, unique), len(self._hashes) - 1)
            known = self._hashes[pos] == unique
            before = np.where(known, self._where[pos], -1)
        else:
            known = np.zeros(len(unique), dtype=bool)
            before = np.full(len(unique), -1, dtype=np.int64)
        earlier = np.where(before[inverse] >= 0, before[inverse], earlier)
        fresh = ~known
        merged_h = np.concatenate([self._hashes, unique[fresh]])
        merged_w = np.concatenate([self._where, where_arr[first][fresh]])
        order = np.argsort(merged_h, kind="stable")
        self._hashes, self._where = merged_h[order], merged_w[order]
        return [None if e == w else int(e) for e, w in zip(earlier, where_arr, strict=True)]


def write_jsonl(frame: pd.DataFrame, path: Path, append: bool = False) -> None:
    """Write the normalised columns (no provenance) as JSONL, one record per line, stable order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [c for c in frame.columns if not c.startswith("_")]
    with path.open("a" if append else "w", encoding="utf-8") as fh:
        for record in frame[columns].to_dict(orient="records"):
            clean = {k: v for k, v in record.items() if v is not None}
            fh.write(json.dumps(clean, ensure_ascii=False, sort_keys=True) + "\n")
