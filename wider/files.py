"""Writing files so that a crash or Ctrl-C never leaves a half-written one under the real name: write a temporary
file beside it, fsync, then os.replace (atomic on POSIX file systems). Every writer of results, markers, configs,
datasets and checkpoints' small files goes through here (standard library only: data_prep uses it too)."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path beside `path` (in its directory, which is created) for the caller to write; when the block
    ends normally it is fsynced and moved onto `path`, when it raises it is deleted and `path` is left as it was."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically (creating its directory)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_write_jsonl(path: str, records: list) -> None:
    """One JSON object per line (UTF-8 kept as is), atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def sha256_file(path: str) -> str:
    """The SHA-256 of a file's bytes, hex."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
