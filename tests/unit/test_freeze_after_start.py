"""`infra.composition.freeze_after_start`: what lives at start-up leaves the collector's sight."""

from __future__ import annotations

import gc

from infra.composition import freeze_after_start


def test_objects_alive_at_start_are_frozen() -> None:
    # given a process with objects alive and nothing frozen
    gc.unfreeze()
    alive = [object() for _ in range(10)]
    assert gc.get_freeze_count() == 0
    try:
        # when frozen after start
        freeze_after_start()
        # then they (and the rest of the process) are in the permanent generation
        assert gc.get_freeze_count() >= len(alive)
    finally:
        gc.unfreeze()
