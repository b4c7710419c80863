"""Why a local listener could not be bound, as a sentence a person can act on: the port, and
the process holding it when the OS tells us (Linux /proc)."""

from __future__ import annotations

import asyncio
import errno
import os
import time

from .spec import ForwardSpec

#: a limit: seconds spent looking through /proc for the process holding a port
WHO_LISTENS_BUDGET = 1.0


async def bind_failure(spec: ForwardSpec, exc: OSError) -> str:
    """``bind_error_message`` with the holder of a port in use, looked up off the event loop
    (the scan of /proc takes up to ``WHO_LISTENS_BUDGET`` seconds)."""
    holder = None
    if exc.errno == errno.EADDRINUSE:
        holder = await asyncio.get_running_loop().run_in_executor(None, who_listens,
                                                                  spec.bind_port)
    return bind_error_message(spec, exc, holder)


def bind_error_message(spec: ForwardSpec, exc: OSError, holder: str | None = None) -> str:
    """The message for ``exc`` binding ``spec``'s listener; ``holder``: who holds the port
    (``who_listens``), for a port in use."""
    where = spec.listen
    if exc.errno == errno.EADDRINUSE:
        by = f" by {holder}" if holder else " by another program"
        alt = spec.bind_port + 10000
        other = (f"-D {alt}" if spec.kind == "socks" else
                 f"{alt}:{spec.target}" if spec.target_path else
                 f"{alt}:{spec.target_host}:{spec.target_port}")
        return (f"cannot listen on {where}: the port is already in use{by}; choose another "
                f"local port (e.g. {other})"
                if spec.bind_port < 55536 else
                f"cannot listen on {where}: the port is already in use{by}")
    if exc.errno == errno.EACCES and spec.bind_port < 1024:
        other = (f"-D 1{spec.bind_port:04d}" if spec.kind == "socks" else
                 f"1{spec.bind_port:04d}:{spec.target}")
        return (f"cannot listen on {where}: ports below 1024 are privileged; use a port of "
                f"1024 or more (e.g. {other})")
    if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        return (f"cannot listen on {where}: {spec.bind_host} is not an address of this "
                "machine")
    return f"cannot listen on {where}: {exc.strerror or exc}"


def who_listens(port: int) -> str | None:
    """Best effort (Linux /proc): ``"pid 1234 (python3)"`` of the process listening on
    ``port``, or None when the OS does not tell us.  Blocking: call it off the loop."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9 and parts[3] == "0A" and \
                            int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(parts[9])
        except OSError:
            continue
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    deadline = time.monotonic() + WHO_LISTENS_BUDGET
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        if time.monotonic() > deadline:
            break
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    with open(f"/proc/{pid}/comm") as f:
                        comm = f.read().strip()
                    return f"pid {pid} ({comm})"
            except OSError:
                continue
    return None
