"""How long a model's InferenceSession.run takes on this worker, learned from its own recent runs, so a
request whose deadline is shorter than that is answered Timeout instead of run (issue 15).

The estimate is deliberately low. A too-high one refuses requests that could have made it, a too-low
one only runs some that cannot (as the worker did before it had estimates), so: per model, the
smallest time per row among its last WINDOW runs, times the rows about to run. The smallest recent
run, not an average: a run slowed by a busy machine does not raise it, and it follows a model that
got faster (or was replaced) within WINDOW runs. Per row: a batch of n rows takes longer than one row
but rarely n times longer, so a batch's time per row is lower than a lone row's, and n x (that) stays
below what n rows take. A request alone is checked as one row: its rows are known only once its
inputs are converted, inside its run. Only the run itself is counted (not converting inputs, encoding
or the trip back): lower again. A model with no run yet has no estimate, and its requests run.

Keys are the model versions that ran, as the pool resolves them (entries, worker/versions.py: NAME.onnx
or NAME.onnx@VERSION): "iris", "iris.onnx" and "iris.onnx" at version 1 (a flat file) share one
estimate, and each version of a model has its own. Keys are bounded.
"""
from __future__ import annotations

from collections import deque

WINDOW = 16         # runs remembered per model
MAX_MODELS = 1024   # keys remembered; the oldest is forgotten past this


class RunTimes:
    """Per-model expected run time from recent runs; observe() after a run, expected_s() before one."""

    def __init__(self, window: int = WINDOW, max_models: int = MAX_MODELS):
        self._window = window
        self._max_models = max_models
        self._runs: dict[str, deque[float]] = {}   # seconds per row of the last `window` runs, by entry
        self._per_row_s: dict[str, float] = {}     # their minimum, kept so that expected_s is one lookup

    def expected_s(self, entry: str, rows: int = 1) -> float:
        """Seconds `rows` rows of the model version `entry` are expected to take at least; 0.0 when it has
        not run here."""
        return self._per_row_s.get(entry, 0.0) * rows

    def observe(self, entry: str, rows: int, ns: int) -> None:
        """Learn from one run of the model version `entry` of `rows` rows that took `ns` nanoseconds."""
        if rows < 1 or ns < 0:
            return
        per_row_s = ns / 1e9 / rows
        runs = self._runs.get(entry)
        if runs is None:
            if len(self._runs) >= self._max_models:
                oldest = next(iter(self._runs))
                del self._runs[oldest], self._per_row_s[oldest]
            self._runs[entry] = deque((per_row_s,), maxlen=self._window)
            self._per_row_s[entry] = per_row_s
            return
        leaving = runs[0] if len(runs) == self._window else None
        runs.append(per_row_s)
        smallest = self._per_row_s[entry]
        if per_row_s <= smallest:
            self._per_row_s[entry] = per_row_s
        elif leaving is not None and leaving <= smallest:  # NOTE: the smallest may just have left the window
            self._per_row_s[entry] = min(runs)
