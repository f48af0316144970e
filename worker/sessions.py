"""ONNX Runtime sessions, loaded once and cached (LRU) under a key that changes whenever the file does.

The cache holds sessions within a memory budget in bytes: each session's cost is measured when it
loads (worker/memory.py: the RSS it added, never less than its file), the least recently used
unpinned sessions make room for a new one, and a model that cannot fit beside the pinned ones is
refused with ModelTooLarge before anything is evicted.
"""
from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

from broker.errors import BadInput, ModelTooLarge
from metrics import NO_SERIES, NO_WORKER_METRICS, ModelSeries, WorkerMetrics

from .memory import measured, trim
from .stats import Counters, ModelStats
from .versions import split

log = logging.getLogger(__name__)

# ONNX Runtime's type strings -> numpy dtypes (what callers' arrays are converted to).
ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32), "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16), "tensor(bool)": np.dtype(np.bool_),
    "tensor(int8)": np.dtype(np.int8), "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32), "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8), "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32), "tensor(uint64)": np.dtype(np.uint64),
    "tensor(string)": np.dtype(np.str_),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    type: str                  # ONNX Runtime's, e.g. "tensor(float)"
    dtype: np.dtype | None     # None for non-tensor (sequence, map) values
    shape: tuple               # ints for fixed dims, None for dynamic ones
    fixed: tuple = field(init=False, compare=False, repr=False)  # (axis, size) of each fixed dim: checked per request

    def __post_init__(self) -> None:
        object.__setattr__(self, "fixed", tuple((i, d) for i, d in enumerate(self.shape) if d is not None))

    def describe(self) -> dict:
        return {"name": self.name, "dtype": self.dtype.name if self.dtype is not None else self.type,
                "shape": list(self.shape)}


@dataclass
class LoadedModel:
    name: str
    key: tuple                 # (device, inode, size, mtime_ns) of the file the session was built from
    session: ort.InferenceSession
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    size_bytes: int
    mtime: float
    # NOTE: never None: a session no cache holds has the no-op series; metrics off, the cache sets one too
    timer: Any = NO_SERIES.inference  # histogram child observing InferenceSession.run: series.inference
    series: ModelSeries = NO_SERIES   # the model's label children, set by the cache
    stats: Counters = field(default_factory=Counters)  # the name's counters, set by the cache
    version: str | None = None  # a version directory's number (worker/versions.py); None: a flat file
    cost_bytes: int = 0        # memory the session holds, measured at load: what the budget counts
    output_names: list[str] = field(init=False)
    input_names: frozenset[str] = field(init=False)
    run: Callable[[list[str], dict, None], list] = field(init=False)  # (output names, feeds, None) -> values

    def __post_init__(self) -> None:
        version = split(self.name)[1]
        self.version = str(version) if version is not None else None
        self.output_names = [o.name for o in self.outputs]
        self.input_names = frozenset(i.name for i in self.inputs)
        # NOTE: InferenceSession.run checks the feed's names again (inference.feeds_for made them from the
        # session's inputs) and wraps a provider fallback we turned off (SessionFactory._session): its
        # C++ session's run skips both, 1 us of the ~4 us an iris row takes (it still rejects unknown
        # names and shapes). Both take (output names, feeds, run options).
        inner = getattr(self.session, "_sess", None)
        self.run = inner.run if inner is not None else self.session.run


