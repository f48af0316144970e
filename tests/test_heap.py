"""broker/heap.py: the serving process's start-up heap is frozen, young passes are rarer, and reference
cycles made while serving are still collected without anyone calling gc.collect()."""
from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import gc, weakref
from broker import heap

class Node:
    pass

heap.settle()
assert gc.get_freeze_count() > 0, "the start-up heap is frozen"
assert gc.get_threshold()[0] == heap.YOUNG_OBJECTS
node = Node()
node.self = node  # a cycle: only the collector frees it
gone = []
weakref.finalize(node, gone.append, True)
del node
live = [[i] for i in range(heap.YOUNG_OBJECTS // 2)]
assert not gone, "fewer new objects than the threshold: no pass yet"
live += [[i] for i in range(heap.YOUNG_OBJECTS)]
assert gone, "the cycle was collected by a pass the new objects triggered"
print("ok")
"""


def test_settle_freezes_the_start_up_heap_and_cycles_are_still_collected():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
