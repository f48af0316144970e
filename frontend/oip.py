"""Triton's model configuration and statistics extensions: the shapes REST and gRPC both answer with.

The dicts here are Triton's JSON (REST) and, field for field, the proto3 JSON mapping of its
ModelConfig and ModelStatisticsResponse messages, so the gRPC frontend turns them into messages
with json_format.ParseDict and both protocols always agree.
"""
from __future__ import annotations

from typing import Any

from .v2_tensors import datatype_of

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
VERSION = "1"  # a flat NAME.onnx file's version
PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
_NO_CACHE = ("cache_hit", "cache_miss")  # Triton's response cache; we have none, so always 0


def config_type(dtype: str) -> str:
    """Triton's config data type (TYPE_FP32, TYPE_STRING, ...) of the worker's dtype name."""
    try:
        datatype = datatype_of(dtype)
    except TypeError:  # a non-tensor value (sequence, map): no config type describes it
        return "TYPE_INVALID"
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _config_tensor(spec: dict, batching: bool) -> dict:
    dims = [-1 if d is None else d for d in spec["shape"]]
    entry = {"name": spec["name"], "data_type": config_type(spec["dtype"])}
    if batching:  # Triton's convention: with max_batch_size > 0, dims leave out the batch dimension
        dims = dims[1:]
        if not dims:  # a [batch] tensor: one element per row, reshaped to a scalar
            entry.update(dims=[1], reshape={"shape": []})
            return entry
    entry["dims"] = dims
    return entry


def model_config(name: str, config: dict) -> dict:
    """The model configuration of `name` from a worker's `config` answer (docs/protocol.md)."""
    batch = int(config.get("max_batch_size") or 0)
    result: dict[str, Any] = {
        "name": name, "platform": PLATFORM, "backend": BACKEND,
        "version_policy": config.get("version_policy") or {"latest": {"num_versions": 1}}, "max_batch_size": batch,
        "input": [_config_tensor(t, batch > 0) for t in config["inputs"]],
        "output": [_config_tensor(t, batch > 0) for t in config["outputs"]],
    }
    dynamic = config.get("dynamic_batching")
    if batch and dynamic:
        result["dynamic_batching"] = {"preferred_batch_size": list(dynamic.get("preferred_batch_sizes") or []),
                                      "max_queue_delay_microseconds": int(dynamic.get("max_queue_delay_us") or 0)}
    return result


def _zero() -> dict:
    return {"last_inference": 0, "inference_count": 0, "execution_count": 0,
            "inference_stats": {p: {"count": 0, "ns": 0} for p in (*PHASES, *_NO_CACHE)}}


def summed_stats(broker_status: dict | None) -> dict[str, dict]:
    """Every model's statistics summed over the workers of an `mmi.workers` answer.

    A worker process with several connections appears once per connection, with one node id and one
    set of counters: each node's freshest row counts once.
    """
    freshest: dict[str, dict] = {}
    for row in (broker_status or {}).get("workers", []):
        node, age = row.get("node"), row.get("status_age_s")
        if node is None or age is None or not isinstance(row.get("model_stats"), dict):
            continue
        if node not in freshest or age < freshest[node]["status_age_s"]:
            freshest[node] = row
    total: dict[str, dict] = {}
    for row in freshest.values():
        for name, stats in row["model_stats"].items():
            if not isinstance(stats, dict):
                continue
            into = total.setdefault(name, _zero())
            into["last_inference"] = max(into["last_inference"], int(stats.get("last_inference") or 0))
            for key in ("inference_count", "execution_count"):
                into[key] += int(stats.get(key) or 0)
            phases = stats.get("inference_stats") or {}
            for phase in PHASES:
                pair = phases.get(phase) or {}
                into["inference_stats"][phase]["count"] += int(pair.get("count") or 0)
                into["inference_stats"][phase]["ns"] += int(pair.get("ns") or 0)
    return total


def stats_key(pool_name: str, version: str) -> str:
    """The key of one version's counters in a worker's status (worker/pool.py statistics())."""
    return pool_name if version == VERSION else f"{pool_name}@{version}"


def statistics(summed: dict[str, dict], models: list[tuple[str, str, str]]) -> dict:
    """{"model_stats": [...]} for (name shown, pool name, version); a model never run has zeros."""
    return {"model_stats": [{"name": shown, "version": version,
                             **summed.get(stats_key(pool_name, version), _zero()), "batch_stats": []}
                            for shown, pool_name, version in models]}
