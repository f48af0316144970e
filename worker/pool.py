"""The shared model pool directory: list, read, and atomic writes of models and their descriptions.

Several workers, possibly on other hosts, share one directory. Writers never expose a partial file:
they write a hidden temp file, validate it, fsync and rename. Every read checks the file's identity
(inode, size, mtime), so a worker never serves a model that was replaced or deleted before the call
that changed it returned. Mutations take an flock so concurrent describe/upload/delete calls from any
worker serialize on the same directory.

With repository polling on (worker/watch.py), a changed file is served only once a ledger entry
(`.validated/NAME`) vouches for its exact identity; until then the previous session keeps answering.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import difflib
import fcntl
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Iterator

from broker import jsonbody
from broker.errors import BadInput, ModelNotFound, ModelNotReady, ModelUnloaded, PayloadTooLarge
from broker.protocol import check_model_name

from .sessions import LoadedModel, SessionCache, SessionFactory, file_key
from .watch import Watch

log = logging.getLogger(__name__)

SIDECAR = ".json"      # iris.onnx -> iris.onnx.json, holding {"description": ...}
LOCK_FILE = ".fractal.lock"
UNLOADED_DIR = ".unloaded"  # an empty file per unloaded model: every worker sees it with one stat
LEDGER_DIR = ".validated"   # per model, the identity of the file version last validated (poll mode)


class ModelPool:
    def __init__(self, directory: str | os.PathLike, factory: SessionFactory, cache: SessionCache,
                 max_model_bytes: int, max_image_pixels: int = 25_000_000, poll: bool = False):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._prefix = os.path.join(str(self.directory), "")
        self._unloaded_prefix = os.path.join(str(self.directory), UNLOADED_DIR, "")
        self._factory = factory
        self._cache = cache
        self.max_model_bytes = max_model_bytes
        self.max_image_pixels = max_image_pixels
        self._sidecars: dict[str, tuple[tuple, dict]] = {}  # name -> (file key, parsed JSON)
        self._ledger_prefix = os.path.join(str(self.directory), LEDGER_DIR, "")
        self._watch = Watch(str(self.directory), factory, cache, self._vouched, self._vouch,
                            lambda name: os.path.exists(self._marker(name))) if poll else None

    # -- reads ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.directory)
                      if e.name.endswith(".onnx") and not e.name.startswith(".") and e.is_file())

    def load(self, name: str) -> LoadedModel:
        """The current session for `name`, (re)loading when the file changed; raises ModelNotFound."""
        # NOTE: on every predict: plain strings, not pathlib (whose joins cost more than the two
        # syscalls), and os.access, which answers "no marker" without raising an exception.
        check_model_name(name)
        path = self._prefix + name
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._cache.drop(name)
            raise self._not_found(name) from None
        if os.access(self._unloaded_prefix + name, os.F_OK):
            self._drop_unloaded(name)
            raise ModelUnloaded(f"model {name} is unloaded; load it (POST /v2/repository/models/{name}/load)")
        key = file_key(st)
        cached = self._cache.get(name, key)
        if cached is not None:
            return cached
        if self._watch is not None and not self._vouched(name, key):
            return self._previous(name, key)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())  # NOTE: key and bytes come from the same open file
                data = f.read()
        except FileNotFoundError:
            raise self._not_found(name) from None
        if self._watch is not None and file_key(st) != key and not self._vouched(name, file_key(st)):
            return self._previous(name, file_key(st))  # NOTE: it changed again between stat and open
        model = self._factory.build(name, data, st)
        self._cache.put(model)
        return model

    def _previous(self, name: str, key: tuple) -> LoadedModel:
        """Poll mode, file not vouched for: the session of the version before it, else ModelNotReady."""
        previous = self._cache.peek(name)
        if previous is not None:
            return previous
        raise ModelNotReady(f"model {name} is not ready: {self._watch.state(name, key)[1]} (repository "
                            f"polling validates a file before serving it)")

    def scan(self) -> None:
        """Poll mode: notice and validate files changed by other means (a no-op in explicit mode)."""
        if self._watch is not None:
            self._watch.scan()

    def sidecar(self, name: str) -> dict:
        """The model's sidecar JSON ({"description", "image", "dynamic_batching"}), {} when absent.

        Parsed once per version of the file: a call costs one stat, and a rename by any worker
        (every write is one) is seen at once.
        """
        path = self._path(name + SIDECAR)
        try:
            key = file_key(os.stat(path))
        except FileNotFoundError:
            self._sidecars.pop(name, None)
            return {}
        cached = self._sidecars.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            with open(path, "rb") as f:
                data = jsonbody.loads(f.read(), f"sidecar {name}{SIDECAR}")
            data = data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (BadInput, OSError) as exc:
            log.warning("unreadable sidecar for %s, ignored: %s", name, exc)
            data = {}  # NOTE: cached too, so a broken version is logged once, not on every call
        self._sidecars[name] = (key, data)
        return data

    def description(self, name: str) -> str:
        return str(self.sidecar(name).get("description", ""))

    def info(self, name: str) -> dict:
        model = self.load(name)
        return {
            "model": name,
            "description": self.description(name),
            "inputs": [i.describe() for i in model.inputs],
            "outputs": [o.describe() for o in model.outputs],
            "size_bytes": model.size_bytes,
            "last_modified": dt.datetime.fromtimestamp(model.mtime, dt.timezone.utc)
                               .isoformat(timespec="seconds").replace("+00:00", "Z"),
        }

    def statistics(self) -> dict[str, dict]:
        """Inference statistics of every model this worker ran since it started (worker/stats.py)."""
        return self._cache.stats.snapshot()

    def resident(self) -> list[str]:
        return self._cache.names()

    def states(self) -> list[dict]:
        """The repository index: every model with READY or UNAVAILABLE and why (docs/protocol.md)."""
        found = []
        for n in self.names():
            state, reason = "READY", ""
            if os.path.exists(self._marker(n)):
                state, reason = "UNAVAILABLE", "unloaded"
            elif self._watch is not None:
                try:
                    state, reason = self._watch.state(n, file_key(os.stat(self._prefix + n)))
                except FileNotFoundError:
                    continue
            found.append({"name": n, "version": "1", "state": state, "reason": reason})
        return found

    def evict_unloaded(self) -> None:
        """Drop sessions of models another worker unloaded (called on the worker's heartbeat tick)."""
        for name in self._cache.names():
            if os.path.exists(self._marker(name)):
                self._drop_unloaded(name)

    def _drop_unloaded(self, name: str) -> None:
        if self._cache.drop(name):
            log.info("dropped unloaded model %s from the session cache", name)

    # -- writes --------------------------------------------------------------------------------

    def describe(self, name: str, description: str) -> None:
        with self._locked():
            if not self._path(name).is_file():
                raise self._not_found(name)
            self._write_sidecar(name, description)

    def upload(self, name: str, data: bytes, description: str | None = None) -> None:
        """Validate `data` in ONNX Runtime, then make it `name` atomically (replacing any old one)."""
        check_model_name(name)
        if len(data) > self.max_model_bytes:
            raise PayloadTooLarge(f"model is {len(data)} bytes; the limit is {self.max_model_bytes}")
        tmp = self._write_temp(name, data)
        try:
            st = os.stat(tmp)
            model = self._factory.build(name, data, st)  # raises BadInput: pool unchanged
            with self._locked():
                # NOTE: vouched before the rename (which keeps the key): no worker polling the pool
                # ever sees this file unvouched and keeps serving the old one after we return.
                self._write_ledger(name, file_key(st))
                os.replace(tmp, self._path(name))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._marker(name))  # a new upload is served
                if description is not None:
                    self._write_sidecar(name, description)
                self._sync_dir()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._cache.put(model)  # same inode as the renamed file: the first predict needs no reload
        log.info("stored model %s (%d bytes)", name, len(data))

    def unload(self, name: str) -> None:
        """Stop serving `name` on every worker (the file stays); this worker drops its session now."""
        with self._locked():
            if not self._path(name).is_file():
                raise self._not_found(name)
            marker = self._marker(name)
            marker.parent.mkdir(exist_ok=True)
            marker.touch()
        log.info("unloaded model %s", name)
        self._drop_unloaded(name)

    def load_model(self, name: str) -> LoadedModel:
        """Serve `name` again and warm its session on this worker."""
        with self._locked():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._marker(name))
        return self.load(name)

    def delete(self, name: str) -> None:
        with self._locked():
            try:
                os.unlink(self._path(name))
            except FileNotFoundError:
                raise self._not_found(name) from None
            for path in (self._path(name + SIDECAR), self._marker(name), self._ledger_prefix + name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            self._sync_dir()
        self._cache.drop(name)
        self._cache.stats.forget(name)  # NOTE: names come from users: a deleted one leaves no trace
        log.info("deleted model %s", name)

    # -- helpers -------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        check_model_name(name if not name.endswith(SIDECAR) else name[: -len(SIDECAR)])
        return self.directory / name

    def _not_found(self, name: str) -> ModelNotFound:
        """The 404 for `name`: where the list is, and the closest name when one is close."""
        close = difflib.get_close_matches(name, self.names(), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        return ModelNotFound(f"model {name} not found; {hint}the models are listed by GET /api/v1/models "
                             f"and `fractal models`")

    def _marker(self, name: str) -> Path:
        return self.directory / UNLOADED_DIR / name

    def _vouched(self, name: str, key: tuple) -> bool:
        """True when the ledger says this exact file version was validated (by an upload or a poll)."""
        try:
            with open(self._ledger_prefix + name, "rb") as f:
                return f.read() == _key_text(key)
        except FileNotFoundError:
            return False

    def _vouch(self, name: str, key: tuple) -> None:
        with self._locked():
            self._write_ledger(name, key)

    def _write_ledger(self, name: str, key: tuple) -> None:
        os.makedirs(self._ledger_prefix, exist_ok=True)
        tmp = f"{self._ledger_prefix}.{name}.{secrets.token_hex(6)}.tmp"
        with open(tmp, "xb") as f:
            f.write(_key_text(key))
        os.replace(tmp, self._ledger_prefix + name)

    def _write_temp(self, name: str, data: bytes) -> Path:
        tmp = self.directory / f".{name}.{secrets.token_hex(6)}.tmp"
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _write_sidecar(self, name: str, description: str) -> None:
        payload = json.dumps({**self.sidecar(name), "description": description},
                             ensure_ascii=False).encode("utf-8")
        tmp = self._write_temp(name + SIDECAR, payload)
        os.replace(tmp, self._path(name + SIDECAR))

    def _sync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.directory / LOCK_FILE, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _key_text(key: tuple) -> bytes:
    return " ".join(map(str, key)).encode()
