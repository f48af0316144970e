"""Turn a predict request's inputs into ONNX Runtime feeds, run the session, collect outputs.

Inputs are named ({input name: array}), positional ([one array per input]), or for a one-input model a
bare array or nested list (REST's "values" rule: [2, 5, 1, 4] is one row, [[...], [...]] rows); nested
lists inside become arrays. Each is
converted to the model's dtype when the kinds agree (numbers to numbers, text to text), and an input
one dimension short of the model's rank is taken as a single row (the seed's {"values": [2, 5, 1, 4]}).
Anything else is a BadInput whose message names what the model expects.
"""
from __future__ import annotations

import time
from typing import Any, NamedTuple

import numpy as np

from broker.casting import cast
from broker.errors import BadInput
from metrics import tracing

from .sessions import LoadedModel, TensorSpec
from .stats import rows_of

_NUMERIC = frozenset("biuf")


class Run(NamedTuple):
    """One InferenceSession.run a request took part in, returned with its outputs: the worker's run-time
    estimate learns from it once the request is answered (worker/runtimes.py)."""
    entry: str  # the model version that ran: its entry, NAME or NAME@VERSION (worker/versions.py)
    rows: int   # rows of the whole run (a batch's, for each of its requests)
    ns: int     # nanoseconds of InferenceSession.run

_KIND_WORDS = {"b": "true/false values", "i": "integers", "u": "integers", "f": "numbers", "c": "complex numbers",
               "U": "strings", "S": "strings", "O": "values of mixed types", "V": "raw records",
               "M": "dates", "m": "durations"}


def kind_words(dtype: np.dtype) -> str:
    """What a user sent, in words rather than numpy's dtype codes (`<U1` is "strings")."""
    return _KIND_WORDS.get(dtype.kind, str(dtype))


def _shape_text(spec: TensorSpec) -> str:
    dims = ", ".join("N" if d is None else str(d) for d in spec.shape)
    return f"[{dims}] ({spec.dtype.name if spec.dtype is not None else spec.type})"


def _as_array(value: Any, spec: TensorSpec) -> np.ndarray:
    if spec.dtype is None:
        raise BadInput(f"input {spec.name!r} is of type {spec.type}, which cannot be sent")
    try:
        array = value if isinstance(value, np.ndarray) else np.asarray(value)
    except ValueError as exc:
        raise BadInput(f"input {spec.name!r} is not a rectangular array: {exc}") from None
    if array.dtype != spec.dtype:
        want_text, have_text = spec.dtype.kind == "U", array.dtype.kind in "US"
        if array.dtype.kind == "O" or (want_text != have_text) or (
                not want_text and array.dtype.kind not in _NUMERIC):
            raise BadInput(f"input {spec.name!r} expects {spec.dtype.name} values, got {kind_words(array.dtype)}")
        array = cast(array, spec.dtype, spec.name)
    if len(spec.shape) and array.ndim == len(spec.shape) - 1:
        array = array[np.newaxis]
    shape = array.shape
    fits = array.ndim == len(spec.shape)
    if fits:
        for axis, size in spec.fixed:  # NOTE: a loop, not any(<generator>): this runs for every input
            if shape[axis] != size:
                fits = False
                break
    if not fits:
        raise BadInput(f"input {spec.name!r} expects shape {_shape_text(spec)}, "
                       f"got {list(array.shape)}")
    return array


def feeds_for(model: LoadedModel, inputs: Any) -> dict[str, np.ndarray]:
    specs = model.inputs
    if isinstance(inputs, dict):
        if len(inputs) == len(specs) and model.input_names.issuperset(inputs):  # the usual case, quickly
            return {s.name: _as_array(inputs[s.name], s) for s in specs}
        unknown = sorted(set(inputs) - model.input_names)
        if unknown:
            raise BadInput(f"unknown input {unknown[0]!r}; {model.name} takes "
                           f"{', '.join(s.name for s in specs)}")
        missing = [s.name for s in specs if s.name not in inputs]
        if missing:
            raise BadInput(f"missing input {missing[0]!r} of shape "
                           f"{_shape_text(next(s for s in specs if s.name == missing[0]))}")
        return {s.name: _as_array(inputs[s.name], s) for s in specs}
    if isinstance(inputs, np.ndarray) and len(specs) == 1:
        return {specs[0].name: _as_array(inputs, specs[0])}
    if isinstance(inputs, (list, tuple)):
        if len(specs) == 1 and len(inputs) != 1:  # a bare row or rows, as REST's "values"
            return {specs[0].name: _as_array(inputs, specs[0])}
        if len(inputs) != len(specs):
            raise BadInput(f"{model.name} takes {len(specs)} inputs "
                           f"({', '.join(s.name for s in specs)}); name them in a map")
        return {s.name: _as_array(v, s) for s, v in zip(specs, inputs, strict=True)}
    raise BadInput("'inputs' must be a map of input name to array, a list with one array per input, "
                   "or (for a one-input model) an array")


