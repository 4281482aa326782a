"""After start, what start made is frozen out of the cyclic GC (relay.server.freeze_gc)."""

from __future__ import annotations

import gc

from relay.server import freeze_gc


def test_freeze_gc_moves_what_exists_out_of_the_collections_and_keeps_the_thresholds():
    before = gc.get_threshold()
    try:
        gc.unfreeze()
        assert gc.get_freeze_count() == 0
        freeze_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == before
    finally:
        gc.unfreeze()
