"""A serving process's garbage collector: the start-up heap set aside, collections per 10,000 objects.

CPython's cyclic collector runs a young-generation pass each time 700 more container objects are alive
than before, and every request in flight holds dozens (request, response, context, coroutines, futures):
at 64 connections it ran every few requests, traversing objects that were all still in use, and its
older passes walked the whole start-up heap (Falcon, numpy, prometheus-client, the routes). Under wrk
-c64 that was about 8 % of the frontend's CPU (perf; issue 13). Freezing the heap built at start-up
takes it out of every pass, and a young generation of 10,000 objects holds what the requests in flight
keep alive, so a pass runs when garbage may have piled up, not on every burst of live work. Cycles are
still collected; a young pass over 10,000 objects takes a fraction of a millisecond. The worker does
the same once ONNX Runtime, numpy and ZeroMQ are loaded (a pack's request 13.5 -> 12.2 µs in process).
"""
from __future__ import annotations

import gc

YOUNG_OBJECTS = 10_000  # gen0 threshold (CPython's default: 700); the older generations keep their ratios


def settle() -> None:
    """Collect once, freeze what survives (the app as built at start-up), and raise the young threshold.
    Call once per serving process, after the app is built and before it serves."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_OBJECTS, older, oldest)
