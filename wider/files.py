"""Writing files so that a crash or Ctrl-C never leaves a half-written one under the real name: write a temporary
file beside it, fsync, then os.replace (atomic on POSIX file systems). Every writer of results, markers, configs,
datasets and checkpoints' small files goes through here (standard library only: data_prep uses it too)."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterable, Iterator


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


def read_jsonl(lines: Iterable[str], path: str, error: type = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a JSONL file, read from `lines` (an open text file,
    compressed or not). A line that is not a JSON object raises `error` naming the file and the line; the readers of
    datasets, classification files and evaluation tasks share this one rule."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{lineno}: invalid JSON ({e.msg}); the file is damaged or not JSONL (one JSON object "
                        "per line)") from None
        if not isinstance(obj, dict):
            raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__} (one object per line)")
        yield lineno, obj


def sha256_file(path: str) -> str:
    """The SHA-256 of a file's bytes, hex."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class RunDirLock:
    """An exclusive lock on a run directory, held by the one process that owns the run (rank 0) until it exits: a
    second run started on the same directory is refused instead of interleaving its checkpoints and metrics.

    An advisory fcntl.flock on RUN_DIR/.lock, which records who holds it (pid, host, start time). The kernel
    releases it when the holder dies, however it dies, so a crashed run never leaves a stale lock. (flock is local
    to one host on some network file systems: two hosts writing one run directory are not detected there.)"""

    NAME = ".lock"

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, self.NAME)
        self._fd = None

    def acquire(self) -> bool:
        """Take the lock (creating the directory); False if another process holds it."""
        import fcntl
        import socket
        import time

        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock; the file stays (its content is stale)
            self._fd = None

    @classmethod
    def holder(cls, run_dir: str):
        """Who holds the lock of run_dir ('pid N on HOST since TIME'), or None when nobody does."""
        import fcntl

        path = os.path.join(run_dir, cls.NAME)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                info = {}
            return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('since', '?')}"
        finally:
            os.close(fd)
        return None
