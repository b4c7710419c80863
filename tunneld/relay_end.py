"""One end of a resumable forward (``relay``): its streams, its link, the resync after a new
link, the limits (part of the program ``resume_relay.program`` sends)."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
import time
from typing import Any

from .relay import (
    ACK,
    ACK_BODY,
    CHUNK,
    DATA,
    DEFAULTS,
    EOF,
    HEAD,
    OPEN,
    PING,
    PING_EVERY,
    QUIT,
    RESET,
    RESETS_KEPT,
    STATUS,
    SYNC,
    TICK,
    Stream,
    frame,
    jframe,
)


class End:
    """One end (``role`` "relay" or "keeper"): its streams, its link, its limits."""

    def __init__(self, conf: dict) -> None:
        self.conf = dict(DEFAULTS, **conf)
        self.role = conf["role"]
        self.secret = bytes.fromhex(conf["secret"])
        self.dir = conf["dir"]
        self.boot = os.urandom(8).hex()
        self.peer_boot: str | None = None
        self.streams: dict[int, Stream] = {}
        self.resets: collections.OrderedDict = collections.OrderedDict()
        #: tunneld's link and control connections (``relay_serve.Conn``)
        self.link: Any = None
        self.synced = False
        self.down_since: float | None = time.monotonic()
        self.ctrl: Any = None
        self.no_ctrl_since: float | None = time.monotonic()
        #: bytes all streams sent that the peer has not delivered (held to ``buffer``)
        self.owed = 0
        #: streams paused now
        self.paused = 0
        #: the link's writes are backed up (tunneld reads no faster)
        self.blocked = False
        self.next_sid = 1
        self.closed_total = 0
        self.total = 0
        self.quit = asyncio.get_event_loop().create_future()

    # -- the link ---------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.link is not None and self.synced:
            self.link.transport.write(data)

    def send_data(self, st: Stream, data: bytes) -> None:
        if self.link is None or not self.synced or not st.opened and self.role == "relay":
            return
        write = self.link.transport.writelines
        for i in range(0, len(data), CHUNK):
            chunk = data[i:i + CHUNK]
            write((HEAD.pack(DATA, st.sid, len(chunk)), chunk))

    def ack(self, st: Stream) -> None:
        if self.link is None or not self.synced:   # said after the next SYNC instead
            return
        d = st.delivered()
        if d > st.acked_out or st.eof_in and not st.eof_told:
            st.acked_out = d
            st.eof_told = st.eof_in
            self.send(frame(ACK, st.sid, ACK_BODY.pack(d, st.eof_in)))
            self.maybe_done(st)

    def link_up(self, conn: Any) -> None:
        old, self.link, self.synced = self.link, conn, False
        self.blocked = False   # that was the old link's
        if old is not None:
            old.transport.abort()
        conn.transport.write(jframe(SYNC, {
            "boot": self.boot,
            # received (resend from there), the end received, delivered (credit from there)
            "streams": {str(s.sid): [s.recv, s.eof_in, s.delivered()]
                        for s in self.streams.values()},
            "reset": list(self.resets)}))

    def link_down(self, conn: Any) -> None:
        if conn is self.link:
            self.link, self.synced = None, False
            if self.down_since is None:   # a link that never synced does not restart it
                self.down_since = time.monotonic()
            self.blocked = False
            self.event("suspended")

    def on_sync(self, msg: dict) -> None:
        boot, theirs = msg["boot"], msg["streams"]
        reset = set(msg.get("reset", ()))
        new_peer = self.peer_boot is not None and boot != self.peer_boot
        self.peer_boot = boot
        self.synced = True
        gap = time.monotonic() - self.down_since if self.down_since else 0.0
        self.down_since = None
        for st in list(self.streams.values()):
            known = theirs.get(str(st.sid))
            # a restarted peer lost what it had: a stream it may have begun (its target may
            # have had the bytes) is reset, never begun twice
            if known is None and (st.sid in reset or new_peer and (st.opened or st.offered)):
                self.reset(st, "the other end lost it (restarted)", tell=False)
            elif known is None and st.opened:
                self.finish(st)   # done there and forgotten
            elif known is None and self.role == "keeper":
                self.send(jframe(OPEN, {}, st.sid))   # the OPEN was lost: all of it again
                st.offered = True
                self.resend(st, 0, False)
            elif known is not None:
                st.opened = True
                self.resend(st, known[0], known[1], known[2] if len(known) > 2 else known[0])
        for sid in theirs:   # ended here while the SYNC that names it was on its way
            if int(sid) in self.resets and int(sid) not in self.streams:
                self.send(frame(RESET, int(sid), b"gone"))
        for st in list(self.streams.values()):
            self.ack(st)
        self.pause_all()
        self.event("resumed", after=round(gap, 3))

    def resend(self, st: Stream, recv: int, eof: bool, delivered: int | None = None) -> None:
        st.drop_to(max(recv, st.acked), delivered)
        st.eof_acked = st.eof_acked or eof and st.eof_out
        data = st.unsent_from(max(recv, st.acked))
        self.send_data(st, data)
        if st.eof_out and not eof:
            self.send(frame(EOF, st.sid))
        st.acked_out = -1   # our ACK after a resync always goes
        st.eof_told = False

    def on_frame(self, kind: int, sid: int, payload: bytes) -> None:
        if kind == SYNC:
            self.on_sync(json.loads(payload))
            return
        if not self.synced:
            raise ValueError("a frame before SYNC")
        if kind == PING:
            return
        if kind == QUIT:
            self.stop("the keeper asked")
            return
        st = self.streams.get(sid)
        if kind == OPEN and self.role == "relay":
            self.open_target(sid)
        elif st is None:
            if kind in (DATA, EOF) and sid not in self.resets:
                self.send(frame(RESET, sid, b"gone"))
        elif kind == DATA:
            st.opened = True
            st.deliver(payload)
        elif kind == ACK:
            st.opened = True
            n, eof = ACK_BODY.unpack(payload)
            st.drop_to(n)
            st.eof_acked = st.eof_acked or bool(eof) and st.eof_out
            self.maybe_done(st)
        elif kind == EOF:
            st.got_eof()
        elif kind == RESET:
            why = payload.decode(errors="replace")
            self.reset(st, "the other end closed it" if why == "gone" else why, tell=False)

    def stop(self, why: str) -> None:
        if not self.quit.done():
            self.quit.set_result(why)

    # -- streams ----------------------------------------------------------------------------

    def add_stream(self, sid: int, opened: bool) -> Stream:
        st = Stream(self, sid, opened)
        self.streams[sid] = st
        self.total += 1
        return st

    def open_target(self, sid: int) -> None:
        if sid in self.streams:
            return
        if len(self.streams) >= self.conf["max_streams"]:
            self.remember_reset(sid)
            self.send(frame(RESET, sid, b"the relay has max_streams streams open"))
            return
        st = self.add_stream(sid, True)
        self.send(frame(ACK, sid, ACK_BODY.pack(0, 0)))
        host, port = self.conf["targets"][0]
        asyncio.ensure_future(self._connect(st, host, port))

    async def _connect(self, st: Stream, host: str, port: int) -> None:
        loop = asyncio.get_event_loop()
        try:
            transport, _ = await loop.create_connection(lambda: st, host, port)
        except OSError as exc:
            if self.streams.get(st.sid) is st:
                self.reset(st, f"the server could not connect to {host}:{port}: "
                               f"{exc.strerror or exc}")
            return
        if self.streams.get(st.sid) is not st:   # reset while it connected
            transport.abort()

    def maybe_done(self, st: Stream) -> None:
        if st.done():
            self.finish(st)

    def _forget(self, st: Stream) -> bool:
        if self.streams.get(st.sid) is not st:
            return False
        del self.streams[st.sid]
        self.owed -= st.owed()
        if st.paused:
            self.paused -= 1
        st.buf.clear()
        st.buf_len = 0
        self.closed_total += 1
        self.unpause()   # its bytes no longer count against buffer
        return True

    def finish(self, st: Stream) -> None:
        """Both directions ended (or the peer says so): close it, orderly."""
        if not self._forget(st):
            return
        if st.transport is not None:
            st.transport.close()
        self.event("closed", sid=st.sid)

    def reset(self, st: Stream, why: str, tell: bool = True) -> None:
        """End a stream abortively at both ends."""
        if not self._forget(st):
            return
        self.remember_reset(st.sid)
        if tell:
            self.send(frame(RESET, st.sid, why.encode()[:1000]))
        if st.transport is not None:
            st.transport.abort()
        self.event("reset", sid=st.sid, why=why)

    def remember_reset(self, sid: int) -> None:
        self.resets[sid] = None
        while len(self.resets) > RESETS_KEPT:
            self.resets.popitem(last=False)

    def _set_pause(self, st: Stream) -> None:
        """Pause or resume reading ``st`` by the limits."""
        pause = self.blocked or st.owed() >= self.conf["stream_buffer"] or \
            self.owed >= self.conf["buffer"]
        t = st.transport
        if pause != st.paused and t is not None and not t.is_closing() and not st.eof_out:
            st.paused = pause
            self.paused += 1 if pause else -1
            (t.pause_reading if pause else t.resume_reading)()

    def check_pause(self, st: Stream) -> None:
        self._set_pause(st)
        self.unpause()

    def unpause(self) -> None:
        """Resume the streams that only the end's buffer held back, once half of it is
        free."""
        if self.paused and self.owed < self.conf["buffer"] // 2 and not self.blocked:
            for other in list(self.streams.values()):
                if other.paused:
                    self._set_pause(other)

    def pause_all(self) -> None:
        for st in list(self.streams.values()):
            self._set_pause(st)

    # -- ticks, limits, events --------------------------------------------------------------

    async def ticker(self) -> None:
        limit = self.conf["suspend"]
        ticks = 0
        while not self.quit.done():
            await asyncio.sleep(TICK)
            now = time.monotonic()
            ticks += 1
            if self.ctrl is not None and self.streams and ticks % 20 == 0:
                self.ctrl.transport.write(jframe(STATUS, self.status()))
            for st in list(self.streams.values()):
                self.ack(st)
            link, ping = self.link, min(PING_EVERY, limit / 4)
            if ticks % max(1, int(ping / TICK)) == 0:
                self.send(frame(PING))
            if link is not None and now - link.heard > 3 * ping:
                link.transport.abort()   # its connection_lost: link_down
                self.link_down(link)
            if self.down_since is not None and now - self.down_since > limit:
                for st in list(self.streams.values()):
                    self.reset(st, f"suspended longer than {limit:g} s (suspend limit)")
                if self.role == "relay":
                    self.stop(
                        f"no tunneld for {limit:g} s (suspend limit)")
            if self.role == "keeper" and self.no_ctrl_since is not None and \
                    now - self.no_ctrl_since > limit:
                self.stop(
                    f"no tunneld for {limit:g} s (suspend limit)")

    def event(self, what: str, **fields: object) -> None:
        msg = dict(fields, event=what, streams_open=len(self.streams), total=self.total,
                   link=self.link is not None and self.synced)
        if self.ctrl is not None:
            self.ctrl.transport.write(jframe(STATUS, msg))
        elif self.role == "keeper" and what in ("reset", "refused"):
            print(f"tunneld keeper {self.conf.get('name', '')}: stream {fields.get('sid')} "
                  f"reset: {fields.get('why')}", file=sys.stderr, flush=True)

    def status(self) -> dict:
        return {"event": "status", "streams": [s.status() for s in self.streams.values()],
                "link": self.link is not None and self.synced, "total": self.total,
                "streams_open": len(self.streams),
                "down_since": None if self.down_since is None else
                time.time() - (time.monotonic() - self.down_since)}

    def on_cmd(self, msg: dict) -> None:
        if msg.get("cmd") == "quit":
            self.send(frame(QUIT))
            self.stop("tunneld asked")
        elif msg.get("cmd") == "reset":   # tunneld cannot start a relay to serve them
            for st in list(self.streams.values()):
                self.reset(st, str(msg.get("why", "")))
        elif msg.get("cmd") == "status" and self.ctrl is not None:
            self.ctrl.transport.write(jframe(STATUS, self.status()))
