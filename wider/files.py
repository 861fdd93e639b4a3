"""Writing files so that a crash or Ctrl-C never leaves a half-written one under the real name: write a temporary
file beside it, fsync, then os.replace (atomic on POSIX file systems)."""

from __future__ import annotations

import json
import os


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically (creating its directory)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
