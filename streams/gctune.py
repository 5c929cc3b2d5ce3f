"""The cyclic garbage collector in a long-running worker: what its full collections traverse.

In: the worker's objects once it is built (modules, the app, the loaded model's vocabulary).
Out: those objects moved out of the collector's generations (``gc.freeze``), so full collections
traverse only what the worker creates while it runs.

Why: CPython's full (generation 2) collection traverses every tracked object, and runs whenever
the objects that survived younger collections grow by a quarter. Measured on the worker with the
Taobao-slice model at 1,000 events/s (``bench/end_to_end.py``, a ``gc.callbacks`` probe): about
180,000 tracked objects with a million references, 32 full collections in 75 s, each 50-150 ms
with the event loop stopped and nothing to free: the p99 latency's tail. Two things keep that
traversal short:
- what the worker builds before it serves (imports, faust's app, the model's 65k-item vocabulary)
  lives until the process ends, so it is frozen here once, before the first event; frozen objects
  are still freed by reference counting (a replaced model's vocabulary goes as before), only
  cycles among them are never collected, and the startup objects form none that die;
- long-lived per-user indexes hold tuples of atomic values (the cart timers' ``(due, key)``), which
  the collector stops tracking, rather than objects it must visit at every full collection.
"""

from __future__ import annotations

import gc


def freeze_startup() -> int:
    """Collect once, then move every object alive now to the permanent generation; returns how
    many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
