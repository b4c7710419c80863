"""Who is at the other end of a Unix socket (the control socket's and the ssh control
sockets' check of the peer's uid)."""

from __future__ import annotations

import socket
import struct


def peer_creds(sock: socket.socket) -> tuple[int | None, int | None]:
    """(pid, uid) of the process at the other end of a Unix socket, where the OS tells
    (Linux: both; macOS / BSD: the uid)."""
    if hasattr(socket, "SO_PEERCRED"):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
        return pid, uid
    if hasattr(socket, "LOCAL_PEERCRED"):  # macOS / BSD: struct xucred {version, uid, ...}
        creds = sock.getsockopt(0, socket.LOCAL_PEERCRED, struct.calcsize("2I"))
        return None, struct.unpack("2I", creds)[1]
    return None, None
