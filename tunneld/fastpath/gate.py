"""Whether the fast path is on: only for the asyncssh versions it was tested with.

The fast path seals packets and advances nonces and sequence numbers in asyncssh's private
state, and replaces a handful of its private methods on each connection (``connection``).
A version it was not run against may have moved any of that — a new caller of the cipher, a
renamed attribute, another order of the sequence number update — and the price of a silent
mismatch is a broken connection or, worse, a nonce used twice.  So the rule is an allowlist
of exact versions, each added after the data-path suites passed on it (see ``TESTED``).  A
fingerprint of the replaced functions would also let untested releases in, but it would not
see changes to the private attributes whose meaning the fast path relies on.

Off is safe: every connection then runs stock asyncssh, which the same tests cover
(``TUNNELD_STOCK_ASYNCSSH=1`` turns it off on purpose, for side-by-side measurements and for
the tests' stock pass).  Only the speed differs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping

import asyncssh

log = logging.getLogger("tunneld")

#: asyncssh versions the fast path was tested with (the data-path suites passed on each)
TESTED = ("2.24.1",)
#: set to 1: stock asyncssh whatever the version
STOCK_ENV = "TUNNELD_STOCK_ASYNCSSH"


@dataclass(frozen=True)
class Status:
    active: bool
    #: why, as the end of "fast path: on/off (…)"
    reason: str
    #: the asyncssh version it was decided for
    version: str

    def snapshot(self) -> dict[str, object]:
        return {"active": self.active, "reason": self.reason}


def decide(version: str, env: Mapping[str, str]) -> Status:
    """Pure: the fast path's status for asyncssh ``version`` in environment ``env``."""
    if env.get(STOCK_ENV) == "1":
        return Status(False, f"{STOCK_ENV}=1", version)
    if version not in TESTED:
        return Status(False, f"asyncssh {version} not tested", version)
    return Status(True, f"asyncssh {version} tested", version)


#: this process's status (decided once, at import)
current = decide(asyncssh.__version__, os.environ)


def announce() -> None:
    """Say in the log, once at start, that the fast path is off and why (on is the norm)."""
    if current.active:
        return
    if current.reason.startswith(STOCK_ENV):
        log.info("%s: using stock asyncssh", current.reason)
    else:
        log.info("asyncssh %s is not one fastpath was written for (%s); using stock asyncssh",
                 current.version, ", ".join(TESTED))
