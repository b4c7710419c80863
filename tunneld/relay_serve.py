"""The sockets of a resumable forward's end (``relay``): tunneld's connections (AUTH), the
keeper's clients, the start (a private directory, detached) — the last part of the program
``resume_relay.program`` sends; run with ``python3 -``."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import socket
import struct
import sys
import time

from .relay import (
    AUTH,
    CMD,
    OPEN,
    STATUS,
    SUN_PATH_MAX,
    Frames,
    Stream,
    jframe,
)
from .relay_end import End


class Conn(asyncio.Protocol):
    """A connection to this end's socket: tunneld's link or control, after AUTH."""

    def __init__(self, end: End) -> None:
        self.end = end
        self.frames = Frames()
        self.kind: str | None = None
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        #: when a byte last came from the other end
        self.heard = time.monotonic()

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        cred = getattr(socket, "SO_PEERCRED", None)
        if sock is not None and cred is not None:
            _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, cred, 12))
            if uid != os.getuid():
                transport.abort()

    def data_received(self, data: bytes) -> None:
        self.heard = time.monotonic()
        try:
            for kind, sid, payload in self.frames.feed(data):
                if self.kind is None:
                    self.auth(kind, payload)
                elif self.kind == "link":
                    if self.end.link is self:
                        self.end.on_frame(kind, sid, payload)
                elif kind == CMD:
                    self.end.on_cmd(json.loads(payload))
        except (ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
            self.transport.write(jframe(AUTH, {"ok": False, "error": str(exc)}))
            self.transport.abort()

    def auth(self, kind: int, payload: bytes) -> None:
        msg = json.loads(payload) if kind == AUTH else {}
        given = bytes.fromhex(str(msg.get("secret", "")))
        if not hmac.compare_digest(given, self.end.secret) or \
                msg.get("kind") not in ("link", "ctrl"):
            raise ValueError("not authorised: wrong secret")
        self.kind = msg["kind"]
        self.transport.write(jframe(AUTH, {"ok": True, "boot": self.end.boot,
                                           "role": self.end.role}))
        if self.kind == "link":
            self.end.link_up(self)
        else:
            if self.end.ctrl is not None:
                self.end.ctrl.transport.abort()
            self.end.ctrl, self.end.no_ctrl_since = self, None
            self.transport.write(jframe(STATUS, self.end.status()))

    def pause_writing(self) -> None:
        if self is self.end.link:
            self.end.blocked = True
            self.end.pause_all()

    def resume_writing(self) -> None:
        if self is self.end.link:
            self.end.blocked = False
            self.end.pause_all()

    def connection_lost(self, exc) -> None:
        if self.kind == "link":
            self.end.link_down(self)
        elif self.kind == "ctrl" and self.end.ctrl is self:
            self.end.ctrl, self.end.no_ctrl_since = None, time.monotonic()


class Client(Stream):
    """A local client the keeper accepted: a new stream, unless max_streams are open."""

    def connection_made(self, transport) -> None:
        end = self.end
        if len(end.streams) >= end.conf["max_streams"]:
            transport.abort()
            end.event("refused", sid=self.sid, why=f"{len(end.streams)} streams are open "
                      f"(max_streams): a client was refused")
            return
        end.streams[self.sid] = self
        end.total += 1
        end.send(jframe(OPEN, {}, self.sid))
        self.offered = end.link is not None and end.synced
        end.event("open", sid=self.sid)
        super().connection_made(transport)


def accept(end: End) -> Client:
    end.next_sid += 1
    return Client(end, end.next_sid - 1, False)


async def serve(conf: dict, ready) -> None:
    end = End(conf)
    loop = asyncio.get_event_loop()
    path = os.path.join(end.dir, "sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)   # a former end's (``main`` made sure none answers)
    server = await loop.create_unix_server(lambda: Conn(end), path)
    os.chmod(path, 0o600)
    listener = None
    if end.role == "keeper":
        sock = socket.socket(fileno=conf["fd"])
        listener = await loop.create_server(lambda: accept(end), sock=sock)
    ready(path, end)
    tick = asyncio.ensure_future(end.ticker())
    why = await end.quit
    tick.cancel()
    if listener is not None:
        listener.close()
    server.close()
    await asyncio.sleep(0.2 if end.link is not None else 0)   # the QUIT leaves
    for st in list(end.streams.values()):
        end.reset(st, f"the {end.role} exits: {why}")
    if _own_pid(end.dir):   # else a newer end lives here now: its files
        for name in ("sock", "pid"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(end.dir, name))
        if end.role == "relay":
            with contextlib.suppress(OSError):
                os.rmdir(end.dir)


def _own_pid(d: str) -> bool:
    try:
        with open(os.path.join(d, "pid")) as f:
            return f.read().strip() == str(os.getpid())
    except OSError:
        return True   # none written (in-process tests)


def _answers(path: str) -> bool:
    """Whether an end already listens at ``path``."""
    s = socket.socket(socket.AF_UNIX)
    try:
        s.settimeout(5)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def main(conf: dict) -> None:
    """Make the private directory, detach (a session of its own), serve; print ``READY
    path`` (or ``ERROR why``) once listening."""
    os.umask(0o077)
    d = os.path.expanduser(conf["dir"])
    if len(os.path.join(d, "sock").encode()) > SUN_PATH_MAX:   # a deep home: a short place
        d = os.path.join("/tmp", f"tunneld-{os.getuid()}", "relay", os.path.basename(d))
    conf["dir"] = d
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        for p in (os.path.dirname(os.path.dirname(d)), os.path.dirname(d), d):
            st = os.lstat(p)
            if st.st_uid != os.getuid() or not os.path.isdir(p) or os.path.islink(p):
                raise OSError(f"{p} is not a directory of this user's")
            os.chmod(p, 0o700)
    except OSError as exc:
        print(f"ERROR cannot make {d}: {exc}", flush=True)
        sys.exit(1)
    if _answers(os.path.join(d, "sock")):   # this relay runs already (one per id)
        print(f"READY {os.path.join(d, 'sock')}", flush=True)
        sys.exit(0)
    r, w = os.pipe()
    if os.fork():
        os.close(w)
        answer = os.read(r, 4096).decode(errors="replace") or "ERROR the relay died at start"
        print(answer.strip(), flush=True)
        sys.exit(0 if answer.startswith("READY") else 1)
    os.close(r)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    if conf["role"] == "relay":
        os.dup2(null, 2)
    with open(os.path.join(d, "pid"), "w") as f:
        f.write(str(os.getpid()))

    started = []

    def ready(path: str, end: End) -> None:
        os.write(w, f"READY {path}\n".encode())
        os.close(w)
        started.append(path)

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve(conf, ready))
    except Exception as exc:   # at start: the parent says why; later: nobody reads it
        if not started:
            with contextlib.suppress(OSError):
                os.write(w, f"ERROR {exc}\n".encode())
        sys.exit(1)


if __name__ == "__main__" and "_CONFIG" in globals():
    main(globals()["_CONFIG"])
