"""Acts on a BrowserOpen: URL rules, the forward it needs, a readiness probe, the browser.

Order: Jupyter's redirect file is read on the server and replaced by its target URL; the URL
rules (``urls.plan``) accept or refuse it; the remote port is mapped to an existing forward or a
new automatic one; the browser opens only once the remote port accepts a connection (bounded);
duplicates and floods are dropped (``urls.OpenPolicy``).  The browser is launched without a
shell: a configured command gets the URL as one argument; otherwise Python's ``webbrowser``
(which honours the daemon's ``BROWSER`` variable).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
import webbrowser
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

import asyncssh

from . import openlog, printed, sshrun, urls
from .desktop import GRAPHICAL_ENV
from .errors import ConnectError, TunneldError, UsageError
from .events import EventHub
from .names import reduce_host_name
from .spec import ForwardSpec

log = logging.getLogger("tunneld")


class OpenHost(Protocol):
    """What an open needs of its host: a live connection (held while it is down)."""

    name: str

    async def connection_for_client(self) -> asyncssh.SSHClientConnection: ...


class HasSpec(Protocol):
    spec: ForwardSpec


#: the forward of a host to a target: an existing one, or a new automatic one
EnsureForward = Callable[[str, str, int, str], Awaitable[HasSpec]]

#: what a not-opened outcome of ``urls.OpenPolicy`` means, as `tunnelctl opens` says it
_REASONS = {
    "duplicate": f"the same URL was opened less than {urls.OpenPolicy.DEDUP_WINDOW:g}s ago",
    "rate-limited": f"more than {urls.OpenPolicy.RATE_MAX} opens for the host within "
                    f"{urls.OpenPolicy.RATE_WINDOW:g}s",
}
#: a limit: bytes of a Jupyter redirect file read from the server
MAX_REDIRECT_FILE = 64 * 1024
#: seconds between readiness probes of the remote port, and the cap of its growth
PROBE_INTERVAL = 0.2
PROBE_INTERVAL_MAX = 1.0
#: seconds allowed to ask systemd's user manager for the graphical session's environment
SHOW_ENV_TIMEOUT = 2.0


@dataclass(frozen=True)
class Routed:
    """A URL with the forward that reaches it."""

    #: what the URL rules made of it (None for a Unix socket's ``http+unix://`` URL)
    plan: urls.Plan | None
    #: the Unix socket on the server the forward reaches ("" for a TCP target)
    path: str
    #: the forward's spec (``str(ForwardSpec)``)
    forward: str
    #: the URL to open locally (the local end of that forward; path, query, fragment kept)
    local: str


class Opener:
    def __init__(self, host_for: Callable[[str], OpenHost], ensure_forward: EnsureForward,
                 events: EventHub, browser: list[str] | str | None = None,
                 ready_timeout: float = 60.0):
        self.host_for = host_for
        self.ensure_forward = ensure_forward
        self.events = events
        self.configure(browser, ready_timeout)
        self.policy = urls.OpenPolicy()
        #: the recent requests and what was done with each (`tunnelctl opens`)
        self.requests = openlog.Requests()
        #: host → (connection, its server's host name) for markers that name a node
        self._server_names: dict[str, tuple[Any, str | None]] = {}

    def configure(self, browser: list[str] | str | None, ready_timeout: float) -> None:
        """Take the browser command and readiness bound from the config (also on reload)."""
        self.browser = shlex.split(browser) if isinstance(browser, str) else browser
        self.ready_timeout = ready_timeout

    async def open(self, host: str, url: str, node: str | None = None,
                   source: str = "", server: str | None = None,
                   explicit: bool = False, socket: str | None = None,
                   request: openlog.Request | None = None, note: bool = True
                   ) -> dict[str, Any]:
        """Open ``url`` (as printed on ``host``, or on compute node ``node`` behind it) in the
        local browser.  ``server``: ``host``'s own host name if known (else it is asked for
        when ``node`` is given).  ``explicit``: a person asked for it (no duplicate check).
        ``socket``: as for ``route``.  The outcome is noted in ``requests`` (in ``request``,
        or in a new one unless ``note`` is False).
        Raises UsageError (refused URL) or ConnectError (host down, port never ready)."""
        req = request if request is not None or not note else \
            self.requests.add(time.time(), host, url, node, source)
        try:
            routed = await self.route(host, url, node, source, server, socket)
            result = await self.launch(host, routed, source, explicit)
        except BaseException as exc:
            if req is not None:
                why = str(exc) if isinstance(exc, TunneldError) else \
                    "cancelled" if isinstance(exc, asyncio.CancelledError) else repr(exc)
                self.requests.done(req, "refused" if isinstance(exc, UsageError)
                                   else "failed", why)
            raise
        if req is not None:
            outcome = "opened" if result["opened"] else result["reason"]
            self.requests.done(req, outcome, _REASONS.get(outcome, ""), result["url"],
                               result["forward"])
        return result

    async def route(self, host: str, url: str, node: str | None = None,
                    source: str = "", server: str | None = None,
                    socket: str | None = None) -> Routed:
        """The forward that reaches ``url`` (an existing one or a new automatic one) and the
        local URL it becomes; nothing is opened.  ``socket``: an ``http+unix://`` URL of that
        socket (a session's own ``--sock``) is forwarded too; any other is refused (a socket
        on the server is forwarded by a person: `tunnelctl add`).
        Raises as ``open`` does."""
        sup = self.host_for(host)
        where = f" ({source})" if source else ""
        unix = printed.unix_target(url)
        if unix is None and url[:10].lower() == "http+unix:" or unix is not None and (
                socket is None or unix[0] != socket):
            log.warning("%s: refused to open a URL%s: not a socket of a `run --sock` session",
                        host, where)
            raise UsageError(f"{host}: not opened: http+unix:// URLs are followed only to the "
                             "socket of a `tunnelctl run --sock auto` session; to reach another "
                             "socket: tunnelctl add HOST LPORT:/path/app.sock")
        if unix is not None:   # http+unix://%2Fpath%2Fapp.sock/x: the session's socket
            fwd = await self.ensure_forward(host, "", 0, unix[0])
            local = f"http://{_url_host(fwd.spec.bind_host)}:{fwd.spec.bind_port}{unix[1]}"
            return Routed(None, unix[0], str(fwd.spec), local)
        path = urls.jupyter_redirect_path(url)
        if path is not None:
            # read on the server: homes are shared with compute nodes
            url = await self._read_redirect(sup, path)
        try:
            plan = urls.plan(url)
            if node is not None and plan.is_loopback:
                server = server or await self._server_name(sup)
                plan = urls.on_node(plan, node, server)
                if not plan.is_loopback:
                    log.info("%s: %s was printed on %s: forwarding to that node%s", host,
                             urls.redact(url), plan.remote_host, where)
        except urls.Refused as exc:
            log.warning("%s: refused to open a URL%s: %s", host, where, exc)
            raise UsageError(f"{host}: not opened: {exc}") from None
        fwd = await self.ensure_forward(host, plan.remote_host, plan.remote_port, "")
        local = plan.local_url(fwd.spec.bind_port, _url_host(fwd.spec.bind_host))
        return Routed(plan, "", str(fwd.spec), local)

    async def launch(self, host: str, routed: Routed, source: str = "",
                     explicit: bool = False) -> dict[str, Any]:
        """Open ``routed``'s local URL once its remote port accepts connections (bounded),
        unless it is a duplicate or one of a flood (not for an ``explicit`` open)."""
        sup = self.host_for(host)
        where = f" ({source})" if source else ""
        local, forward = routed.local, routed.forward
        shown = urls.redact(local)
        await self._wait_ready(sup, routed)
        why = None if explicit else self.policy.check(host, local, time.monotonic())
        if why is not None:
            if why != "duplicate" and self.policy.burst_started():
                log.warning("%s: too many browser opens; dropping them for a while%s", host,
                            where)
            elif why == "duplicate":
                log.info("%s: %s was opened moments ago; not opening it again", host, shown)
            return {"url": local, "opened": False, "reason": why, "forward": forward}
        log.info("%s: opening %s%s", host, shown, where)
        await self._launch(local)
        self.events.publish("open", host=host, url=shown, source=source, forward=forward)
        return {"url": local, "opened": True, "forward": forward}

    async def _server_name(self, sup: OpenHost) -> str | None:
        """``sup``'s server's host name (as the BROWSER helper reports it), asked once per
        connection; None if it cannot be learnt (the URL is then taken as the server's)."""
        conn = await sup.connection_for_client()
        cached = self._server_names.get(sup.name)
        if cached is not None and cached[0] is conn:
            return cached[1]
        try:
            result = await sshrun.run(conn, "(hostname || uname -n) 2>/dev/null", 15)
            # as the BROWSER helper reduces it (spool.HOSTNAME_EXPR)
            name = reduce_host_name(str(result.stdout or ""))
        except (asyncio.TimeoutError, asyncssh.Error, OSError):
            name = None
        self._server_names[sup.name] = (conn, name)
        return name

    async def _read_redirect(self, sup: OpenHost, path: str) -> str:
        conn = await sup.connection_for_client()
        try:
            result = await sshrun.run(
                conn, f"head -c {MAX_REDIRECT_FILE} -- {shlex.quote(path)}", 15)
        except (asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
            raise ConnectError(f"{sup.name}: could not read Jupyter's redirect file {path}: "
                               f"{exc}") from None
        target = urls.jupyter_redirect_target(str(result.stdout or ""))
        if result.exit_status != 0 or target is None:
            raise UsageError(f"{sup.name}: not opened: {path} on the server holds no URL "
                             f"({str(result.stderr or '').strip() or 'no link found'})")
        return target

    async def _wait_ready(self, sup: OpenHost, routed: Routed) -> None:
        """Until the server can connect to the target (bounded by ``ready_timeout``)."""
        deadline = time.monotonic() + self.ready_timeout
        delay = PROBE_INTERVAL
        last = ""
        plan = routed.plan
        target = routed.path if plan is None else \
            f"{plan.remote_host}:{plan.remote_port}"
        while True:
            conn = await sup.connection_for_client()
            try:
                if plan is None:
                    _, writer = await conn.open_unix_connection(routed.path)
                else:
                    _, writer = await conn.open_connection(plan.remote_host, plan.remote_port)
                writer.close()
                return
            except asyncssh.ChannelOpenError as exc:
                last = exc.reason or "refused"
            if time.monotonic() + delay > deadline:
                raise ConnectError(
                    f"{sup.name}: not opened: nothing accepted connections on {target} within "
                    f"{self.ready_timeout:g}s ({last})")
            await asyncio.sleep(delay)
            delay = min(PROBE_INTERVAL_MAX, delay * 1.5)

    async def _launch(self, url: str) -> None:
        await import_graphical_env()
        if self.browser:
            argv = [a.replace("%s", url) for a in self.browser]
            if not any("%s" in a for a in self.browser):
                argv.append(url)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
            except OSError as exc:
                raise UsageError(f"cannot run the browser command {argv[0]!r}: "
                                 f"{exc.strerror or exc}; check `browser` in config.toml") \
                    from None
            asyncio.get_running_loop().create_task(proc.wait())  # reap it
            return
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(None, webbrowser.open, url)
        if not ok:
            raise UsageError("no browser could be started; set `browser` in config.toml or "
                             "BROWSER in the daemon's environment")


async def import_graphical_env() -> None:
    """Under systemd the daemon may start before the desktop session has exported DISPLAY /
    WAYLAND_DISPLAY to the user manager (`systemctl --user import-environment`): take them
    from the manager now, so the browser reaches the screen.  Best effort, bounded."""
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or \
            not os.environ.get("INVOCATION_ID"):  # set for every process systemd starts
        return
    try:
        proc = await asyncio.create_subprocess_exec(
            "systemctl", "--user", "show-environment", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(proc.communicate(), SHOW_ENV_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        return
    found = {}
    for line in out.decode(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key in GRAPHICAL_ENV and value and not value.startswith("$'"):
            found[key] = value
    if not found:
        log.warning("no DISPLAY or WAYLAND_DISPLAY in the daemon's environment nor in "
                    "systemd's user manager; the browser may not start. Run `systemctl --user "
                    "import-environment DISPLAY WAYLAND_DISPLAY XAUTHORITY` in the desktop "
                    "session")
        return
    os.environ.update(found)
    log.info("took %s from systemd's user manager for the browser", " ".join(sorted(found)))
    # webbrowser decides which browsers exist on first use, from DISPLAY: let it look again
    if getattr(webbrowser, "_tryorder", None) is not None:
        webbrowser._tryorder = None  # type: ignore[attr-defined]
        webbrowser._browsers = {}  # type: ignore[attr-defined]


def _url_host(bind_host: str) -> str:
    if bind_host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{bind_host}]" if ":" in bind_host else bind_host
