"""Per-model inference statistics of one worker, in Triton's terms, for the `status` op.

Counts live per model name for the life of the worker process (deleting a model forgets them), so
they survive session evictions and reloads. Recording is a few integer adds on the thread that
already owns the request: no lock, no allocation. The broker collects each worker's snapshot with
its status polls, and the frontends sum them over workers (docs/protocol.md).
"""
from __future__ import annotations

import time

# Durations are integer nanoseconds, as Triton reports them.
PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


class Counters:
    """One model's counts: Triton's inference_count (rows), execution_count (session runs), and a
    (count, ns) pair per phase."""

    __slots__ = ("last_inference_ms", "inference_count", "execution_count", "counts", "ns")

    def __init__(self) -> None:
        self.last_inference_ms = 0
        self.inference_count = 0
        self.execution_count = 0
        self.counts = [0] * len(PHASES)
        self.ns = [0] * len(PHASES)

    def executed(self) -> None:
        """One InferenceSession.run (a batch of any number of requests counts once)."""
        self.execution_count += 1
        self.last_inference_ms = time.time_ns() // 1_000_000

    def succeeded(self, rows: int, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int,
                  output_ns: int) -> None:
        """One request answered; `rows` inferences (its batch dimension). In a batch, every request
        is charged the whole run's compute_infer time, as Triton does."""
        self.inference_count += rows
        counts, ns = self.counts, self.ns  # NOTE: unrolled: every request comes here (index 1 is "fail")
        counts[0] += 1
        ns[0] += total_ns
        counts[2] += 1
        ns[2] += queue_ns
        counts[3] += 1
        ns[3] += input_ns
        counts[4] += 1
        ns[4] += infer_ns
        counts[5] += 1
        ns[5] += output_ns

    def failed(self, total_ns: int) -> None:
        self.counts[1] += 1
        self.ns[1] += total_ns

    def snapshot(self) -> dict:
        return {"last_inference": self.last_inference_ms, "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {phase: {"count": c, "ns": n}
                                    for phase, c, n in zip(PHASES, self.counts, self.ns, strict=True)}}


class ModelStats:
    """Counters by model name."""

    def __init__(self) -> None:
        self._models: dict[str, Counters] = {}

    def of(self, name: str) -> Counters:
        counters = self._models.get(name)
        if counters is None:
            counters = self._models[name] = Counters()
        return counters

    def forget(self, name: str) -> None:
        self._models.pop(name, None)

    def snapshot(self) -> dict[str, dict]:
        return {name: c.snapshot() for name, c in self._models.items()}


def rows_of(feeds: dict) -> int:
    """The batch size of a request: the first dimension of its first input (1 for a scalar)."""
    for array in feeds.values():
        return int(array.shape[0]) if getattr(array, "ndim", 0) else 1
    return 0

