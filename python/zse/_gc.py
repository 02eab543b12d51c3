"""The cyclic garbage collector, paused while start-up builds long-lived objects."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """Imports allocate many objects that live as long as the process, and almost no
    garbage: the collector's passes over them meanwhile are wasted time (about a
    sixth of `import zse` and of the server's imports). Restores the collector's
    state, whatever it was."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