def file_key(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _specs(args: list) -> list[TensorSpec]:
    return [TensorSpec(a.name, a.type, ORT_DTYPES.get(a.type),
                       tuple(d if isinstance(d, int) and d >= 0 else None for d in (a.shape or ())))
            for a in args]


class SessionFactory:
    """Builds sessions with the worker's options (threads, optimisation), created once."""

    def __init__(self, intra_op_threads: int, metrics: WorkerMetrics = NO_WORKER_METRICS,
                 external_data_dir: str | None = None):
        self._metrics = metrics  # metrics off: the no-op twin (metrics.NullWorkerMetrics)
        options = ort.SessionOptions()
        if external_data_dir:
            # NOTE: sessions are built from bytes; this anchors a model's external-data files in the
            # pool, and ONNX Runtime then refuses absolute paths and paths that escape it.
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             os.path.abspath(external_data_dir))
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # ONNX Runtime's own warnings would flood worker logs
        self.options = options
        self._settle()

    def _session(self, data: bytes) -> ort.InferenceSession:
        session = ort.InferenceSession(data, self.options, providers=["CPUExecutionProvider"])
        # NOTE: ONNX Runtime's Python wrapper keeps the model's bytes to re-create the session on a
        # provider fallback (its own source calls this "bad as we're holding the memory
        # indefinitely"): a second copy of every model. We run on the CPU provider alone, so there is
        # nothing to fall back to: turn fallback off and let the bytes go (measured: 40 -> 20 MB of
        # RSS per 20 MB model).
        session.disable_fallback()
        session._model_bytes = None
        return session

    def _settle(self) -> None:
        """Pay ONNX Runtime's one-time set-up (about 9.5 MiB of process-wide state, made with the first
        session) with a throwaway session of the bundled iris model, so no model's measured cost carries it."""
        try:
            data = (Path(__file__).with_name("models") / "iris.onnx").read_bytes()
            ort.InferenceSession(data, self.options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # NOTE: an install without the bundled models: the first model pays it
            log.debug("ONNX Runtime not settled before the first model: %s", exc)

    def build(self, name: str, data: bytes, st: os.stat_result) -> LoadedModel:
        """Load a model from its bytes and measure what it holds; raises BadInput when ONNX Runtime
        cannot load it.

        The cost is the RSS growth across creating the session, not the file size alone: ONNX
        Runtime copies initializers out of the file, prepacks weights and may fold constants into
        bigger tensors, which the file does not show. The file size is the floor, since growth reads
        low when the session reuses pages an evicted one left mapped.
        """
        started = time.perf_counter()
        try:
            session, cost = measured(lambda: self._session(data), st.st_size)
        except Exception as exc:  # ORT raises its own pybind types (Fail, InvalidGraph, ...)
            raise BadInput(f"{name} is not a model ONNX Runtime can load: {_first_line(exc)}") from None
        elapsed = time.perf_counter() - started
        log.info("loaded %s (%d bytes, %d resident) in %.1f ms", name, st.st_size, cost, elapsed * 1e3)
        self._metrics.model_loads.inc()
        self._metrics.model_load_seconds.observe(elapsed)
        return LoadedModel(name, file_key(st), session, _specs(session.get_inputs()),
                           _specs(session.get_outputs()), st.st_size, st.st_mtime, cost_bytes=cost)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else exc.__class__.__name__


class SessionCache:
    """LRU of LoadedModel by name, within `budget_bytes` of measured cost (0: unlimited) and
    `capacity` sessions; pinned names are never evicted. An entry is only valid while its file key
    still matches."""

    def __init__(self, capacity: int, metrics: WorkerMetrics = NO_WORKER_METRICS, budget_bytes: int = 0):
        self.capacity = capacity
        self.budget_bytes = budget_bytes
        self.resident_bytes = 0    # sum of the entries' cost_bytes
        self.pinned: set[str] = set()
        self._entries: OrderedDict[str, LoadedModel] = OrderedDict()
        self._metrics = metrics  # metrics off: the no-op twin (metrics.NullWorkerMetrics)
        self.stats = ModelStats()  # NOTE: by name, beside the entries: an eviction keeps the counts
        metrics.memory_budget.set(budget_bytes)

    def get(self, name: str, key: tuple) -> LoadedModel | None:
        entry = self._entries.get(name)
        if entry is None or entry.key != key:
            self._metrics.cache_misses.inc()
            return None
        self._entries.move_to_end(name)
        self._metrics.cache_hits.inc()
        return entry

    def peek(self, name: str) -> LoadedModel | None:
        """The resident session of `name` whatever its file key, without counting a hit or a miss."""
        return self._entries.get(name)

    def admit(self, name: str, cost_bytes: int) -> None:
        """Raise ModelTooLarge when a session of `name` costing `cost_bytes` (or a file of that size,
        whose session costs at least as much) can never fit beside the pinned sessions. Called
        before a load, so a model larger than the budget is refused, never loaded."""
        if not self.budget_bytes:
            return
        pinned = sum(m.cost_bytes for n, m in self._entries.items() if n in self.pinned and n != name)
        if cost_bytes > self.budget_bytes - pinned:
            held = f", of which pinned models hold {pinned}" if pinned else ""
            raise ModelTooLarge(f"model {split(name)[0]} needs at least {cost_bytes} bytes of memory; this "
                                f"worker's memory budget (FRACTAL_WORKER_MEMORY_BUDGET_BYTES) is "
                                f"{self.budget_bytes} bytes{held}")

    def put(self, model: LoadedModel, cold: bool = False) -> None:
        """Keep `model`, evicting least recently used unpinned sessions until the budget and the
        count hold; raises ModelTooLarge, evicting nothing, when it cannot fit. `cold`: a request
        is waiting for this load (counted as a cold load)."""
        self.admit(model.name, model.cost_bytes)
        self._insert(model)
        if cold:
            self._metrics.cold_loads.inc()
        evicted = False
        while len(self._entries) > self.capacity or (self.budget_bytes and self.resident_bytes > self.budget_bytes):
            victim = next((n for n in self._entries if n not in self.pinned and n != model.name), None)
            if victim is None:
                break  # NOTE: only pins left beside it; admit() already kept the budget
            self._remove(victim)
            evicted = True
            log.info("evicted %s from the session cache (%d of %d bytes resident)", victim,
                     self.resident_bytes, self.budget_bytes)
            self._metrics.cache_evictions.inc()
        if evicted:
            trim()  # NOTE: the evicted session's pages go back to the OS, so the budget bounds RSS
        self._resident_changed()

    def offer(self, model: LoadedModel) -> bool:
        """Keep `model` (a session made to validate a file) only if it fits without evicting any
        other; True when kept."""
        old = self._entries.get(model.name)
        room = self.budget_bytes - self.resident_bytes + (old.cost_bytes if old else 0)
        if (self.budget_bytes and model.cost_bytes > room) or (old is None and len(self._entries) >= self.capacity):
            return False
        self._insert(model)
        self._resident_changed()
        return True

    def drop(self, name: str) -> bool:
        """Forget `name`; True when it was resident."""
        dropped = name in self._entries
        if dropped:
            self._remove(name)
            trim()
        self._resident_changed()
        return dropped

    def pin(self, name: str) -> None:
        """Never evict `name` (it stays pinned if a new file version replaces its session)."""
        self.pinned.add(name)

    def unpin(self, name: str) -> None:
        self.pinned.discard(name)

    def sizes(self) -> dict[str, int]:
        """{name: measured cost in bytes} of every resident session, least recently used first."""
        return {name: m.cost_bytes for name, m in self._entries.items()}

    def _insert(self, model: LoadedModel) -> None:
        model.stats = self.stats.of(model.name)
        old = self._entries.pop(model.name, None)
        if old is not None:
            self.resident_bytes -= old.cost_bytes
        model.series = self._metrics.model_series(model.name, split(model.name)[0], model.version)
        model.timer = model.series.inference
        model.series.resident_bytes.set(model.cost_bytes)
        self._entries[model.name] = model
        self.resident_bytes += model.cost_bytes

    def _remove(self, name: str) -> None:
        self.resident_bytes -= self._entries.pop(name).cost_bytes
        # NOTE: users name models; a model's series leave with its session, so names cannot pile up.
        self._metrics.forget_model(name)

    def _resident_changed(self) -> None:
        self._metrics.models_resident.set(len(self._entries))
        self._metrics.resident_bytes.set(self.resident_bytes)

    def names(self) -> list[str]:
        return list(self._entries)
