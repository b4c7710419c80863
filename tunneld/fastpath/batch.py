"""Writes leave in batches, as OpenSSH flushes its buffers once per poll loop.

While the bytes of one read are processed — a read of the SSH socket (the connection's
``_recv_data``, wrapped by ``connection``) or of a local socket (``with batch:`` around the
local side's callbacks) — a *batch* is open: the SSH packets sealed meanwhile and the data
for local sockets wait, and leave in one ``writelines`` per socket when the outermost batch
ends.  A bulk upload makes several 32 KiB packets of each local read, a download decodes
several packets of each SSH read, and a ping-pong or a new connection saves the extra loop
callback per write.  Writes made outside a batch (timers, tasks) are flushed by their owner
(``sealing.Sender`` with a ``call_soon``, a local side at once).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger("tunneld")


class Batch:
    """The one batch of the event loop's thread: ``with batch:`` opens it (nestable)."""

    __slots__ = ("depth", "_at_end")

    def __init__(self) -> None:
        #: >0 while a batch is open (read it; only ``with`` changes it)
        self.depth = 0
        #: (function, args) to call when the outermost batch ends: the flushes of its writes
        self._at_end: list[tuple[Callable[..., None], tuple[Any, ...]]] = []

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(self, _typ: object, _exc: object, _tb: object) -> None:
        self.depth -= 1
        if self.depth:
            return
        at_end = self._at_end
        while at_end:
            calls = at_end[:]
            at_end.clear()
            for fn, args in calls:
                try:
                    fn(*args)
                except Exception:  # noqa: BLE001 - one socket's failure must not keep the others'
                    log.exception("fastpath: a batched write failed")

    def later(self, fn: Callable[..., None], *args: Any) -> None:
        """Call ``fn(*args)`` when the current batch ends (only while ``depth``)."""
        self._at_end.append((fn, args))


#: the batch every writer of the process shares
batch = Batch()
