"""The recent browser-open requests and what was done with each (`tunnelctl opens`).  Pure:
the caller passes the times.

Every request has a number, counted up across daemon runs (the list is saved with the spool
positions), so that `tunnelctl open --request N` names one for good.  Only the last
``MAX_KEPT`` are kept.  Outcomes:

=============== ===========================================================================
``pending``     being acted on (the forward, the readiness probe)
``opened``      the browser was started
``old``         not opened: older than ``open_max_age`` when tunneld first saw it
``refused``     not opened: the URL rules refused it (``reason`` says which)
``duplicate``   not opened: the same URL was opened moments ago
``rate-limited`` not opened: too many opens for the host
``failed``      not opened: the host or the port never answered, or the browser failed
=============== ===========================================================================
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

from .errors import UsageError

#: a limit: requests kept in the list
MAX_KEPT = 100
OUTCOMES = ("pending", "opened", "old", "refused", "duplicate", "rate-limited", "failed")


@dataclass
class Request:
    n: int
    #: when tunneld saw it (this machine's wall clock, epoch seconds)
    seen: float
    host: str
    url: str
    #: the host it ran on, when known (a spool entry's, a marker's NODE)
    node: str | None
    #: ``spool``, ``session NAME``, ``tunnelctl open``
    source: str
    #: when it was asked for on the server (its clock, epoch seconds; spool entries only)
    asked: int | None = None
    #: its age in seconds when tunneld first saw it (server's clock; spool entries only)
    age: int | None = None
    outcome: str = "pending"
    reason: str = ""
    #: the local URL opened, and the forward it went through
    local: str | None = None
    forward: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Request:
        if not isinstance(data, dict) or set(data) != set(cls.__dataclass_fields__):
            raise ValueError("not a request record")
        req = cls(**data)
        if not (isinstance(req.n, int) and req.n > 0 and isinstance(req.host, str) and
                isinstance(req.url, str) and req.outcome in OUTCOMES):
            raise ValueError("not a request record")
        if req.outcome == "pending":   # the daemon stopped before it was done
            req.outcome, req.reason = "failed", "the daemon stopped before it was done"
        return req


def describe_age(seconds: float) -> str:
    """``95s``, ``12m``, ``3h 5m``, ``2d 4h``."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


class Requests:
    """The last ``MAX_KEPT`` requests, oldest first; ``on_change`` is called after every
    change (the owner saves them)."""

    def __init__(self, kept: int = MAX_KEPT) -> None:
        self._items: deque[Request] = deque(maxlen=kept)
        self._next = 1
        self.on_change: Callable[[], None] = lambda: None

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def add(self, seen: float, host: str, url: str, node: str | None, source: str,
            asked: int | None = None, age: int | None = None) -> Request:
        req = Request(self._next, seen, host, url, node, source, asked, age)
        self._next += 1
        self._items.append(req)
        self.on_change()
        return req

    def done(self, req: Request, outcome: str, reason: str = "", local: str | None = None,
             forward: str | None = None) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        req.outcome, req.reason = outcome, reason
        req.local, req.forward = local or req.local, forward or req.forward
        self.on_change()

    def get(self, n: int) -> Request:
        """Request ``n``; UsageError naming the numbers the list holds."""
        for req in self._items:
            if req.n == n:
                return req
        if not self._items:
            raise UsageError(f"no request {n}: tunneld has seen no browser-open request yet "
                             "(`tunnelctl opens` lists them)")
        first, last = self._items[0].n, self._items[-1].n
        raise UsageError(f"no request {n}: the list holds requests {first} to {last} "
                         "(`tunnelctl opens` lists them)")

    def to_json(self) -> dict[str, Any]:
        return {"next": self._next, "requests": [r.to_json() for r in self._items]}

    def load(self, data: Any) -> int:
        """Take a saved list (``to_json``'s); returns how many records were skipped."""
        if not isinstance(data, dict):
            return 0
        skipped = 0
        for rec in data.get("requests") or []:
            try:
                self._items.append(Request.from_json(rec))
            except (TypeError, ValueError):
                skipped += 1
        nxt = data.get("next")
        top = max((r.n for r in self._items), default=0) + 1
        self._next = max(top, nxt if isinstance(nxt, int) and not isinstance(nxt, bool)
                         else 1)
        return skipped
