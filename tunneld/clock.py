"""The sleep detector: the monotonic clock stops while a laptop sleeps, the wall clock does
not; when the wall clock runs ahead (``state.slept_for``) every link is checked at once."""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from .state import slept_for

#: seconds between two clock readings
CLOCK_TICK = 2.0


async def watch(check_liveness: Callable[[str], None], tick: float = CLOCK_TICK) -> None:
    """Run until cancelled: call ``check_liveness(why)`` after each sleep of the machine."""
    wall, mono = time.time(), time.monotonic()
    while True:
        await asyncio.sleep(tick)
        w, m = time.time(), time.monotonic()
        slept = slept_for(wall, mono, w, m)
        wall, mono = w, m
        if slept is not None:
            check_liveness(f"the clock jumped {slept:.0f}s (the machine slept?)")
