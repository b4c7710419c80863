"""The fast path: every use of asyncssh's private internals, behind one small interface.

Why it exists (design.md §9): per packet and per forwarded connection, asyncssh's generic
code was most of tunneld's CPU time — an SSH_MSG_IGNORE before every packet, a key schedule
per packet, log text built for messages nobody sees, a task and futures per channel.  What
the data path calls:

- ``attach(conn)`` once for each connection tunneld opens (``sshconnect``: the host's and its
  ProxyJump hops', which carry every byte of it): installs the changes on that connection
  alone (``connection``), if the gate lets them (``gate``: only tested asyncssh versions);
- ``open_channel(conn, local, …)`` for a local or SOCKS forward's client: the lean
  ``TCPChannel`` on an attached connection, asyncssh's own channel (``stock``) otherwise —
  the same ``Channel`` interface either way, talking to a ``LocalEnd`` (``ends``);
- ``open_unix_channel(conn, local, path, …)`` for a local forward to a Unix socket on the
  server: asyncssh's own channel on either path (``stock``);
- ``accepted_session(local, pktsize)`` for a remote forward's connection (asyncssh's channel);
- ``with batch:`` around the processing of one local read: the writes it makes leave
  together (``batch``);
- ``preferred_ciphers()``, ``status()`` and ``rtt_ms(conn)``.

Modules: ``gate`` (on or off), ``batch``, ``sealing`` (the one owner of each direction's
nonce), ``connection`` (the per-connection changes), ``channel`` (the lean channel),
``stock`` (asyncssh's channel behind the same interface), ``ends`` (the interfaces).
"""

from __future__ import annotations

from typing import Any

import asyncssh

from . import gate
from .batch import batch
from .channel import TCPChannel
from .connection import FastConnection
from .ends import Channel, LocalEnd
from .stock import StockChannel, accepted_session

__all__ = ["Channel", "LocalEnd", "accepted_session", "announce", "attach", "batch", "open_channel",
           "open_unix_channel", "preferred_ciphers", "rtt_ms", "status"]

#: ciphers tried first unless the user's ~/.ssh/config sets ``Ciphers``: AES-GCM is what the
#: fast path seals itself, and markedly faster than chacha20-poly1305 in stock asyncssh too
#: on CPUs with AES instructions (design.md §9)
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                     "chacha20-poly1305@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr")


def attach(conn: asyncssh.SSHClientConnection) -> bool:
    """Put ``conn`` on the fast path, if it is on (idempotent); returns whether it is."""
    if not gate.current.active:
        return False
    FastConnection.attach(conn)
    return True


def open_channel(conn: asyncssh.SSHClientConnection, local: LocalEnd, host: str, port: int,
                 orig_host: str, orig_port: int, window: int, pktsize: int,
                 max_window: int = 0) -> Channel:
    """Open a ``direct-tcpip`` channel to ``host:port`` for ``local``, which hears how it
    went: ``attached(channel)`` or ``failed(exc)``, never before this returns.  Raises
    ConnectionResetError if the connection is closing (not the server's refusal).  The lean
    channel's receive window starts at ``window`` and grows with the link up to
    ``max_window`` (``tunneld.window``); asyncssh's keeps ``window``."""
    fast = FastConnection.of(conn)
    if fast is None:
        return StockChannel.open(conn, local, host, port, orig_host, orig_port, window,
                                 pktsize)
    try:
        return TCPChannel(fast, local, host, port, orig_host, orig_port, window, pktsize,
                          max_window)
    except asyncssh.ChannelOpenError as exc:
        raise ConnectionResetError(exc.reason) from None


def open_unix_channel(conn: asyncssh.SSHClientConnection, local: LocalEnd, path: str,
                      window: int, pktsize: int) -> Channel:
    """Open a ``direct-streamlocal@openssh.com`` channel to the Unix socket ``path`` on the
    server (absolute: sshd does not expand ``~``) for ``local``, as ``open_channel`` does.
    asyncssh's own channel on either path: on an attached connection its packets go through
    the fast path's sender like every other packet asyncssh sends."""
    return StockChannel.open_unix(conn, local, path, window, pktsize)


def rtt_ms(conn: asyncssh.SSHClientConnection | None) -> float | None:
    """The connection's round trip as its channels measured it (the fastest open →
    confirmation, ms, 0.1 ms steps), None before the first or off the fast path."""
    fast = FastConnection.of(conn) if conn is not None else None
    if fast is None or fast.rtt == float("inf"):
        return None
    return round(fast.rtt * 1000, 1)


def preferred_ciphers() -> list[str]:
    """``PREFERRED_CIPHERS`` that this asyncssh supports, in that order."""
    have = {a.decode() for a in asyncssh.encryption.get_encryption_algs()}
    return [a for a in PREFERRED_CIPHERS if a in have]


def status() -> dict[str, Any]:
    """``{"active": bool, "reason": str}`` for the daemon's ``status`` reply."""
    return gate.current.snapshot()


def announce() -> None:
    """Log, once at start, that the fast path is off and why."""
    gate.announce()
