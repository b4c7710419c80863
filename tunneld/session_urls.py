"""What a session's output asks for: a marker's browser open, a printed URL's forward, the
forward to its ``--sock`` socket once it listens; and the session's list of URLs.

Invariants: every forward made for a session is in ``sess.forwards`` (so it ends with the
session and comes back with a detached one taken up); ``sess.urls`` holds one entry per URL
taken (oldest first, at most ``MAX_SESSION_URLS``), and ``sess.url_ports`` the first target of
each remote port (a socket: its path), so a program that prints its address several ways gets
one forward.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable
from urllib.parse import quote

import asyncssh

from . import printed, remote, sshrun, urls
from .config import Config
from .errors import NotFound, TunneldError, UsageError
from .events import EventHub
from .markers import BrowserOpen
from .opener import Opener, Routed
from .printed import PrintedUrl
from .session import Session
from .wire import iso_time

log = logging.getLogger("tunneld")

#: a limit: forwards remembered per session (made for its markers and printed URLs; they end
#: with it and are restored with it)
MAX_SESSION_FORWARDS = 16
#: a limit: printed URLs forwarded and listed per session
MAX_SESSION_URLS = 16
#: seconds a ``--sock`` session's socket is waited for (looked at every ``SOCK_POLL_MAX`` s
#: at most) before it is given up, logged
SOCK_WAIT = 600.0
SOCK_POLL_MAX = 1.0
#: seconds a printed loopback URL's port may take to be listened on (by the user: see
#: ``_not_ours``), and the interval of the looks
LISTEN_WAIT = 3.0
LISTEN_POLL = 0.25
#: seconds a ``--sock`` socket's plain URL waits, with printed_urls="open", for the program
#: to print its own (with a token) before it is opened instead
SOCK_OPEN_GRACE = 3.0


class SessionUrls:
    def __init__(self, opener: Opener, events: EventHub, config: Callable[[], Config],
                 changed: Callable[[Session], None]) -> None:
        self.opener = opener
        self.events = events
        self._config = config
        #: called when something the sessions file records changed
        self._changed = changed

    async def on_open(self, sess: Session, ev: BrowserOpen | PrintedUrl) -> None:
        """A marker (always opened) or a printed URL (``printed_urls``) in ``sess``'s output."""
        if isinstance(ev, PrintedUrl):
            await self._printed(sess, ev.url)
            return
        sess.url_opened = True   # a printed URL opens no second page (printed_urls="open")
        try:
            r = await self.opener.open(sess.host.name, ev.url, ev.node or sess.node,
                                       f"session {sess.name}",
                                       server=sess.server, socket=sess.sock)
        except TunneldError as exc:
            log.warning("%s", exc)
            return
        self._keep_forward(sess, r.get("forward"))
        self._changed(sess)   # opens and forwards are kept in the sessions file

    @staticmethod
    def _keep_forward(sess: Session, fwd: str | None) -> None:
        if fwd and fwd not in sess.forwards and len(sess.forwards) < MAX_SESSION_FORWARDS:
            sess.forwards.append(fwd)

    async def _printed(self, sess: Session, url: str, own_socket: bool = False) -> None:
        """A URL in the session's output (or its ``--sock`` socket's, ``own_socket``):
        forward it and list it; open it if the host's ``printed_urls`` says "open" and
        nothing was opened for the session yet."""
        host = sess.host.name
        mode = self._config().printed_urls(host)
        if mode == "ignore" and not own_socket:   # (`--sock auto` asked for its forward)
            return
        key: int | str
        unix = printed.unix_target(url)
        if unix is not None:
            key, where = unix[0], "unix"
            if key != sess.sock:
                log.info("%s: session %s printed %s: not its own socket; not forwarded", host,
                         sess.name, urls.redact(url))
                return
            if own_socket and key in sess.url_ports:
                return   # the program printed its socket's URL itself (with its token)
        else:
            try:
                plan = urls.plan(url)
            except urls.Refused as exc:
                log.debug("%s: session %s: printed URL not forwarded: %s", host, sess.name, exc)
                return
            if not printed.nearby(plan, sess.server):
                return   # somebody else's server (a public name or address)
            key, where = plan.remote_port, plan.remote_host
        first = sess.url_ports.get(key)
        if first is not None and first != where:
            return   # the same port printed under another address: one forward
        if any(_says_no_more(url, seen) for seen in sess.url_seen):
            return   # printed again (Jupyter repeats itself), or less of it (no token)
        if len(sess.url_seen) >= MAX_SESSION_URLS:
            if len(sess.url_seen) == MAX_SESSION_URLS:
                sess.url_seen.add("")   # said once
                log.info("%s: session %s printed more than %d URLs; the rest are not "
                         "forwarded", host, sess.name, MAX_SESSION_URLS)
            return
        sess.url_ports[key] = where
        sess.url_seen.add(url)
        if unix is None and plan.is_loopback and sess.node is None:
            why = await self._not_ours(sess, plan.remote_port)
            if why is not None:
                del sess.url_ports[key]   # its port is free for the next address printed
                log.warning("%s: session %s printed %s, but %s: not forwarded; start the "
                            "program with --ip=0.0.0.0 (it then prints its node's name) or let "
                            "it open the browser (the marker names its node)", host, sess.name,
                            urls.redact(url), why)
                return
        # the socket's own URL is opened only if the program prints none (with its token)
        open_it = mode == "open" and not sess.url_opened and not own_socket
        sess.url_opened = sess.url_opened or open_it
        source = f"session {sess.name}"
        try:
            routed = await self.opener.route(host, url, sess.node, source, sess.server,
                                             sess.sock)
        except TunneldError as exc:
            log.warning("%s: session %s printed %s; not forwarded: %s", host, sess.name,
                        urls.redact(url), exc)
            return
        self._list(sess, url, routed)
        if own_socket and mode == "open" and not sess.url_opened:
            await _wait_done(sess, SOCK_OPEN_GRACE)
            open_it = sess.running and not sess.url_opened
            sess.url_opened = sess.url_opened or open_it
        if open_it:
            sess.opens += 1
            try:
                await self.opener.launch(host, routed, source)
            except TunneldError as exc:
                log.warning("%s", exc)

    async def _not_ours(self, sess: Session, port: int) -> str | None:
        """Why the server's loopback ``port`` is not the user's own (another user listens
        there, or nobody within ``LISTEN_WAIT``: the program runs elsewhere, a compute node);
        None if it is, or if the server cannot say (no /proc/net/tcp)."""
        deadline = time.monotonic() + LISTEN_WAIT
        while True:
            conn = sess.host.live_connection()
            if conn is None:
                return None   # (the forward waits for the host like any other)
            try:
                r = await sshrun.run(conn, remote.listener_uids_command(port), LISTEN_WAIT + 10)
            except (asyncio.TimeoutError, asyncssh.Error, OSError):
                return None
            found = remote.parse_listeners(str(r.stdout or ""))
            if found is None:
                return None
            me, uids = found
            if me in uids:
                return None
            if uids:
                return f"port {port} of the server belongs to another user (uid {uids[0]})"
            if time.monotonic() + LISTEN_POLL > deadline:
                return f"nothing of yours listens on port {port} of the server"
            await asyncio.sleep(LISTEN_POLL)

    def _list(self, sess: Session, url: str, routed: Routed) -> None:
        host = sess.host.name
        sess.urls.append({"remote": url, "local": routed.local, "seen": iso_time(time.time()),
                          "forward": routed.forward})
        self._keep_forward(sess, routed.forward)
        log.info("%s: session %s: %s is forwarded, at %s", host, sess.name, urls.redact(url),
                 urls.redact(routed.local))
        self.events.publish("session", host=host, name=sess.name, event="url",
                            state=sess.state.value, exit_status=None,
                            url=urls.redact(routed.local), forward=routed.forward)
        self._changed(sess)

    async def wait_socket(self, sess: Session) -> None:
        """``run --sock auto``: once the session's socket accepts connections, forward a
        local port to it and list it (bounded by ``SOCK_WAIT``; ends with the session)."""
        path = sess.sock
        assert path is not None
        deadline = time.monotonic() + SOCK_WAIT
        delay = 0.2
        while sess.running:
            conn = sess.host.live_connection()
            if conn is not None:
                try:
                    _, writer = await conn.open_unix_connection(path)
                    writer.close()
                    break
                except (asyncssh.Error, OSError):
                    pass   # not there yet (or the connection went: wait for the next one)
            if time.monotonic() + delay > deadline:
                log.warning("%s: session %s: nothing listened on %s within %gs; its port is "
                            "not forwarded", sess.host.name, sess.name, path, SOCK_WAIT)
                return
            await _wait_done(sess, delay)
            delay = min(SOCK_POLL_MAX, delay * 1.5)
        else:
            return
        await self._printed(sess, f"http+unix://{quote(path, safe='')}/", own_socket=True)

    async def urls(self, sess: Session, open_newest: bool) -> dict[str, Any]:
        """The URLs ``sess`` printed (at their local ends), newest last; with
        ``open_newest`` the newest one is opened in the browser (once it is ready)."""
        name = sess.name
        result: dict[str, Any] = {"name": name, "host": sess.host.name,
                                  "state": sess.state.value,
                                  "urls": [dict(u) for u in sess.urls]}
        if not open_newest:
            return result
        if not sess.urls and sess.sock is not None and sess.running:
            raise NotFound(f"session {name}: nothing accepts connections on its socket "
                           f"{sess.sock} yet (`tunnelctl logs {name}` shows its output)")
        if not sess.urls:
            raise NotFound(f"session {name} has printed no URL yet (`tunnelctl logs {name}` "
                           "shows its output)" + ("" if sess.running else "; it has ended"))
        if not sess.running:
            raise UsageError(f"session {name} has ended ({sess.state}); its forwards went with "
                             f"it: `tunnelctl run` it again")
        source = f"tunnelctl open {name}"
        routed = await self.opener.route(sess.host.name, sess.urls[-1]["remote"], sess.node,
                                         source, sess.server, sess.sock)
        self._keep_forward(sess, routed.forward)   # (made again if it had gone)
        result |= await self.opener.launch(sess.host.name, routed, source, explicit=True)
        return result


def _says_no_more(url: str, seen: str) -> bool:
    """``url`` is ``seen``, or the start of it up to a path, query or fragment
    (``http://h:8888/`` of ``http://h:8888/lab?token=…``; not ``http://h:5000`` of
    ``http://h:50001/``)."""
    if not seen.startswith(url):
        return False
    rest = seen[len(url):]
    return not rest or url.endswith(("/", "?", "&")) or rest[0] in "/?#&"


async def _wait_done(sess: Session, timeout: float) -> None:
    """Until ``sess`` ends, at most ``timeout`` seconds."""
    waiter = asyncio.ensure_future(sess.done.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
