"""Load preference, SFT and prompt data from files into one normalised schema.

Accepted files: ``.jsonl``, ``.json`` (a list of records, or ``{"data": [...]}``), ``.parquet``,
``.csv``, or a directory of them (read in sorted order). Accepted record formats, detected per
record:

- explicit prompt (TRL's preference format): ``{"prompt", "chosen", "rejected"}``;
- implicit prompt (Anthropic HH-RLHF): ``{"chosen", "rejected"}`` that both hold the whole
  dialogue, ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; the prompt is the shared dialogue up to the
  last ``Assistant:`` turn;
- conversational: ``prompt`` (optional), ``chosen`` and ``rejected`` as lists of
  ``{"role", "content"}``; with no ``prompt`` the shared leading messages are the prompt;
- SFT: ``{"prompt", "completion"}`` (strings or message lists) or ``{"messages": [...]}``;
- prompts: ``{"prompt"}``.

Normalised columns: ``prompt``, ``chosen``, ``rejected`` (preferences) or ``prompt``,
``completion`` (sft) or ``prompt`` (prompts), plus optional ``id``, ``annotator``, ``margin``.
A multi-turn prompt is rendered as a transcript
(``Human: ...\\n\\nAssistant: ...\\n\\nHuman: ...``); a single user turn is its text.

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

from rlhf_tasks.errors import ConfigError

TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    "preferences": ("prompt", "chosen", "rejected"),
    "sft": ("prompt", "completion"),
    "prompts": ("prompt",),
}
OPTIONAL_COLUMNS = ("id", "annotator", "margin")
PROVENANCE_COLUMNS = ("_file", "_line", "_format", "_missing", "_parse_error")
# Rows per chunk when a data set is read as a stream (``iter_chunks``).
DEFAULT_CHUNK_ROWS = 20_000
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")

HH_ASSISTANT = "\n\nAssistant:"
_SURROGATES = re.compile("[\ud800-\udfff]")
# U+FFFD stands in for bytes that were not valid UTF-8 (see _clean_text); the gate reports it.
REPLACEMENT_CHAR = "\ufffd"
BOM = "\ufeff"  # a UTF-8 byte-order mark that some editors and spreadsheets put first


@dataclass
class Dataset:
    kind: str  # preferences | sft | prompts
    frame: pd.DataFrame
    files: list[Path]

    @property
    def text_columns(self) -> tuple[str, ...]:
        return TEXT_COLUMNS[self.kind]


def list_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand directories into their data files; raise ConfigError for a missing path."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
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


def _read_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Yield (line, record, parse_error) for each record of one file, reading it as a stream
    (JSON documents excepted); a file that is not text, or holds no record, is one error."""
    if path.suffix.lower() != ".parquet":
        with path.open("rb") as fh:
            problem = _text_problem(fh.read(4096))
        if problem:
            yield 1, None, problem
            return
    empty = True
    for item in _READERS[path.suffix.lower()](path):
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


def _render_messages(messages: list[dict[str, Any]]) -> str:
    """A single user turn is its text; several turns become an HH-style transcript."""
    if len(messages) == 1 and messages[0].get("role") == "user":
        return messages[0].get("content")
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(
        f"{names.get(m.get('role'), str(m.get('role')).title())}: {m.get('content')}"
        for m in messages
    )


def _check_messages(value: Any, key: str) -> list[dict[str, Any]]:
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise ValueError(f"{key!r} is a list but not of {{role, content}} messages")
    return value


def _final_assistant(messages: list[dict[str, Any]], key: str) -> Any:
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"{key!r} must end with an assistant message")
    return messages[-1].get("content")


def _split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split HH-RLHF dialogues into (prompt, chosen reply, rejected reply)."""
    # The prompt is the longest shared prefix that ends with "\n\nAssistant:".
    shared = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        shared += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, shared + 1)
    if cut < 0 or (not chosen.startswith("\n\nHuman:") and not chosen.startswith("Human:")):
        raise ValueError("no shared '\\n\\nHuman: ... \\n\\nAssistant:' prompt in chosen/rejected")
    end = cut + len(HH_ASSISTANT)
    prompt = chosen[:end].strip()
    prompt = prompt.removesuffix("Assistant:").rstrip()
    prompt = prompt.removeprefix("Human:").strip() if prompt.count("Human:") == 1 else prompt
    return prompt, chosen[end:].strip(), rejected[end:].strip()


def _margin(value: Any) -> Any:
    """A margin is a number; CSV cells are text, so "2.0" is 2.0 and an empty cell no margin."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"'margin' must be a number, got {value!r}") from None


