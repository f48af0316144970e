"""Repository polling (poll mode): notice files changed by other means, validate them, then serve them.

Triton's --model-control-mode=poll is the model. Every `poll_s` the worker's main loop calls `scan()`.
A file version (its key: device, inode, size, mtime_ns) is served only once it is *vouched for*:
either it kept the same key over two scans and loaded in ONNX Runtime, or the API wrote it (an upload
validates before its rename). The outcome is recorded in the pool's ledger (worker/ledger.py):
a vouched key in `.validated/NAME`, so every worker sharing the pool may serve that exact file at
once (a half-copied file never has a vouched key); a version that failed to load in `.failed/NAME`,
so no other worker loads it again. Until a new version is vouched for, the previous session keeps
answering, although the file under it changed; a version that fails to load is logged once per
worker and reported in `state()`, which reads the ledger only, so every worker reports the same.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

from broker.errors import BadInput

from .ledger import Ledger
from .sessions import LoadedModel, SessionCache, SessionFactory, file_key
from .versions import SUFFIX, on_disk, path_of

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """What the poller knows of a file version that is not being served."""
    key: tuple
    failed: str = ""   # why it did not load; "" while it is merely waiting to be stable


class Watch:
    """Per-worker poll-mode state: the file versions seen but not (yet) served, by model name."""

    def __init__(self, directory: str, factory: SessionFactory, cache: SessionCache,
                 ledger: Ledger, unloaded: Callable[[str], bool]):
        self._prefix = os.path.join(directory, "")
        self._factory = factory
        self._cache = cache
        self._ledger = ledger
        self._unloaded = unloaded
        self.pending: dict[str, Pending] = {}

    def scan(self) -> None:
        """One poll: drop sessions of removed files, validate files that stayed the same since the last."""
        present = self._files()
        for name in self._cache.names():
            if name not in present:
                self._cache.drop(name)
                log.info("poll: %s was removed from the pool; no longer served", name)
        for name in list(self.pending):
            if name not in present:
                del self.pending[name]
        for name in self._ledger.entries():
            if name not in present:  # NOTE: removed by other means: its previous version is served no more
                self._ledger.forget(name, path_of(self._prefix, name))
        for name, key in present.items():
            model = self._cache.peek(name)
            if model is not None and model.key == key:
                self.pending.pop(name, None)
            elif not self._unloaded(name):
                self._consider(name, key)

    def _consider(self, name: str, key: tuple) -> None:
        if self._ledger.vouched(name, key):
            self.pending.pop(name, None)  # NOTE: not loaded here: a request loads it, as in explicit mode,
            return                        # so a scan never fights the cache's LRU
        seen = self.pending.get(name)
        if seen is not None and seen.key == key and seen.failed:
            return  # this version failed already (and was logged): wait for the next one
        failed = self._ledger.failure(name, key)
        if failed is not None:  # another worker judged it: no second load of a file that cannot load
            self._failed(name, key, failed)
            return
        if seen is None or seen.key != key:
            self.pending[name] = Pending(key)  # first sight of this version: stable if the next scan agrees
            return
        try:
            model = self.validate(name, key)
        except BadInput as exc:
            self._ledger.record_failure(name, key, str(exc))
            self._failed(name, key, str(exc))
            return
        if model is None:  # changed while we opened it
            self.pending[name] = Pending(key)
            return
        self._cache.offer(model)  # NOTE: a request loads it when it does not fit: a scan never evicts
        self.pending.pop(name, None)
        log.info("poll: serving the new file for %s (%d bytes)", name, model.size_bytes)

    def _failed(self, name: str, key: tuple, why: str) -> None:
        self.pending[name] = Pending(key, why)
        log.warning("poll: new file for %s not served (the previous version, if any, still is): %s", name, why)

    def validate(self, name: str, key: tuple) -> LoadedModel | None:
        """Load the file if it still has `key` and vouch for it; None when it changed; raises BadInput."""
        try:
            with open(path_of(self._prefix, name), "rb") as f:
                st = os.fstat(f.fileno())
                if file_key(st) != key:
                    return None
                data = f.read()
        except FileNotFoundError:
            return None
        model = self._factory.build(name, data, st)
        self._ledger.vouch(name, key)
        return model

    def state(self, name: str, key: tuple) -> tuple[str, str]:
        """(state, reason) of a model whose file has `key` and is not unloaded (docs/protocol.md,
        Repository index): from the ledger alone, so the same on every worker, holder or not."""
        if self._ledger.vouched(name, key):
            return "READY", ""
        if self._ledger.validated_before(name):
            return "READY", f"serving the previous version; {self.why(name, key)}"
        return "UNAVAILABLE", self.why(name, key)

    def why(self, name: str, key: tuple) -> str:
        """Why the file version with `key` is not served (yet)."""
        failed = self._ledger.failure(name, key)
        return f"the new file failed to load: {failed}" if failed is not None else "the new file is not yet stable"

    def _files(self) -> dict[str, tuple]:
        """{entry: file key} of every version of every model in the pool (worker/versions.py)."""
        found = {}
        with os.scandir(self._prefix) as items:
            for e in items:
                if e.name.startswith("."):
                    continue
                try:
                    if e.name.endswith(SUFFIX) and e.is_file():
                        found[e.name] = file_key(e.stat())
                    elif e.is_dir():
                        for entry in on_disk(self._prefix, e.name + SUFFIX).values():
                            found[entry] = file_key(os.stat(path_of(self._prefix, entry)))
                except FileNotFoundError:
                    pass
        return found
