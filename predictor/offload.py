"""Where a piece of request work runs: on the event loop when it is small, in the thread
pool when it is not, so no request stalls the loop (health probes included)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

Result = TypeVar("Result")

#: Requests up to this many rows and bytes are decoded, validated and scored on the event
#: loop (at most about 2 ms of CPU); larger ones go to the thread pool (one row can be
#: large: a V1 object with 300,000 unknown keys takes a second to refuse).
INLINE_MAX_ROWS = 128
INLINE_MAX_BODY_BYTES = 64 * 1024


def is_small(rows: int = 0, body_bytes: int = 0) -> bool:
    return rows <= INLINE_MAX_ROWS and body_bytes <= INLINE_MAX_BODY_BYTES


async def run_sized(small: bool, work: Callable[..., Result], *args: Any) -> Result:
    """`work(*args)`: inline when `small`, else in the loop's default thread pool."""
    if small:
        return work(*args)
    return await asyncio.get_running_loop().run_in_executor(None, _one_at_a_time, work, args)


#: Before each large piece of work, the GIL is left to the event loop this long: time to
#: answer what arrived while the previous piece held it.
YIELD_SECONDS = 0.002
#: Large work holds the GIL in long C calls (orjson, pydantic): one at a time, so the event
#: loop competes with one thread for it, not with the whole pool.
_large_work = threading.Lock()


def _one_at_a_time(work: Callable[..., Result], args: tuple) -> Result:
    with _large_work:
        time.sleep(YIELD_SECONDS)
        return work(*args)
