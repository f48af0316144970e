"""Repository polling (poll mode): notice files changed by other means, validate them, then serve them.

Triton's --model-control-mode=poll is the model. Every `poll_s` the worker's main loop calls `scan()`.
A file version (its key: device, inode, size, mtime_ns) is served only once it is *vouched for*:
either it kept the same key over two scans and loaded in ONNX Runtime, or the API wrote it (an upload
validates before its rename). A vouched key is recorded in the pool's ledger (`.validated/NAME`), so
every worker sharing the pool may serve that exact file at once; a half-copied file never has a
vouched key. Until a new version is vouched for, the previous session keeps answering, although the
file under it changed; a version that fails to load is logged once and reported in `state()`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

from broker.errors import BadInput

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
                 vouched: Callable[[str, tuple], bool], vouch: Callable[[str, tuple], None],
                 unloaded: Callable[[str], bool]):
        self._prefix = os.path.join(directory, "")
        self._factory = factory
        self._cache = cache
        self._vouched = vouched
        self._vouch = vouch
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
        for name, key in present.items():
            model = self._cache.peek(name)
            if model is not None and model.key == key:
                self.pending.pop(name, None)
            elif not self._unloaded(name):
                self._consider(name, key)

    def _consider(self, name: str, key: tuple) -> None:
        if self._vouched(name, key):
            self.pending.pop(name, None)  # NOTE: not loaded here: a request loads it, as in explicit mode,
            return                        # so a scan never fights the cache's LRU
        seen = self.pending.get(name)
        if seen is None or seen.key != key:
            self.pending[name] = Pending(key)  # first sight of this version: stable if the next scan agrees
            return
        if seen.failed:
            return  # this version failed already (and was logged): wait for the next one
        try:
            model = self.validate(name, key)
        except BadInput as exc:
            self.pending[name] = Pending(key, str(exc))
            log.warning("poll: new file for %s not served (the previous version, if any, still is): %s",
                        name, exc)
            return
        if model is None:  # changed while we opened it
            self.pending[name] = Pending(key)
            return
        self._cache.offer(model)  # NOTE: a request loads it when it does not fit: a scan never evicts
        self.pending.pop(name, None)
        log.info("poll: serving the new file for %s (%d bytes)", name, model.size_bytes)

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
        self._vouch(name, key)
        return model

    def state(self, name: str, key: tuple) -> tuple[str, str]:
        """(state, reason) of a model whose file has `key` and is not unloaded (docs/protocol.md)."""
        model = self._cache.peek(name)
        if (model is not None and model.key == key) or self._vouched(name, key):
            return "READY", ""
        seen = self.pending.get(name)
        what = (f"the new file failed to load: {seen.failed}" if seen is not None and seen.key == key
                and seen.failed else "the new file is not yet stable")
        if model is not None:
            return "READY", f"serving the previous version; {what}"
        return "UNAVAILABLE", what

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
