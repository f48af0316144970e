"""The pool's shared validation ledger: which file versions were judged, and how, by any worker.

Poll mode (worker/watch.py) serves a file version only once it is vouched for, and the repository
index reports why a version is not served. Both answers must be the same whichever worker gives
them: with the broker's placement a worker never loads the models others hold, so what it has
validated or loaded itself says nothing about what the pool serves. The first worker that judges a
file version (keyed by its identity: device, inode, size, mtime_ns) records the outcome in the pool
directory, beside the `.unloaded` markers, with an atomic rename:

    .validated/ENTRY   the key of the version last vouched for (by an upload or a poll)
    .failed/ENTRY      the key of a version that failed to load, a newline, and why

Every other worker reads the record instead of loading the file again. A record whose key is not
the file's present key is about an older version: a `.validated` one says that the previous
version was served (its sessions keep answering until the new one is vouched for).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import Callable, ContextManager

VALIDATED_DIR = ".validated"
FAILED_DIR = ".failed"


def key_text(key: tuple) -> bytes:
    return " ".join(map(str, key)).encode()


class Ledger:
    """Reads and atomic writes of the two record directories of one pool directory."""

    def __init__(self, directory: str, locked: Callable[[], ContextManager[None]]):
        self._validated = os.path.join(directory, VALIDATED_DIR, "")
        self._failed = os.path.join(directory, FAILED_DIR, "")
        self._locked = locked  # the pool's flock: writes of records serialize with uploads and deletes

    def vouched(self, entry: str, key: tuple) -> bool:
        """True when this exact file version was validated (by an upload or a poll)."""
        return self._read(self._validated + entry) == key_text(key)

    def validated_before(self, entry: str) -> bool:
        """True when some version of `entry` was vouched for and its file has not gone since."""
        return os.access(self._validated + entry, os.F_OK)

    def failure(self, entry: str, key: tuple) -> str | None:
        """Why this exact file version failed to load, when some worker found it did; else None."""
        text = self._read(self._failed + entry)
        if text is None:
            return None
        head, _, why = text.partition(b"\n")
        return why.decode("utf-8", "replace") if head == key_text(key) else None

    def vouch(self, entry: str, key: tuple) -> None:
        with self._locked():
            self.write_vouched(entry, key)

    def write_vouched(self, entry: str, key: tuple) -> None:
        """Record `key` as vouched for; the caller holds the pool's lock."""
        self._write(self._validated, entry, key_text(key))

    def record_failure(self, entry: str, key: tuple, why: str) -> None:
        self._write(self._failed, entry, key_text(key) + b"\n" + why.encode("utf-8", "replace"))

    def entries(self) -> list[str]:
        """The entries with a `.validated` record."""
        try:
            return [n for n in os.listdir(self._validated) if not n.startswith(".")]
        except FileNotFoundError:
            return []

    def forget(self, entry: str, path: str) -> None:
        """Remove `entry`'s records when its file `path` is still absent under the pool's lock (a file
        removed by other means may be copied in again, and vouched for, before a slower worker notices)."""
        with self._locked():
            if not os.access(path, os.F_OK):
                self.drop(entry)

    def drop(self, entry: str) -> None:
        """Remove `entry`'s records; the caller holds the pool's lock."""
        for path in (self._validated + entry, self._failed + entry):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    @staticmethod
    def _read(path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    @staticmethod
    def _write(directory: str, entry: str, data: bytes) -> None:
        os.makedirs(directory, exist_ok=True)
        tmp = f"{directory}.{entry}.{secrets.token_hex(6)}.tmp"
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, directory + entry)