def check_outputs(model: LoadedModel, wanted: list[str] | None) -> list[str]:
    """The output names to compute; raises BadInput for names the model does not have."""
    names = model.output_names if wanted is None else list(wanted)
    unknown = [n for n in names if n not in model.output_names] if wanted is not None else []
    if unknown or not names:
        raise BadInput(f"unknown output {unknown[0] if unknown else '(none asked)'!r}; {model.name} "
                       f"has {', '.join(model.output_names)}")
    return names


def run(model: LoadedModel, inputs: Any, wanted: list[str] | None) -> tuple[dict[str, Any], Run]:
    """Run the model; returns {output name: value} in the model's output order (or `wanted`'s), and
    the run (its ns are the reply's timing, docs/protocol.md).

    Counts the request, failed or not, in the model's statistics (worker/stats.py).
    """
    started = time.perf_counter_ns()
    try:
        feeds = feeds_for(model, inputs)
        converted = time.perf_counter_ns()
        outputs, ran, output_ns = run_timed(model, feeds, wanted)
    except Exception:
        model.stats.failed(time.perf_counter_ns() - started)
        raise
    model.stats.succeeded(ran.rows, time.perf_counter_ns() - started, 0, converted - started, ran.ns, output_ns)
    return outputs, ran


def run_feeds(model: LoadedModel, feeds: dict[str, np.ndarray], wanted: list[str] | None) -> dict[str, Any]:
    """Run already-checked feeds (see feeds_for)."""
    return run_timed(model, feeds, wanted)[0]


def run_timed(model: LoadedModel, feeds: dict[str, np.ndarray],
              wanted: list[str] | None) -> tuple[dict[str, Any], Run, int]:
    """run_feeds, also returning the run and the nanoseconds of collecting outputs."""
    names = check_outputs(model, wanted)
    started = time.perf_counter_ns()
    try:
        values = model.run(names, feeds, None)
    except Exception as exc:  # ORT reports bad values (e.g. wrong dims inside the graph) this way
        raise BadInput(f"{model.name} rejected the input: {str(exc).strip().splitlines()[-1][:300]}") \
            from None
    ran = time.perf_counter_ns()
    rows = rows_of(feeds)
    model.stats.executed()
    model.timer.observe((ran - started) / 1e9)
    model.series.batch_rows.observe(rows)
    if tracing.ENABLED:
        tracing.RUN = (0, started, ran, rows, None)
    outputs = {name: _plain(value) for name, value in zip(names, values, strict=True)}
    return outputs, Run(model.name, rows, ran - started), time.perf_counter_ns() - ran


def _plain(value: Any) -> Any:
    """Non-tensor outputs (sequences of maps from ZipMap) become plain lists and dicts."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def worker_time(outcome: Any, started: float) -> float:
    """Add the worker's own time (ms since `started`, a perf_counter) to a result that carries a
    timing map (docs/protocol.md, "Timing"), and return it in seconds; only durations cross the wire,
    never clock readings."""
    elapsed_s = time.perf_counter() - started
    if type(outcome) is dict:
        timing = outcome.get("timing")
        if type(timing) is dict:
            timing["worker_ms"] = elapsed_s * 1e3
    return elapsed_s


def result(model: LoadedModel, outputs: dict, inference_ms: float, share: float = 1.0) -> dict:
    """A predict's result: its outputs, its timing map (docs/protocol.md, "Timing"), and the version
    that ran it when that is a version directory's. `share`: this request's part of the run's rows,
    when the run was a batch's."""
    timing = {"inference_ms": inference_ms} if share == 1.0 else {"inference_ms": inference_ms, "share": share}
    answer: dict[str, Any] = {"outputs": outputs, "timing": timing}
    if model.version is not None:
        answer["version"] = model.version
    return answer


def served_version(request: Any, outcome: Any) -> Any:
    """The version that answered a predict: the result's (a version directory's) or "1" (a flat file); for a
    failure, the one asked for (None: the newest). For per-model metrics (metrics.WorkerMetrics.model_done)."""
    if type(outcome) is dict:
        return outcome.get("version", "1")
    return request.get("version") if type(request) is dict else None
