"""The shared model pool directory: list, read, and atomic writes of models and their descriptions.

Several workers, possibly on other hosts, share one directory. Writers never expose a partial file:
they write a hidden temp file, validate it, fsync and rename. Every read checks the file's identity
(inode, size, mtime), so a worker never serves a model that was replaced or deleted before the call
that changed it returned. Mutations take an flock so concurrent describe/upload/delete calls from any
worker serialize on the same directory.

With repository polling on (worker/watch.py), a changed file is served only once a ledger entry
(`.validated/NAME`, worker/ledger.py) vouches for its exact identity; until then the previous session
keeps answering. The repository index is read from the ledger and the markers, never from this
worker's sessions, so every worker gives the same answer (docs/protocol.md, Repository index).
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
from typing import Any, Iterator

from broker import jsonbody
from broker.errors import BadInput, FractalError, ModelNotFound, ModelNotReady, ModelUnloaded, PayloadTooLarge
from broker.protocol import check_model_name

from .ledger import Ledger
from .pinning import Replicas, replicas_of, warm
from .sessions import LoadedModel, SessionCache, SessionFactory, file_key
from .versions import on_disk, parse_version, path_of, served, split
from .watch import Watch

log = logging.getLogger(__name__)

SIDECAR = ".json"      # iris.onnx -> iris.onnx.json, holding {"description": ...}
LOCK_FILE = ".fractal.lock"
UNLOADED_DIR = ".unloaded"  # an empty file per unloaded model: every worker sees it with one stat


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
        self._ledger = Ledger(str(self.directory), self._locked)
        self._pin_failures: dict[str, str] = {}  # name -> why pinning failed, logged once per reason
        self._replicas: dict[str, dict] = {}      # name -> its sidecar's replicas, as of the last pin()
        self._watch = Watch(self._prefix, factory, cache, self._ledger,
                            lambda name: os.path.exists(self._marker(name))) if poll else None

    # -- reads ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every model: flat NAME.onnx files and NAME/ directories holding versions (worker/versions.py)."""
        found = set()
        for e in os.scandir(self.directory):
            if e.name.startswith("."):
                continue
            if e.name.endswith(".onnx") and e.is_file():
                found.add(e.name)
            elif e.is_dir() and _plain(e.name + ".onnx") and on_disk(self._prefix, e.name + ".onnx"):
                found.add(e.name + ".onnx")
        return sorted(found)

    def versions(self, name: str) -> list[int]:
        """The versions of `name` its version_policy serves, oldest first ([] when there is none)."""
        check_model_name(name)
        return served(sorted(on_disk(self._prefix, name)), self.sidecar(name).get("version_policy"), name)

    def entry(self, name: Any, version: object = None) -> str:
        """The entry (worker/versions.py) a request for `name` and `version` (None: the newest the
        policy serves) means; raises ModelNotFound for a version the model does not serve."""
        check_model_name(name)
        v = parse_version(name, version)
        # NOTE: the common case, a flat file and no directory, costs one access() more than before
        # versions; access() answers "absent" without raising, which os.path.isdir would do inside.
        if v in (None, 1) and not os.access(self._prefix + name[:-5], os.F_OK):
            return name
        found = on_disk(self._prefix, name)
        if not found:
            raise self._not_found(name)
        allowed = served(sorted(found), self.sidecar(name).get("version_policy"), name)
        if v is None and allowed:
            v = allowed[-1]
        if v not in allowed:
            raise ModelNotFound(f"model {name} has no version {v if v is not None else ''} served; it serves "
                                f"{', '.join(map(str, allowed)) or 'none'} (its versions: "
                                f"{', '.join(map(str, sorted(found)))}; see version_policy)")
        return found[v]

    def load(self, name: Any, version: object = None, cold: bool = True) -> LoadedModel:
        """The session to run `name` (at `version`) with now, built again when its file changed.

        Every predict's call. It never changes whether a model is served: that is load_model() and
        unload(), the repository API's load and unload. Raises ModelNotFound, ModelUnloaded for a model
        unload() took out of service, and ModelTooLarge when the file alone exceeds the memory budget
        (nothing is loaded then). `cold`: a request waits for a load (counted in the cold-load metric)."""
        # NOTE: on every predict: plain strings, not pathlib (whose joins cost more than the two
        # syscalls), and os.access, which answers "no marker" without raising an exception.
        name = self.entry(name, version)
        path = self._prefix + name if "@" not in name else path_of(self._prefix, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._cache.drop(name)
            raise self._not_found(split(name)[0]) from None
        if os.access(self._unloaded_prefix + name, os.F_OK):
            self._drop_unloaded(name)
            base, v = split(name)
            raise ModelUnloaded(f"model {base}{f' version {v}' if v else ''} is unloaded; load it "
                                f"(POST /v2/repository/models/{base}/load)")
        key = file_key(st)
        cached = self._cache.get(name, key)
        if cached is not None:
            return cached
        if self._watch is not None and not self._ledger.vouched(name, key):
            return self._previous(name, key)
        self._cache.admit(name, st.st_size)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())  # NOTE: key and bytes come from the same open file
                data = f.read()
        except FileNotFoundError:
            raise self._not_found(split(name)[0]) from None
        if self._watch is not None and file_key(st) != key and not self._ledger.vouched(name, file_key(st)):
            return self._previous(name, file_key(st))  # NOTE: it changed again between stat and open
        try:
            model = self._factory.build(name, data, st)
        except BadInput as exc:  # NOTE: recorded for the index, which every worker reads alike
            self._ledger.record_failure(name, file_key(st), str(exc))
            raise
        del data  # NOTE: before the put, which may evict and trim: the file's bytes need not stay
        self._cache.put(model, cold)
        return model

    def _previous(self, name: str, key: tuple) -> LoadedModel:
        """Poll mode, file not vouched for: the session of the version before it, else ModelNotReady."""
        previous = self._cache.peek(name)
        if previous is not None:
            return previous
        why = self._watch.why(name, key) if self._watch is not None else "not vouched for"
        raise ModelNotReady(f"model {name} is not ready: {why} (repository "
                            f"polling validates a file before serving it)")

    def scan(self) -> None:
        """Poll mode: notice and validate files changed by other means (a no-op in explicit mode)."""
        if self._watch is not None:
            self._watch.scan()
            self.pin()

    def sidecar(self, name: str) -> dict:
        """The model's sidecar JSON ({"description", "image", "dynamic_batching"}), {} when absent.

        Parsed once per version of the file: a call costs one stat, and a rename by any worker
        (every write is one) is seen at once. `name` may be an entry: every version shares the sidecar.
        """
        name = split(name)[0]
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

    def info(self, name: str, version: object = None) -> dict:
        model = self.load(name, version)
        return {
            "model": name,
            "version": str(split(model.name)[1] or 1),
            "versions": [str(v) for v in self.versions(name)],
            "description": self.description(name),
            "inputs": [i.describe() for i in model.inputs],
            "outputs": [o.describe() for o in model.outputs],
            "size_bytes": model.size_bytes,
            "last_modified": dt.datetime.fromtimestamp(model.mtime, dt.timezone.utc)
                               .isoformat(timespec="seconds").replace("+00:00", "Z"),
        }

    def statistics(self) -> dict[str, dict]:
        """Inference statistics of every model version this worker ran since it started
        (worker/stats.py), keyed NAME for version 1 and NAME@VERSION for the others."""
        found = {}
        for entry, stats in self._cache.stats.snapshot().items():
            name, version = split(entry)
            found[name if version in (None, 1) else f"{name}@{version}"] = stats
        return found

    def resident(self) -> list[str]:
        return self._cache.names()

    def residency(self) -> dict:
        """What the status reply says about memory: sessions' measured bytes, the budget, the pins."""
        sizes = self._cache.sizes()
        return {"resident_bytes": {"total": sum(sizes.values()), "models": sizes},
                "memory_budget_bytes": self._cache.budget_bytes, "models_pinned": sorted(self._cache.pinned),
                "model_replicas": self._replicas}

    def pin(self) -> list[str]:
        """Load, pin and warm every model whose sidecar asks for `replicas.min` >= 1 (worker/pinning.py)
        and is not pinned and resident yet; the entries pinned. Called at worker start and, in poll
        mode, after every scan (a file is served once validated). A model that cannot load or fit is
        logged once per reason and left unpinned."""
        replicas = {}
        for name in self.names():
            policy = replicas_of(self.sidecar(name), name)
            if policy != Replicas():
                replicas[name] = {"min": policy.min, "max": policy.max}
            if policy.min < 1:
                continue
            try:
                entry = self.entry(name)
                if entry in self._cache.pinned and self._cache.peek(entry) is not None:
                    continue
                model = self.load(name, cold=False)
            except FractalError as exc:
                if self._pin_failures.get(name) != str(exc):
                    self._pin_failures[name] = str(exc)
                    log.log(logging.INFO if isinstance(exc, ModelNotReady) else logging.ERROR,
                            "pinned model %s not loaded: %s", name, exc)
                continue
            self._pin_failures.pop(name, None)
            self._cache.pin(model.name)
            warm(model)
        self._replicas = replicas
        return sorted(self._cache.pinned)

    def states(self) -> list[dict]:
        """The repository index: every version of every model, READY or UNAVAILABLE and why
        (docs/protocol.md, Repository index). Read from the pool directory alone (files, sidecars,
        `.unloaded` markers, the ledger), never from this worker's sessions: every worker answers
        the same, whichever models it holds."""
        found = []
        for n in self.names():
            versions = on_disk(self._prefix, n)
            allowed = set(served(sorted(versions), self.sidecar(n).get("version_policy"), n))
            for v, entry in sorted(versions.items()):
                state, reason = "READY", ""
                if v not in allowed:
                    state, reason = "UNAVAILABLE", "not served by the model's version_policy"
                elif os.path.exists(self._marker(entry)):
                    state, reason = "UNAVAILABLE", "unloaded"
                else:
                    try:
                        key = file_key(os.stat(path_of(self._prefix, entry)))
                    except FileNotFoundError:
                        continue
                    if self._watch is not None:
                        state, reason = self._watch.state(entry, key)
                    elif (failed := self._ledger.failure(entry, key)) is not None:
                        state, reason = "UNAVAILABLE", f"the file failed to load: {failed}"
                found.append({"name": n, "version": str(v), "state": state, "reason": reason})
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
        check_model_name(name)
        with self._locked():
            if not on_disk(self._prefix, name):
                raise self._not_found(name)
            self._write_sidecar(name, description)

    def upload(self, name: str, data: bytes, description: str | None = None, version: object = None) -> None:
        """Validate `data` in ONNX Runtime, then make it `name` (at `version`; None: the flat file,
        version 1) atomically, replacing any old one."""
        entry = self._upload_entry(name, version)
        if len(data) > self.max_model_bytes:
            raise PayloadTooLarge(f"model is {len(data)} bytes; the limit is {self.max_model_bytes}")
        self._cache.admit(entry, len(data))  # NOTE: a model no worker of this budget could hold is refused
        tmp = self._write_temp(name, data)
        try:
            st = os.stat(tmp)
            model = self._factory.build(entry, data, st)  # raises BadInput: pool unchanged
            self._cache.admit(entry, model.cost_bytes)    # raises ModelTooLarge: pool unchanged
            with self._locked():
                # NOTE: vouched before the rename (which keeps the key): no worker polling the pool
                # ever sees this file unvouched and keeps serving the old one after we return.
                self._ledger.write_vouched(entry, file_key(st))
                target = path_of(self._prefix, entry)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(tmp, target)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._marker(entry))  # a new upload is served
                if description is not None:
                    self._write_sidecar(name, description)
                self._sync_dir()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._cache.offer(model)  # same inode as the renamed file: the first predict needs no reload
        log.info("stored model %s (%d bytes)", entry, len(data))

    def _upload_entry(self, name: str, version: object) -> str:
        check_model_name(name)
        v = parse_version(name, version)
        has_dir = os.path.isdir(self._prefix + name[:-5])
        if v is None and has_dir:
            raise BadInput(f"model {name} has versions ({name[:-5]}/N/model.onnx): name the version to upload")
        if v is None or (v == 1 and not os.path.isdir(os.path.join(self._prefix + name[:-5], "1"))
                         and (not has_dir or os.path.isfile(self._prefix + name))):
            return name
        return f"{name}@{v}"

    def _entries(self, name: str, version: object) -> list[str]:
        """The entries on disk an unload, load or delete of `name` at `version` (None: all) means."""
        check_model_name(name)
        v = parse_version(name, version)
        found = on_disk(self._prefix, name)
        if not found:
            raise self._not_found(name)
        if v is None:
            return list(found.values())
        if v not in found:
            raise ModelNotFound(f"model {name} has no version {v}; its versions: "
                                f"{', '.join(map(str, sorted(found)))}")
        return [found[v]]

    def unload(self, name: str, version: object = None) -> None:
        """The repository API's unload: stop serving `name` (one version, or all) on every worker (the
        files stay; load_model() serves them again); this worker drops the sessions now."""
        with self._locked():
            entries = self._entries(name, version)
            os.makedirs(self._unloaded_prefix, exist_ok=True)
            for entry in entries:
                self._marker(entry).touch()
        log.info("unloaded model %s", ", ".join(entries))
        for entry in entries:
            self._drop_unloaded(entry)

    def load_model(self, name: str, version: object = None) -> LoadedModel:
        """The repository API's load, the opposite of unload(): mark `name` (one version, or all)
        served again on every worker, then return this worker's session for it, from load()."""
        with self._locked():
            for entry in self._entries(name, version):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._marker(entry))
        return self.load(name, version)

    def delete(self, name: str, version: object = None) -> None:
        """Remove `name` (one version; None: every version and the sidecar) from the pool."""
        with self._locked():
            entries = self._entries(name, version)
            for entry in entries:
                path = path_of(self._prefix, entry)
                os.unlink(path)
                if split(entry)[1] is not None:  # NOTE: a version directory goes when it is empty
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.dirname(path))
                        os.rmdir(os.path.dirname(os.path.dirname(path)))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._marker(entry))
                self._ledger.drop(entry)
            if not on_disk(self._prefix, name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(name + SIDECAR))
            self._sync_dir()
        for entry in entries:
            self._cache.drop(entry)
            self._cache.unpin(entry)
            self._cache.stats.forget(entry)  # NOTE: names come from users: a deleted one leaves no trace
        log.info("deleted model %s", ", ".join(entries))

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


def _plain(name: str) -> bool:
    try:
        check_model_name(name)
        return True
    except BadInput:
        return False
