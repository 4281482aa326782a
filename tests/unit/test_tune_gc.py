"""The worker's GC tuning (relay.server.tune_gc): young collections less often, the older
generations' ratios kept, what start made frozen."""

from __future__ import annotations

import gc

from relay.server import GC_YOUNG_THRESHOLD, tune_gc


def test_tune_gc_raises_only_the_young_threshold_and_freezes_what_start_made():
    before = gc.get_threshold()
    try:
        gc.unfreeze()
        alive = [object() for _ in range(3)]  # noqa: F841 (something to freeze)
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
