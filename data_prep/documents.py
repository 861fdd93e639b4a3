"""Input documents for tokenizer training and preprocessing: one reader that both scripts share.

Supported inputs (directories expand to the supported files inside them, sorted):
- text: `.txt`, `.txt.gz`, `.txt.xz`; --text-mode file (the whole file is one document), line (each non-empty
  line), paragraph (blank-line separated blocks);
- JSONL: `.jsonl`, `.json`, `.jsonl.gz`, `.jsonl.xz`, one JSON object per line, the text under --json-key;
- parquet: `.parquet`, the text in column --json-key, read in record batches.
"""

from __future__ import annotations

import gzip
import lzma
import os
from typing import Iterator

from wider.files import read_jsonl

TEXT_EXT = (".txt", ".txt.gz", ".txt.xz")
JSONL_EXT = (".jsonl", ".json", ".jsonl.gz", ".jsonl.xz", ".json.gz", ".json.xz")
PARQUET_EXT = (".parquet",)
SUPPORTED = TEXT_EXT + JSONL_EXT + PARQUET_EXT
TEXT_MODES = ("file", "line", "paragraph")


class DataPrepError(ValueError):
    """Bad input for data preparation; the message names the file and the fix."""


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def expand_inputs(paths: list[str]) -> list[str]:
    """Files to read, in order; errors for missing paths, unsupported extensions and empty directories."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs if f.endswith(SUPPORTED))
            if not found:
                raise DataPrepError(f"input directory {p!r} holds no supported file ({', '.join(SUPPORTED)})")
            out.extend(found)
        elif not os.path.exists(p):
            raise DataPrepError(f"input {p!r} does not exist; check the path")
        elif not p.endswith(SUPPORTED):
            raise DataPrepError(f"input {p!r} has an unsupported extension; use one of {', '.join(SUPPORTED)}")
        else:
            out.append(p)
    if not out:
        raise DataPrepError("no input files given; pass --input PATH [PATH ...]")
    return out


def _iter_jsonl(path: str, key: str) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, obj in read_jsonl(f, path, DataPrepError):
            if key not in obj:
                raise DataPrepError(f"{path}:{lineno}: no key {key!r} (the line has {sorted(obj)}); choose the text "
                                    "field with --json-key")
            text = obj[key]
            if not isinstance(text, str):
                raise DataPrepError(f"{path}:{lineno}: {key!r} holds {type(text).__name__}, not text")
            yield text


def _iter_parquet(path: str, key: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    columns = pf.schema_arrow.names
    if key not in columns:
        raise DataPrepError(f"{path}: no column {key!r} (columns: {columns}); choose it with --json-key")
    for batch in pf.iter_batches(columns=[key], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def _iter_text(path: str, mode: str) -> Iterator[str]:
    with _open_text(path) as f:
        if mode == "file":
            yield f.read()
        elif mode == "line":
            for line in f:
                if line.strip():
                    yield line.rstrip("\n")
        else:
            block: list[str] = []
            for line in f:
                if line.strip():
                    block.append(line.rstrip("\n"))
                elif block:
                    yield "\n".join(block)
                    block = []
            if block:
                yield "\n".join(block)


def iter_documents(paths: list[str], json_key: str = "text", text_mode: str = "file") -> Iterator[str]:
    """Every document of every input, in order."""
    if text_mode not in TEXT_MODES:
        raise DataPrepError(f"--text-mode {text_mode!r} is invalid; use one of {', '.join(TEXT_MODES)}")
    for path in expand_inputs(paths):
        if path.endswith(JSONL_EXT):
            yield from _iter_jsonl(path, json_key)
        elif path.endswith(PARQUET_EXT):
            yield from _iter_parquet(path, json_key)
        else:
            yield from _iter_text(path, text_mode)