def normalise_record(record: dict[str, Any], kind: str) -> tuple[dict[str, Any], str]:
    """Return (normalised fields, format name); raise ValueError if the record has no known form."""
    if "margin" in record:
        record = {**record, "margin": _margin(record["margin"])}
    out = {k: record[k] for k in OPTIONAL_COLUMNS if k in record and record[k] is not None}
    found = detect_kind(record)
    if kind != "prompts" and found not in (kind, "prompts"):
        keys = ", ".join(sorted(record)[:6])
        raise ValueError(f"a record of {found} data (keys: {keys}) in a data set of {kind}")
    if kind == "preferences":
        chosen, rejected = record.get("chosen"), record.get("rejected")
        if isinstance(chosen, list) or isinstance(rejected, list):
            chosen = _check_messages(chosen or [], "chosen")
            rejected = _check_messages(rejected or [], "rejected")
            prompt = record.get("prompt")
            if prompt is None:
                shared = 0
                while (
                    shared < min(len(chosen), len(rejected)) - 1
                    and chosen[shared] == rejected[shared]
                ):
                    shared += 1
                prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
            if isinstance(prompt, list):
                prompt = _render_messages(_check_messages(prompt, "prompt"))
            out |= {
                "prompt": prompt,
                "chosen": _final_assistant(chosen, "chosen"),
                "rejected": _final_assistant(rejected, "rejected"),
            }
            return out, "conversational"
        implicit = "prompt" not in record and isinstance(rejected, str)
        if implicit and isinstance(chosen, str) and HH_ASSISTANT in chosen:
            prompt, chosen, rejected = _split_hh(chosen, rejected)
            return out | {"prompt": prompt, "chosen": chosen, "rejected": rejected}, "implicit"
        for key in TEXT_COLUMNS[kind]:
            if key in record:
                out[key] = record[key]
        return out, "explicit"
    if kind == "sft":
        if isinstance(record.get("messages"), list):
            messages = _check_messages(record["messages"], "messages")
            out["prompt"] = _render_messages(messages[:-1]) if len(messages) > 1 else None
            out["completion"] = _final_assistant(messages, "messages")
            return out, "conversational"
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, list):
            prompt = _render_messages(_check_messages(prompt, "prompt"))
        if isinstance(completion, list):
            completion = _final_assistant(_check_messages(completion, "completion"), "completion")
        for key, value in (("prompt", prompt), ("completion", completion)):
            if key in record:
                out[key] = value
        return out, "prompt_completion"
    if isinstance(record.get("prompt"), list):
        record = {**record, "prompt": _render_messages(_check_messages(record["prompt"], "prompt"))}
    if "prompt" in record:
        out["prompt"] = record["prompt"]
    return out, "prompt_only"


def detect_kind(record: dict[str, Any]) -> str:
    if "chosen" in record or "rejected" in record:
        return "preferences"
    if "completion" in record or "messages" in record:
        return "sft"
    return "prompts"


def _row(path: Path, line: int, record: dict[str, Any] | None, error: str | None, kind: str):
    """One row of the normalised frame: the record's fields and its provenance."""
    row: dict[str, Any] = {"_file": str(path), "_line": line, "_format": None, "_missing": None}
    if record is not None:
        try:
            fields, fmt = normalise_record(record, kind)
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
    paths: Sequence[str | Path], kind: str | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Iterator[Dataset]:
    """The data set as consecutive chunks of at most ``chunk_rows`` rows each (at least one
    chunk, possibly empty), reading the files as streams: memory is bounded by the chunk size,
    not the size of the files. ``kind=None`` detects it from the first good record.

    Every chunk has all text columns of its kind (None where a record lacks the key, which
    ``_missing`` names) and the optional columns that its records have.
    """
    files = list_files(paths)
    if kind is not None and kind not in TEXT_COLUMNS:
        raise ConfigError(f"unknown data kind {kind!r}; expected one of {', '.join(TEXT_COLUMNS)}")
    pending: list[tuple[Path, int, dict[str, Any] | None, str | None]] = []
    done = False

    def chunk() -> Dataset:
        nonlocal kind
        kind = kind or "preferences"
        rows = [_row(*item, kind) for item in pending]
        pending.clear()
        return Dataset(kind=kind, frame=_frame(rows, kind), files=files)

    for path in files:
        for line, record, error in _read_records(path):
            pending.append((path, line, record, error))
            if kind is None and record is not None:
                kind = detect_kind(record)
            if len(pending) >= chunk_rows:
                yield chunk()
                done = True
    if pending or not done:
        yield chunk()


def load(paths: Sequence[str | Path], kind: str | None = None) -> Dataset:
    """Load files into one normalised Dataset (all rows in memory; see ``iter_chunks``)."""
    (dataset,) = iter_chunks(paths, kind, chunk_rows=sys.maxsize)
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
