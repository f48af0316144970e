"""ONNX Runtime sessions, loaded once and cached (LRU) under a key that changes whenever the file does."""
from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from broker.errors import BadInput

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
    timer: Any = None          # histogram child observing InferenceSession.run, set by the pool
    series: Any = None         # metrics.ModelSeries: the model's label children, set by the cache
    stats: Counters = field(default_factory=Counters)  # the name's counters, set by the cache
    version: str | None = None  # a version directory's number (worker/versions.py); None: a flat file
    output_names: list[str] = field(init=False)
    input_names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        version = split(self.name)[1]
        self.version = str(version) if version is not None else None
        self.output_names = [o.name for o in self.outputs]
        self.input_names = frozenset(i.name for i in self.inputs)


def file_key(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _specs(args: list) -> list[TensorSpec]:
    return [TensorSpec(a.name, a.type, ORT_DTYPES.get(a.type),
                       tuple(d if isinstance(d, int) and d >= 0 else None for d in (a.shape or ())))
            for a in args]


class SessionFactory:
    """Builds sessions with the worker's options (threads, optimisation), created once."""

    def __init__(self, intra_op_threads: int, metrics: Any = None, external_data_dir: str | None = None):
        self._metrics = metrics  # metrics.WorkerMetrics, or None
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

    def build(self, name: str, data: bytes, st: os.stat_result) -> LoadedModel:
        """Load a model from its bytes; raises BadInput when ONNX Runtime cannot load it."""
        started = time.perf_counter()
        try:
            session = ort.InferenceSession(data, self.options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own pybind types (Fail, InvalidGraph, ...)
            raise BadInput(f"{name} is not a model ONNX Runtime can load: {_first_line(exc)}") from None
        elapsed = time.perf_counter() - started
        log.info("loaded %s (%d bytes) in %.1f ms", name, st.st_size, elapsed * 1e3)
        if self._metrics:
            self._metrics.model_loads.inc()
            self._metrics.model_load_seconds.observe(elapsed)
        return LoadedModel(name, file_key(st), session, _specs(session.get_inputs()),
                           _specs(session.get_outputs()), st.st_size, st.st_mtime)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else exc.__class__.__name__


class SessionCache:
    """LRU of LoadedModel by name; an entry is only valid while its file key still matches."""

    def __init__(self, capacity: int, metrics: Any = None):
        self.capacity = capacity
        self._entries: OrderedDict[str, LoadedModel] = OrderedDict()
        self._metrics = metrics  # metrics.WorkerMetrics, or None
        self.stats = ModelStats()  # NOTE: by name, beside the entries: an eviction keeps the counts

    def get(self, name: str, key: tuple) -> LoadedModel | None:
        entry = self._entries.get(name)
        if entry is None or entry.key != key:
            if self._metrics:
                self._metrics.cache_misses.inc()
            return None
        self._entries.move_to_end(name)
        if self._metrics:
            self._metrics.cache_hits.inc()
        return entry

    def peek(self, name: str) -> LoadedModel | None:
        """The resident session of `name` whatever its file key, without counting a hit or a miss."""
        return self._entries.get(name)

    def put(self, model: LoadedModel) -> None:
        model.stats = self.stats.of(model.name)
        if self._metrics:
            model.series = self._metrics.model_series(model.name)
            model.timer = model.series.inference
        self._entries[model.name] = model
        self._entries.move_to_end(model.name)
        while len(self._entries) > self.capacity:
            evicted, _ = self._entries.popitem(last=False)
            log.info("evicted %s from the session cache", evicted)
            self._forget_series(evicted)
            if self._metrics:
                self._metrics.cache_evictions.inc()
        self._resident_changed()

    def drop(self, name: str) -> bool:
        """Forget `name`; True when it was resident."""
        dropped = self._entries.pop(name, None) is not None
        if dropped:
            self._forget_series(name)
        self._resident_changed()
        return dropped

    def _forget_series(self, name: str) -> None:
        # NOTE: users name models; a model's series leave with its session, so names cannot pile up.
        if self._metrics:
            self._metrics.forget_model(name)

    def _resident_changed(self) -> None:
        if self._metrics:
            self._metrics.models_resident.set(len(self._entries))

    def names(self) -> list[str]:
        return list(self._entries)
