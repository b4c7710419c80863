#!/usr/bin/env python3
"""Page load of Jupyter Lab in headless Chromium: direct vs ``ssh -L`` vs tunneld (issue 20).

    python bench/pageload.py                 # 0 and 50 ms RTT, 7 loads per path (~6-8 min)
    python bench/pageload.py --quick         # 0 and 50 ms RTT, 2 loads per path (a smoke run)
    python bench/pageload.py --rtts 0 --loads 5

What a user feels is the time until Jupyter Lab has loaded.  One run starts:

* a throw-away OpenSSH sshd on 127.0.0.1 (bench/servers.py's SSHD) and a temp HOME whose
  ~/.ssh/config names it (``pagebench-0``) and, per RTT above 0, names a delay proxy in front
  of it (``pagebench-50``: HostName 127.0.0.1, Port = the proxy's port); every alias has
  ``Ciphers aes128-gcm@openssh.com``;
* Jupyter Lab (jupyterlab + jupyter-server from PyPI, in a venv of its own cached under
  /tmp, see ``--jlab-venv``; installed on first use) on 127.0.0.2 as the server side, with a
  fixed token, ``--no-browser`` and its own config/runtime/data dirs and HOME in the temp dir;
* per RTT: ``ssh -F … -N -c aes128-gcm@openssh.com -L 127.0.0.1:P:127.0.0.2:JUPYTER`` and a
  tunneld forward (``python -m tunneld`` in the temp HOME, ``python -m tunnelctl add``), and
  for the ``direct`` reference row at 50 ms a delay proxy in front of Jupyter itself.

Each load is a fresh headless Chromium (Debian's /usr/bin/chromium, fresh --user-data-dir:
cold cache; cache also disabled and cleared over CDP) driven over the Chrome DevTools
Protocol with ``websockets``: navigate to /lab?token=…, wait for Page.loadEventFired, read
the page's own Navigation Timing (loadEventEnd, domContentLoadedEventEnd, responseEnd) and
Resource Timing (requests, transferSize / encodedBodySize) with Runtime.evaluate, count
requests and bytes from Network events as a cross-check, and time "UI ready" (the first
Launcher card in the DOM, seen by a MutationObserver injected before the page's scripts).
The paths' order rotates every round; medians and p90 of the loads.

Delay: bench/delay.py's ``DelayProxy``, a process of its own per proxy (every chunk
delivered rtt/2 late each way; a new connection's upstream connect made 1.5 RTT after it was
accepted).  If bench/delay.py does not import, the script stops with that error.

Output: a Markdown section ("## Page load: Jupyter Lab in headless Chromium") on stdout and in
bench/results.md, where it replaces the section of that heading (up to the next "## " line)
or, the first time, is appended at the end; raw numbers in bench/results-pageload.json.
bench/run.py, when it rewrites results.md, keeps everything from "## Chaos soak" to the end,
so this section, appended after it, survives a later run.py run.  ``--quick`` writes
bench/results-pageload-quick.{md,json} instead and leaves results.md alone.  Progress goes to
stderr.  Every process started here is stopped at the end (also on error and Ctrl-C); the
real HOME is never written to.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import servers as S  # noqa: E402

try:
    from delay import DelayProxy  # noqa: E402
except Exception as _e:  # noqa: BLE001 - missing, or broken (a SyntaxError, ...)
    raise SystemExit(f"bench/pageload.py needs bench/delay.py's DelayProxy, and importing it "
                     f"failed: {type(_e).__name__}: {_e}") from _e

T_START = time.monotonic()
LOCAL = "127.0.0.1"
JUPYTER_HOST = "127.0.0.2"
GCM = "aes128-gcm@openssh.com"
TOKEN = "tunneld-pageload-bench-token"
CHROMIUM = "/usr/bin/chromium"
DEFAULT_JLAB_VENV = Path("/tmp/tunneld-pageload-jupyterlab")
PATHS = ("direct", "ssh", "tunneld")
LABEL = {"direct": "direct", "ssh": "ssh -L", "tunneld": "tunneld"}
#: the heading of this script's section of bench/results.md
SECTION = "## Page load: Jupyter Lab in headless Chromium"

# bounds of every wait
INSTALL_TIMEOUT = 900.0       # pip install jupyterlab
READY_TIMEOUT = 60.0          # Jupyter answering, a tunnel accepting, tunneld connected
CHROME_START_TIMEOUT = 30.0   # DevToolsActivePort appearing and a page target listed
CDP_TIMEOUT = 30.0            # one CDP command
LOAD_TIMEOUT = 90.0           # navigation to the load event
UI_TIMEOUT = 60.0             # load event to the Launcher in the DOM
BUDGET = 540.0                # all measured rounds of all RTTs (fewer rounds if hit)


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T_START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def short(text: str | bytes | BaseException, limit: int = 300) -> str:
    if isinstance(text, BaseException):
        text = f"{type(text).__name__}: {text}" if str(text) else type(text).__name__
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def pct(samples: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(samples)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def wait_accepts(host: str, port: int, proc: subprocess.Popen | None, timeout: float,
                 what: str, logfile: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: "
                               f"{short(tail(logfile) if logfile else '', 400)}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what}: {host}:{port} did not accept within {timeout:g}s")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Connection": "close"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no env proxies
    with opener.open(req, timeout=timeout) as r:
        return r.status, r.read()


def wait_http(url: str, timeout: float, what: str, proc: subprocess.Popen | None = None,
              logfile: Path | None = None) -> bytes:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: "
                               f"{short(tail(logfile) if logfile else '', 600)}")
        try:
            status, body = http_get(url, timeout=5)
            if status == 200:
                return body
            last = f"HTTP {status}"
        except Exception as e:  # noqa: BLE001 - any failure: try again until the deadline
            last = short(e, 120)
        time.sleep(0.1)
    raise RuntimeError(f"{what}: {url} not answering 200 within {timeout:g}s ({last})")


def stop_group(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """SIGTERM to the process group this script created for ``proc`` (started with
    start_new_session=True: the group is ``proc.pid``'s and holds only it and its children,
    e.g. Chromium's zygote and renderers), wait for the leader, then SIGKILL what is left
    of that group."""
    if proc is None:
        return
    pgid = proc.pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


# ------------------------------------------------------------------------------------------
# Jupyter Lab: install (idempotent) and run


def jlab_python(venv: Path) -> Path:
    return venv / "bin" / "python"


JLAB_CHECK = ("import json, jupyterlab, jupyter_server; "
              "print(json.dumps({'jupyterlab': jupyterlab.__version__, "
              "'jupyter_server': jupyter_server.__version__}))")


def jlab_versions(venv: Path) -> dict[str, str] | None:
    py = jlab_python(venv)
    if not py.exists():
        return None
    r = subprocess.run([str(py), "-c", JLAB_CHECK], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, HOME=str(venv / "home")))
    if r.returncode != 0:
        return None
    with contextlib.suppress(json.JSONDecodeError, IndexError):
        return json.loads(r.stdout.strip().splitlines()[-1])
    return None


INSTALL_MARK = "tunneld-pageload-install.json"


def ensure_jupyterlab(venv: Path) -> tuple[dict[str, str], float, dict[str, Any]]:
    """jupyterlab (and its jupyter-server) in a venv of its own: (versions, seconds this call
    spent installing, what the install that made the venv recorded).  A venv that already
    imports both is used as it is."""
    v = jlab_versions(venv)
    if v:
        with contextlib.suppress(OSError, json.JSONDecodeError):
            return v, 0.0, json.loads((venv / INSTALL_MARK).read_text())
        return v, 0.0, {}
    t0 = time.monotonic()
    log(f"installing jupyterlab into {venv} (pip, once; later runs reuse it)")
    home = venv / "home"  # pip and the venv tooling get a HOME here, not the real one
    if not jlab_python(venv).exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                       capture_output=True, timeout=300)
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"),
               PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    r = subprocess.run([str(jlab_python(venv)), "-m", "pip", "install", "-q", "jupyterlab"],
                       capture_output=True, text=True, timeout=INSTALL_TIMEOUT, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"pip install jupyterlab exited {r.returncode}: "
                           f"{short(r.stderr or r.stdout, 800)}")
    v = jlab_versions(venv)
    if not v:
        raise RuntimeError(f"jupyterlab installed into {venv} but does not import")
    secs = time.monotonic() - t0
    mark = {"seconds": round(secs, 1), "date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), **v}
    (venv / INSTALL_MARK).write_text(json.dumps(mark) + "\n")
    return v, secs, mark


class Jupyter:
    """``jupyter-lab`` on 127.0.0.2 with a fixed token and its own dirs in the temp dir."""

    def __init__(self, venv: Path, base: Path):
        self.venv = venv
        self.dir = base / "jupyter"
        self.home = self.dir / "home"
        self.root = self.dir / "notebooks"
        for d in (self.home, self.root, self.dir / "config", self.dir / "runtime",
                  self.dir / "data"):
            d.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("JUPYTER", "PYTHON", "VIRTUAL_ENV", "SSH_"))}
        self.env.update(HOME=str(self.home), JUPYTER_CONFIG_DIR=str(self.dir / "config"),
                        JUPYTER_RUNTIME_DIR=str(self.dir / "runtime"),
                        JUPYTER_DATA_DIR=str(self.dir / "data"),
                        JUPYTER_PLATFORM_DIRS="1", IPYTHONDIR=str(self.home / ".ipython"),
                        XDG_CONFIG_HOME=str(self.home / ".config"),
                        XDG_CACHE_HOME=str(self.home / ".cache"),
                        XDG_DATA_HOME=str(self.home / ".local" / "share"),
                        XDG_RUNTIME_DIR=str(self.dir / "runtime"))
        self.logfile = self.dir / "jupyter.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.port = S.free_port(JUPYTER_HOST)
        cmd = [str(self.venv / "bin" / "jupyter-lab"), "--no-browser",
               f"--ServerApp.ip={JUPYTER_HOST}", f"--ServerApp.port={self.port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}",
               f"--ServerApp.root_dir={self.root}",
               # nothing that reaches out of the machine
               "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--LabApp.extension_manager=readonly"]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        with self.logfile.open("ab") as err:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         start_new_session=True)
        wait_http(f"http://{JUPYTER_HOST}:{self.port}/api/status?token={TOKEN}", READY_TIMEOUT,
                  "jupyter-lab", self.proc, self.logfile)

    def stop(self) -> None:
        stop_group(self.proc, timeout=10)
        self.proc = None


# ------------------------------------------------------------------------------------------
# tunnels


class Tunneld:
    """python -m tunneld in the temp HOME, driven with python -m tunnelctl (as bench/run.py)."""

    def __init__(self, env: dict[str, str], base: Path):
        self.env = dict(env, TUNNELD_NO_AUTOSTART="1", PYTHONUNBUFFERED="1")
        self.env.pop("TUNNELD_SOCKET", None)
        self.env.pop("TUNNELD_CONFIG", None)
        self.logfile = base / "tunneld.stderr"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        with self.logfile.open("ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "tunneld"], cwd=REPO,
                                         env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tunneld exited with {self.proc.returncode}: "
                                   f"{short(tail(self.logfile), 600)}")
            if self.ctl("status", check=False, timeout=5).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"tunneld did not answer within {timeout:g}s")

    def ctl(self, *args: str, check: bool = True,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "tunnelctl", *args], cwd=REPO, env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"tunnelctl {' '.join(args)[:80]} exited {r.returncode}: "
                               f"{short(r.stderr or r.stdout, 400)}")
        return r

    def hosts(self) -> dict[str, dict]:
        return {h["name"]: h for h in json.loads(self.ctl("list", "--json").stdout)["hosts"]}

    def wait_connected(self, name: str, timeout: float = READY_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        h: dict = {}
        while time.monotonic() < deadline:
            h = self.hosts().get(name, {})
            if h.get("state") == "connected":
                return h
            time.sleep(0.1)
        raise RuntimeError(f"tunneld host {name} not connected within {timeout:g}s: "
                           f"{h.get('state')} {h.get('last_error')}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.ctl("stop", check=False, timeout=30)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                S.stop_process(self.proc)
        self.proc = None


class SshL:
    """ssh -N -L 127.0.0.1:P:127.0.0.2:JUPYTER through ``alias``, aes128-gcm forced."""

    def __init__(self, sshd: S.SSHD, alias: str, jport: int, logfile: Path):
        self.sshd, self.alias, self.jport, self.logfile = sshd, alias, jport, logfile
        self.port = S.free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [self.sshd.ssh_path, "-F", str(self.sshd.config), "-N", "-c", GCM,
               "-o", "ExitOnForwardFailure=yes", "-o", "ControlMaster=no",
               "-o", "ControlPath=none",
               "-L", f"{LOCAL}:{self.port}:{JUPYTER_HOST}:{self.jport}", self.alias]
        with self.logfile.open("ab") as err:
            self.proc = subprocess.Popen(cmd, env=self.sshd.env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        wait_accepts(LOCAL, self.port, self.proc, READY_TIMEOUT, f"ssh -L ({self.alias})",
                     self.logfile)

    def stop(self) -> None:
        S.stop_process(self.proc)
        self.proc = None


# ------------------------------------------------------------------------------------------
# Chromium over the DevTools protocol


class CDP:
    """A minimal Chrome DevTools Protocol client on one websocket (one page target)."""

    def __init__(self, ws: Any):
        self.ws = ws
        self.next_id = 0
        self.pending: dict[int, asyncio.Future] = {}
        self.handlers: list[Any] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                if "id" in msg:
                    fut = self.pending.pop(msg["id"], None)
                    if fut is not None and not fut.done():
                        if "error" in msg:
                            fut.set_exception(RuntimeError(f"CDP error: {msg['error']}"))
                        else:
                            fut.set_result(msg.get("result", {}))
                else:
                    for h in self.handlers:
                        h(msg.get("method"), msg.get("params", {}))
        except Exception as e:  # noqa: BLE001 - the socket closed: fail what waits
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"CDP socket closed: {short(e, 100)}"))

    async def call(self, method: str, timeout: float = CDP_TIMEOUT, **params: Any) -> dict:
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        await self.ws.send(json.dumps({"id": self.next_id, "method": method,
                                       "params": params}))
        return await asyncio.wait_for(fut, timeout)

    async def evaluate(self, expr: str, timeout: float = CDP_TIMEOUT) -> Any:
        r = await self.call("Runtime.evaluate", timeout=timeout, expression=expr,
                            returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {short(json.dumps(r['exceptionDetails']))}")
        return r.get("result", {}).get("value")

    async def close(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(Exception):
            await self.ws.close()
        with contextlib.suppress(BaseException):
            await self.reader


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-default-browser-check",
                "--disable-default-apps", "--disable-extensions", "--mute-audio",
                "--disable-dev-shm-usage", "--window-size=1280,800",
                "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]

#: runs before the page's own scripts: a big Resource Timing buffer, and the time the first
#: Launcher card appears (Jupyter Lab's UI really there)
INJECT = r"""
(() => {
  try { performance.setResourceTimingBufferSize(100000); } catch (e) {}
  if (window.__uiReady !== undefined) return;
  window.__uiReady = 0;
  const check = () => {
    if (!window.__uiReady && document.querySelector('.jp-LauncherCard')) {
      window.__uiReady = performance.now();
    }
    return window.__uiReady;
  };
  const mo = new MutationObserver(() => { if (check()) mo.disconnect(); });
  mo.observe(document, {childList: true, subtree: true});
})();
"""

#: the page's own figures; resources counted "by load" are those whose response ended
#: before the load event started
NAV_JS = r"""
(() => {
  const n = performance.getEntriesByType('navigation')[0];
  if (!n || !n.loadEventEnd) return null;
  const all = performance.getEntriesByType('resource');
  const upTo = (t) => all.filter(e => e.responseEnd <= t);
  const sum = (rs, k) => rs.reduce((a, e) => a + (e[k] || 0), 0);
  const r = upTo(n.loadEventStart);
  return {
    loadEventEnd: n.loadEventEnd, loadEventStart: n.loadEventStart,
    domContentLoadedEventEnd: n.domContentLoadedEventEnd, responseEnd: n.responseEnd,
    responseStart: n.responseStart, requestStart: n.requestStart,
    redirectCount: n.redirectCount, doc_transferSize: n.transferSize,
    doc_encodedBodySize: n.encodedBodySize, protocol: n.nextHopProtocol,
    resources: r.length, transferSize: sum(r, 'transferSize'),
    encodedBodySize: sum(r, 'encodedBodySize'), decodedBodySize: sum(r, 'decodedBodySize'),
    resources_all: all.length, protocols: [...new Set(all.map(e => e.nextHopProtocol))],
    uiReady: window.__uiReady || 0, url: location.pathname,
  };
})()
"""

UI_JS = r"""
(() => {
  const all = performance.getEntriesByType('resource');
  const t = window.__uiReady || 0;
  const r = t ? all.filter(e => e.responseEnd <= t) : all;
  return {uiReady: t, resources: r.length,
          transferSize: r.reduce((a, e) => a + (e.transferSize || 0), 0),
          splash: !!document.getElementById('jupyterlab-splash'),
          title: document.title};
})()
"""


@dataclass
class NetLog:
    """Network.* events of one load, by request id."""
    reqs: dict[str, dict] = field(default_factory=dict)
    failed: int = 0
    load_ts: float | None = None   # Network/Page monotonic timestamp of loadEventFired
    nav_ts: float | None = None    # requestWillBeSent of the document

    def on(self, method: str, p: dict) -> None:
        if method == "Network.requestWillBeSent":
            url = p.get("request", {}).get("url", "")
            if url.startswith("data:"):
                return
            r = self.reqs.setdefault(p["requestId"], {})
            r.update(url=url, start=p.get("timestamp"), type=p.get("type"))
            if p.get("type") == "Document" and self.nav_ts is None:
                self.nav_ts = p.get("timestamp")
            if p.get("redirectResponse"):
                r["redirects"] = r.get("redirects", 0) + 1
        elif method == "Network.responseReceived":
            r = self.reqs.get(p["requestId"])
            if r is not None:
                resp = p.get("response", {})
                r.update(conn=resp.get("connectionId"), reused=resp.get("connectionReused"),
                         timing=resp.get("timing"), status=resp.get("status"),
                         protocol=resp.get("protocol"))
        elif method == "Network.loadingFinished":
            r = self.reqs.get(p["requestId"])
            if r is not None:
                r.update(end=p.get("timestamp"), bytes=p.get("encodedDataLength", 0))
        elif method == "Network.loadingFailed":
            r = self.reqs.get(p["requestId"])
            if r is not None:
                r.update(end=p.get("timestamp"), failed=p.get("errorText"))
                self.failed += 1
        elif method == "Page.loadEventFired":
            if self.load_ts is None:
                self.load_ts = p.get("timestamp")

    def summary(self, until: float | None) -> dict[str, Any]:
        """Requests started before ``until`` (a CDP timestamp; None: all): count, bytes,
        connections, time to first byte on new vs reused connections, most in flight."""
        rs = [r for r in self.reqs.values() if r.get("start") is not None
              and (until is None or r["start"] <= until)]
        done = [r for r in rs if "bytes" in r]
        conns = {r.get("conn") for r in rs if r.get("conn") not in (None, 0)}
        ttfb_new: list[float] = []
        ttfb_reused: list[float] = []
        queued: list[float] = []
        for r in rs:
            t = r.get("timing")
            if not t:
                continue
            if t.get("sendEnd", -1) >= 0 and t.get("receiveHeadersEnd", -1) >= 0:
                v = t["receiveHeadersEnd"] - t["sendEnd"]
                (ttfb_reused if r.get("reused") else ttfb_new).append(v)
            if t.get("requestTime") is not None and r.get("start") is not None:
                # from the page asking to the request being sent on a connection
                queued.append((t["requestTime"] - r["start"]) * 1e3 + max(0.0, t["sendStart"]))
        events = sorted([(r["start"], 1) for r in rs if "end" in r] +
                        [(r["end"], -1) for r in rs if "end" in r])
        most = cur = 0
        for _, d in events:
            cur += d
            most = max(most, cur)
        def med(xs: list[float]) -> float | None:
            return statistics.median(xs) if xs else None
        return {"requests": len(rs), "finished": len(done),
                "bytes": sum(r["bytes"] for r in done), "connections": len(conns),
                "new_conn_requests": len(ttfb_new), "ttfb_new_ms": med(ttfb_new),
                "ttfb_reused_ms": med(ttfb_reused), "queued_ms": med(queued),
                "max_in_flight": most, "failed": sum(1 for r in rs if r.get("failed")),
                "failed_urls": [f"{r['url'].split('?')[0][-80:]}: {r['failed']}"
                                for r in rs if r.get("failed")][:5]}


async def _wait_file(path: Path, proc: subprocess.Popen, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            lines = path.read_text().split()
            if len(lines) >= 2:
                return lines
        await asyncio.sleep(0.05)
    raise RuntimeError(f"chromium: no {path.name} within {timeout:g}s")


async def _page_ws(port: int, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        try:
            _, body = await asyncio.to_thread(http_get, f"http://{LOCAL}:{port}/json/list", 5)
            for t in json.loads(body):
                if t.get("type") == "page" and t.get("webSocketDebuggerUrl"):
                    return t["webSocketDebuggerUrl"]
        except Exception as e:  # noqa: BLE001
            last = short(e, 100)
        await asyncio.sleep(0.05)
    raise RuntimeError(f"chromium: no page target within {timeout:g}s ({last})")


async def one_load(url: str, base: Path, env: dict[str, str], n: int) -> dict[str, Any]:
    """One cold load of ``url`` in a fresh Chromium; its figures."""
    import websockets

    udd = base / f"profile-{n}"
    udd.mkdir(parents=True)
    logfile = base / "chromium.log"
    with logfile.open("ab") as err:
        proc = subprocess.Popen([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={udd}",
                                 "about:blank"], env=env, stdin=subprocess.DEVNULL,
                                stdout=err, stderr=err, start_new_session=True)
    cdp: CDP | None = None
    try:
        port_line = await _wait_file(udd / "DevToolsActivePort", proc, CHROME_START_TIMEOUT)
        ws_url = await _page_ws(int(port_line[0]), proc, CHROME_START_TIMEOUT)
        ws = await asyncio.wait_for(websockets.connect(ws_url, max_size=None,
                                                       ping_interval=None, open_timeout=10),
                                    CHROME_START_TIMEOUT)
        cdp = CDP(ws)
        net = NetLog()
        loaded = asyncio.Event()

        def on(method: str, p: dict) -> None:
            net.on(method, p)
            if method == "Page.loadEventFired":
                loaded.set()

        cdp.handlers.append(on)
        await cdp.call("Page.enable")
        await cdp.call("Network.enable", maxTotalBufferSize=0, maxResourceBufferSize=0)
        await cdp.call("Network.setCacheDisabled", cacheDisabled=True)
        await cdp.call("Network.clearBrowserCache")
        await cdp.call("Network.clearBrowserCookies")
        await cdp.call("Page.addScriptToEvaluateOnNewDocument", source=INJECT)
        t0 = time.perf_counter()
        nav = await cdp.call("Page.navigate", timeout=LOAD_TIMEOUT, url=url)
        if nav.get("errorText"):
            raise RuntimeError(f"navigation failed: {nav['errorText']}")
        await asyncio.wait_for(loaded.wait(), LOAD_TIMEOUT - (time.perf_counter() - t0))
        wall_load = time.perf_counter() - t0
        timing = None
        deadline = time.monotonic() + 10
        while timing is None and time.monotonic() < deadline:
            timing = await cdp.evaluate(NAV_JS)
            if timing is None:
                await asyncio.sleep(0.02)
        if timing is None:
            raise RuntimeError("no Navigation Timing entry with loadEventEnd after the load "
                               "event")
        if timing.get("url") != "/lab":
            raise RuntimeError(f"the page is {timing.get('url')}, not /lab (login page?)")
        at_load = net.summary(net.load_ts)
        ui: dict[str, Any] = {}
        deadline = time.monotonic() + UI_TIMEOUT
        while time.monotonic() < deadline:
            ui = await cdp.evaluate(UI_JS)
            if ui and ui.get("uiReady"):
                break
            await asyncio.sleep(0.05)
        ui_ready = (ui or {}).get("uiReady") or None
        ui_ts = (net.nav_ts + ui_ready / 1e3 if ui_ready and net.nav_ts is not None
                 else None)
        return {"loadEventEnd": timing["loadEventEnd"],
                "domContentLoadedEventEnd": timing["domContentLoadedEventEnd"],
                "responseEnd": timing["responseEnd"], "responseStart": timing["responseStart"],
                "uiReady": ui_ready, "wall_load_ms": wall_load * 1e3,
                "rt_requests": 1 + timing["resources"],
                "rt_transferSize": timing["doc_transferSize"] + timing["transferSize"],
                "rt_encodedBodySize": timing["doc_encodedBodySize"] + timing["encodedBodySize"],
                "rt_decodedBodySize": timing["decodedBodySize"],
                "rt_protocols": timing["protocols"], "redirects": timing["redirectCount"],
                "ui_requests": (1 + ui["resources"]) if ui_ready else None,
                "ui_transferSize": ui.get("transferSize") if ui_ready else None,
                "cdp_load": at_load,
                "cdp_ui": net.summary(ui_ts) if ui_ts else None,
                "failed_requests": net.failed}
    finally:
        if cdp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(cdp.call("Browser.close", timeout=3), 3)
            await cdp.close()
        await asyncio.to_thread(stop_group, proc, 5.0)
        shutil.rmtree(udd, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# a probe outside the browser: what one new connection costs on each path

PROBE_N = 10            # sequential connections per path and RTT
PROBE_TIMEOUT = 10.0    # one socket operation
PROBE_BURST = 6         # connections at once (Chromium's limit per host for HTTP/1.1)


def _read_response(sock: socket.socket, buf: bytearray) -> float:
    """Read one HTTP/1.1 response with a Content-Length; the time its first byte came."""
    t_first = 0.0
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("EOF before the response headers")
        t_first = t_first or time.perf_counter()
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    if not head.startswith(b"HTTP/1.1 200"):
        status = head.split(b"\r\n")[0][:60]
        raise RuntimeError(f"probe answered {status!r}")
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("EOF in the response body")
        rest += chunk
    buf[:] = rest[length:]
    return t_first


def probe(url: str, n: int = PROBE_N) -> dict[str, Any]:
    """``n`` times: connect, GET /api/status, first byte, the whole response (new
    connection); then ``n`` GETs on one kept-alive connection.  Medians in ms."""
    hostport = url.split("/")[2]
    host, port = hostport.rsplit(":", 1)
    req = (f"GET /api/status?token={TOKEN} HTTP/1.1\r\nHost: {hostport}\r\n"
           "Connection: keep-alive\r\n\r\n").encode()
    new_first: list[float] = []
    new_total: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.sendall(req)
            first = _read_response(c, bytearray())
            new_first.append((first - t0) * 1e3)
            new_total.append((time.perf_counter() - t0) * 1e3)
    reused: list[float] = []
    with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        c.sendall(req)
        _read_response(c, buf)
        for _ in range(n):
            t0 = time.perf_counter()
            c.sendall(req)
            _read_response(c, buf)
            reused.append((time.perf_counter() - t0) * 1e3)
    burst = [_burst(host, int(port), req) for _ in range(max(1, n // 2))]
    return {"new_first_byte_ms": statistics.median(new_first),
            "new_total_ms": statistics.median(new_total),
            "reused_ms": statistics.median(reused), "n": n,
            "burst_last_ms": statistics.median(max(b) for b in burst),
            "burst_median_ms": statistics.median(x for b in burst for x in b),
            "new_first_byte_all": new_first, "reused_all": reused, "burst_all": burst}


def _burst(host: str, port: int, req: bytes, k: int = PROBE_BURST) -> list[float]:
    """``k`` connections started at once (as Chromium opens its 6 per host), each
    connect + GET; each one's time (ms)."""
    barrier = threading.Barrier(k)
    times: list[float] = []
    errors: list[str] = []

    def one() -> None:
        try:
            barrier.wait(PROBE_TIMEOUT)
            t0 = time.perf_counter()
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as c:
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                c.sendall(req)
                _read_response(c, bytearray())
                times.append((time.perf_counter() - t0) * 1e3)
        except Exception as e:  # noqa: BLE001
            errors.append(short(e, 100))

    threads = [threading.Thread(target=one, daemon=True) for _ in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PROBE_TIMEOUT * 3)
    if errors or len(times) != k:
        raise RuntimeError(f"burst of {k}: {len(times)} answered, errors {errors[:3]}")
    return times


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) of all threads of ``pid`` so far (schedstat, ns)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    return total / 1e9


# ------------------------------------------------------------------------------------------
# the bench


@dataclass
class Params:
    loads: int
    rtts: list[int]


class Bench:
    def __init__(self, p: Params, jlab_venv: Path, keep: bool):
        self.p = p
        self.jlab_venv = jlab_venv
        self.keep = keep
        self.base = Path(tempfile.mkdtemp(prefix="tunneld-pageload-"))
        self.stack = contextlib.ExitStack()
        self.versions: dict[str, str] = {}
        self.install: dict[str, Any] = {}
        self.urls: dict[int, dict[str, str]] = {}
        self.samples: dict[int, dict[str, list[dict]]] = {}
        self.warmup: dict[int, dict[str, dict]] = {}
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.ciphers: dict[str, str] = {}
        self.load_start = os.getloadavg()
        self.load_end: tuple[float, float, float] | None = None
        self.n = 0
        self.chrome_dir = self.base / "chromium"
        self.chrome_dir.mkdir()
        self.proxies: dict[str, DelayProxy] = {}
        self.pids: dict[int, dict[str, int]] = {}
        self.probes: dict[int, dict[str, Any]] = {}

    def setup(self) -> None:
        v, secs, mark = ensure_jupyterlab(self.jlab_venv)
        installed = secs > 0
        self.install = {"venv": str(self.jlab_venv), "seconds": round(secs, 1),
                        "installed_now": installed, "first_install": mark}
        log(f"jupyterlab {v['jupyterlab']}, jupyter-server {v['jupyter_server']} in "
            f"{self.jlab_venv}" + (f" (installed now in {secs:.1f} s)" if installed
                                   else " (already installed" + (
                                       f", that install took {mark['seconds']} s)"
                                       if mark.get("seconds") else ")")))
        self.versions.update(v)
        self.versions["python"] = platform.python_version()
        r = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=30)
        self.versions["chromium"] = r.stdout.strip().splitlines()[-1] if r.stdout else "?"
        self.sshd = S.SSHD(self.base)
        self.stack.callback(self.sshd.close)
        r = subprocess.run([self.sshd.ssh_path, "-V"], capture_output=True, text=True)
        self.versions["openssh"] = (r.stderr or r.stdout).strip()
        with contextlib.suppress(Exception):
            import asyncssh
            self.versions["asyncssh"] = asyncssh.__version__
        with contextlib.suppress(Exception):
            rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "tunneld",
                                    "tunnelctl"], cwd=REPO, capture_output=True, text=True,
                                   timeout=10).stdout.strip()
            self.versions["tunneld"] = rev + (" + uncommitted changes" if dirty else "")

        self.jupyter = Jupyter(self.jlab_venv, self.base)
        self.stack.callback(self.jupyter.stop)
        self.jupyter.start()
        log(f"jupyter-lab on {JUPYTER_HOST}:{self.jupyter.port} (log {self.jupyter.logfile})")

        # one alias per RTT: 0 straight at sshd, others at a delay proxy in front of it
        host_key = self.sshd.known_hosts.read_text().split()[1:3]
        aliases: dict[int, str] = {}
        for rtt in self.p.rtts:
            alias = f"pagebench-{rtt}"
            if rtt == 0:
                self.sshd.add_alias(alias, Ciphers=GCM)
            else:
                proxy = self.stack.enter_context(DelayProxy((LOCAL, self.sshd.port),
                                                            rtt_ms=rtt))
                self.proxies[f"sshd-{rtt}"] = proxy
                with self.sshd.known_hosts.open("a") as f:
                    f.write(f"[{LOCAL}]:{proxy.port} {host_key[0]} {host_key[1]}\n")
                self.sshd.add_alias(alias, Ciphers=GCM, Port=str(proxy.port))
                log(f"delay proxy {rtt} ms RTT in front of sshd: 127.0.0.1:{proxy.port}")
            aliases[rtt] = alias
        self.sshd.start()
        log(f"sshd on 127.0.0.1:{self.sshd.port} (temp dir {self.base})")

        self.daemon = Tunneld(self.sshd.env, self.base)
        self.stack.callback(self.daemon.stop)
        self.daemon.start()
        jp = self.jupyter.port
        for rtt in self.p.rtts:
            urls: dict[str, str] = {}
            if rtt == 0:
                urls["direct"] = f"http://{JUPYTER_HOST}:{jp}/lab?token={TOKEN}"
            else:
                jproxy = self.stack.enter_context(DelayProxy((JUPYTER_HOST, jp), rtt_ms=rtt))
                self.proxies[f"jupyter-{rtt}"] = jproxy
                urls["direct"] = f"http://{LOCAL}:{jproxy.port}/lab?token={TOKEN}"
            ssh = SshL(self.sshd, aliases[rtt], jp, self.base / f"ssh-{rtt}.stderr")
            self.stack.callback(ssh.stop)
            ssh.start()
            urls["ssh"] = f"http://{LOCAL}:{ssh.port}/lab?token={TOKEN}"
            tport = S.free_port()
            self.daemon.ctl("add", aliases[rtt], f"{tport}:{JUPYTER_HOST}:{jp}")
            h = self.daemon.wait_connected(aliases[rtt])
            self.ciphers[f"tunneld-{rtt}"] = h.get("cipher") or "?"
            wait_accepts(LOCAL, tport, None, READY_TIMEOUT, f"tunneld forward {tport}")
            urls["tunneld"] = f"http://{LOCAL}:{tport}/lab?token={TOKEN}"
            assert ssh.proc is not None and self.daemon.proc is not None
            self.pids[rtt] = {"ssh": ssh.proc.pid, "tunneld": self.daemon.proc.pid}
            for path, u in urls.items():  # each path reaches Jupyter (and is a warm-up)
                wait_http(u.replace("/lab?", "/api/status?"), READY_TIMEOUT,
                          f"{path} at {rtt} ms")
            self.urls[rtt] = urls
            log(f"{rtt} ms: " + ", ".join(f"{k} {u.split('/lab')[0]}" for k, u in urls.items())
                + f"; tunneld cipher {self.ciphers[f'tunneld-{rtt}']}")
        self.ciphers["ssh"] = self.ssh_cipher(aliases[self.p.rtts[0]])

    def ssh_cipher(self, alias: str) -> str:
        r = subprocess.run([self.sshd.ssh_path, "-F", str(self.sshd.config), "-c", GCM, "-v",
                            "-o", "ControlPath=none", alias, "true"], env=self.sshd.env,
                           capture_output=True, text=True, timeout=60)
        for ln in r.stderr.splitlines():
            if "kex: client->server cipher:" in ln:
                return ln.split("cipher:")[1].split()[0]
        return "?"

    def load(self, rtt: int, path: str) -> dict[str, Any]:
        self.n += 1
        env = dict(self.sshd.env)  # HOME and XDG dirs in the temp dir
        env.pop("DISPLAY", None)
        pid = self.pids.get(rtt, {}).get(path)
        c0 = cpu_seconds(pid) if pid else None
        s = asyncio.run(one_load(self.urls[rtt][path], self.chrome_dir, env, self.n))
        c1 = cpu_seconds(pid) if pid else None
        # the tunnel process's CPU over the whole load (Chromium's start and stop included)
        s["tunnel_cpu_ms"] = (c1 - c0) * 1e3 if c0 is not None and c1 is not None else None
        return s

    def run(self) -> None:
        self.setup()
        t0 = time.monotonic()
        for rtt in self.p.rtts:
            urls = self.urls[rtt]
            self.samples[rtt] = {p: [] for p in PATHS}
            self.warmup[rtt] = {}
            log(f"== {rtt} ms RTT: one warm-up load per path, then {self.p.loads} rounds")
            self.probes[rtt] = {}
            for path in PATHS:
                try:
                    pr = self.probes[rtt][path] = probe(urls[path])
                    log(f"  probe {path}: new connection + GET /api/status "
                        f"{pr['new_total_ms']:.1f} ms (first byte {pr['new_first_byte_ms']:.1f}),"
                        f" on an open connection {pr['reused_ms']:.1f} ms, {PROBE_BURST} at once "
                        f"{pr['burst_last_ms']:.1f} ms (the last)")
                except Exception as e:  # noqa: BLE001
                    self.errors.append(f"{rtt} ms, {path}, probe: {short(e)}")
                    log(f"  probe {path}: FAILED {short(e)}")
            for path in PATHS:
                try:
                    s = self.load(rtt, path)
                    self.warmup[rtt][path] = s
                    log(f"  warm-up {path}: load {s['loadEventEnd']:.0f} ms, UI "
                        f"{(s['uiReady'] or 0):.0f} ms, {s['rt_requests']} requests")
                except Exception as e:  # noqa: BLE001 - reported, the rounds go on
                    self.errors.append(f"{rtt} ms, {path}, warm-up: {short(e)}")
                    log(f"  warm-up {path}: FAILED {short(e)}")
            for i in range(self.p.loads):
                if time.monotonic() - t0 > BUDGET:
                    self.notes.append(f"{rtt} ms: stopped after {i} rounds ({BUDGET:g} s "
                                      "budget for all rounds)")
                    break
                order = PATHS[i % 3:] + PATHS[:i % 3]
                for path in order:
                    try:
                        s = self.load(rtt, path)
                        s["round"] = i
                        self.samples[rtt][path].append(s)
                    except Exception as e:  # noqa: BLE001
                        self.errors.append(f"{rtt} ms, {path}, round {i}: {short(e)}")
                        log(f"  round {i} {path}: FAILED {short(e)}")
                log(f"  round {i + 1}: " + ", ".join(
                    f"{p} {s[-1]['loadEventEnd']:.0f}/{(s[-1]['uiReady'] or 0):.0f} ms"
                    for p in order if (s := self.samples[rtt][p])
                    and s[-1].get("round") == i) + " (load/UI)")
        self.load_end = os.getloadavg()

    def close(self) -> None:
        self.stack.close()
        if self.keep:
            log(f"kept {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# report


def metric(samples: list[dict], key: str, fn) -> float | None:
    xs = [s[key] for s in samples if s.get(key) is not None]
    return fn(xs) if xs else None


def sub_metric(samples: list[dict], group: str, key: str, fn) -> float | None:
    xs = [s[group][key] for s in samples if s.get(group) and s[group].get(key) is not None]
    return fn(xs) if xs else None


def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "—"
    if unit == "B":
        return f"{v / 1e6:.2f} MB" if v >= 1e5 else f"{v / 1e3:.1f} kB"
    if abs(v) >= 100 or float(v).is_integer():
        return f"{v:.0f}"
    return f"{v:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def summarize(b: Bench) -> dict[int, dict[str, dict[str, float | None]]]:
    med = statistics.median

    def p90(xs: list[float]) -> float:
        return pct(xs, 90)
    out: dict[int, dict[str, dict[str, float | None]]] = {}
    for rtt, per in b.samples.items():
        out[rtt] = {}
        for path, ss in per.items():
            out[rtt][path] = {
                "n": len(ss),
                "load_median": metric(ss, "loadEventEnd", med),
                "load_p90": metric(ss, "loadEventEnd", p90),
                "dcl_median": metric(ss, "domContentLoadedEventEnd", med),
                "doc_responseEnd_median": metric(ss, "responseEnd", med),
                "ui_median": metric(ss, "uiReady", med),
                "ui_p90": metric(ss, "uiReady", p90),
                "rt_requests": metric(ss, "rt_requests", med),
                "rt_transferSize": metric(ss, "rt_transferSize", med),
                "rt_encodedBodySize": metric(ss, "rt_encodedBodySize", med),
                "cdp_requests": sub_metric(ss, "cdp_load", "requests", med),
                "cdp_bytes": sub_metric(ss, "cdp_load", "bytes", med),
                "ui_requests": metric(ss, "ui_requests", med),
                "ui_transferSize": metric(ss, "ui_transferSize", med),
                "connections": sub_metric(ss, "cdp_load", "connections", med),
                "new_conn_requests": sub_metric(ss, "cdp_load", "new_conn_requests", med),
                "max_in_flight": sub_metric(ss, "cdp_load", "max_in_flight", med),
                "ttfb_new_ms": sub_metric(ss, "cdp_load", "ttfb_new_ms", med),
                "ttfb_reused_ms": sub_metric(ss, "cdp_load", "ttfb_reused_ms", med),
                "queued_ms": sub_metric(ss, "cdp_load", "queued_ms", med),
                "tunnel_cpu_ms": metric(ss, "tunnel_cpu_ms", med),
            }
            pr = b.probes.get(rtt, {}).get(path) or {}
            for k in ("new_first_byte_ms", "new_total_ms", "reused_ms", "burst_last_ms",
                      "burst_median_ms"):
                out[rtt][path][f"probe_{k}"] = pr.get(k)
    return out


ROWS = [
    ("loadEventEnd, median (ms)", "load_median", "", True),
    ("loadEventEnd, p90 (ms)", "load_p90", "", True),
    ("UI ready (first Launcher card), median (ms)", "ui_median", "", True),
    ("UI ready, p90 (ms)", "ui_p90", "", True),
    ("domContentLoadedEventEnd, median (ms)", "dcl_median", "", True),
    ("document responseEnd, median (ms)", "doc_responseEnd_median", "", True),
    ("requests by the load event (Resource Timing, incl. the document)", "rt_requests", "",
     False),
    ("bytes by the load event (transferSize)", "rt_transferSize", "B", False),
    ("requests / bytes by the load event (CDP Network events)", ("cdp_requests", "cdp_bytes"),
     "", False),
    ("requests / bytes by UI ready (Resource Timing)", ("ui_requests", "ui_transferSize"), "",
     False),
    ("HTTP connections opened by the load event", "connections", "", False),
    ("most requests in flight at once", "max_in_flight", "", False),
    ("time to first byte, request on a new connection, median (ms)", "ttfb_new_ms", "", True),
    ("time to first byte, request on a reused connection, median (ms)", "ttfb_reused_ms", "",
     True),
    ("wait before a request is sent (queueing + connect), median (ms)", "queued_ms", "", True),
    ("CPU of the tunnel process per load (ms, median)", "tunnel_cpu_ms", "", True),
    (f"probe: new connection + GET /api/status, median of {PROBE_N} (ms)",
     "probe_new_total_ms", "", True),
    (f"probe: GET /api/status on an open connection, median of {PROBE_N} (ms)",
     "probe_reused_ms", "", True),
    (f"probe: {PROBE_BURST} new connections + GET at once, the last one done, median of "
     f"{PROBE_N // 2} (ms)", "probe_burst_last_ms", "", True),
]


def install_note(inst: dict[str, Any]) -> str:
    if inst.get("installed_now"):
        return f"`pip install jupyterlab` took {inst['seconds']:.0f} s in this run"
    first = inst.get("first_install") or {}
    if first.get("seconds"):
        return (f"installed by an earlier run, `pip install jupyterlab` took "
                f"{first['seconds']:.0f} s then; reused")
    return "already installed"


def report(b: Bench, argv: list[str], status: str) -> tuple[str, dict]:
    summ = summarize(b)
    lines: list[str] = []
    out = lines.append
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    v = b.versions
    wall = time.monotonic() - T_START
    out(SECTION)
    out("")
    le = b.load_end or os.getloadavg()
    out(f"`python bench/pageload.py{' ' + ' '.join(argv) if argv else ''}` — {now}, wall time "
        f"{wall:.0f} s, {os.cpu_count()} CPUs, Linux {platform.release()}; load average at "
        f"start {'/'.join(f'{x:.2f}' for x in b.load_start)}, at end "
        f"{'/'.join(f'{x:.2f}' for x in le)}.")
    out("")
    inst = b.install
    ns = sorted({s["n"] for per in summ.values() for s in per.values()} or {0})
    nloads = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
    out(f"Setup: {v.get('chromium', '?')} (Debian's, headless), jupyterlab "
        f"{v.get('jupyterlab', '?')} with jupyter-server {v.get('jupyter_server', '?')} (own "
        f"venv, {install_note(inst)}), "
        f"{v.get('openssh', '?')}, tunneld {v.get('tunneld', '?')} (asyncssh "
        f"{v.get('asyncssh', '?')}), Python {v.get('python')}. Jupyter listens on "
        f"{JUPYTER_HOST} (the server side's localhost); one throw-away sshd on 127.0.0.1; "
        f"ssh -L with `-c {GCM}`, tunneld with `Ciphers {GCM}` in its Host entry "
        f"(negotiated: ssh {b.ciphers.get('ssh', '?')}; tunneld "
        + ", ".join(f"{b.ciphers[k]} at {k.split('-')[1]} ms" for k in b.ciphers
                    if k.startswith("tunneld-")) + "). "
        f"Each load: a fresh Chromium with a fresh profile (cold cache; also cache disabled "
        f"and cleared over CDP), `/lab?token=…`, figures from the page's own Navigation and "
        f"Resource Timing and from CDP Network events; UI ready = the first Launcher card in "
        f"the DOM (a MutationObserver injected before the page's scripts), from navigation "
        f"start. One unmeasured warm-up load per path, then {nloads} measured loads per path "
        f"and RTT, the paths' order rotated every round. RTT above 0: a delay proxy "
        f"holding every chunk rtt/2 each way (bench/delay.py), in front of sshd for ssh -L "
        f"and tunneld (a second Host alias), in front of Jupyter for direct. Probe rows: "
        f"the same paths without a browser (Python sockets, GET /api/status).")
    out("")
    for rtt in b.p.rtts:
        per = summ.get(rtt)
        if not per:
            continue
        out(f"### {rtt} ms RTT")
        out("")
        out("| metric | direct | ssh -L | tunneld | tunneld ÷ ssh -L |")
        out("|---|---:|---:|---:|---:|")
        for label, key, unit, is_time in ROWS:
            if isinstance(key, tuple):
                cells = []
                for path in PATHS:
                    a, c = per[path].get(key[0]), per[path].get(key[1])
                    cells.append(f"{fmt(a)} / {fmt(c, 'B')}" if a is not None else "—")
                r = ratio(per["tunneld"].get(key[1]), per["ssh"].get(key[1]))
            else:
                cells = [fmt(per[path].get(key), unit) for path in PATHS]
                r = ratio(per["tunneld"].get(key), per["ssh"].get(key))
            out(f"| {label} | " + " | ".join(cells) + f" | {r} |")
        out("| loads measured | " + " | ".join(str(per[p]["n"]) for p in PATHS) + " | |")
        out("")
    goal = []
    for rtt in b.p.rtts:
        per = summ.get(rtt)
        if not per:
            continue
        t, s = per["tunneld"].get("load_median"), per["ssh"].get("load_median")
        if t is not None and s:
            goal.append(f"{rtt} ms: {t / s:.2f}× ({'met' if t / s <= 1.0 else '**not met**'})")
    if goal:
        out("Goal of issue 20, loadEventEnd median tunneld ≤ 1.0× ssh -L: " + "; ".join(goal)
            + ".")
        out("")
    out("Times are from navigation start (ms). Bytes: 1 MB = 10⁶ bytes; transferSize "
        "includes response headers; CDP bytes are encodedDataLength. Time to first byte: "
        "from the request sent to the response headers received (CDP timing), on a new vs a "
        "reused HTTP connection — over a tunnel a new connection is also a new channel. "
        "Direct at RTT > 0: the delay proxy in front of Jupyter also charges each new TCP "
        "connection the handshake's round trip (its upstream connect is made 1.5 RTT after "
        "accepting); the tunnels' own TCP connections to sshd were made before the loads.")
    for n in b.notes:
        out("")
        out(f"- {n}")
    if b.errors:
        out("")
        out(f"Failed loads ({len(b.errors)}):")
        for e in b.errors[:20]:
            out(f"- {e}")
    if status:
        out("")
        out(f"**The run did not finish: {status}**")
    data = {"command": ["python", "bench/pageload.py", *argv], "date": now, "wall_s": wall,
            "params": {"loads": b.p.loads, "rtts": b.p.rtts}, "versions": v,
            "install": b.install, "ciphers": b.ciphers,
            "loadavg_start": b.load_start, "loadavg_end": le, "summary": summ,
            "samples": b.samples, "warmup": b.warmup, "probes": b.probes, "errors": b.errors,
            "notes": b.notes,
            "delay_stats": {k: p.stats for k, p in b.proxies.items()},
            "status": status}
    return "\n".join(lines) + "\n", data


def put_section(path: Path, text: str) -> None:
    """Put ``text`` (a section starting with the line SECTION) into the Markdown file
    ``path``: in place of its section of that heading (that line up to the next line starting
    with "## ", or the end of the file), else appended at the end (the file is created if
    missing).  The rest of the file stays as it was."""
    try:
        md = path.read_text()
    except FileNotFoundError:
        md = ""
    text = text.rstrip("\n") + "\n"
    m = re.search(rf"^{re.escape(SECTION)}[ \t]*$", md, re.M)
    if m:
        nxt = re.compile(r"^## ", re.M).search(md, m.end())
        md = md[:m.start()] + text + ("\n" + md[nxt.start():] if nxt else "")
    else:
        md = (md.rstrip("\n") + "\n\n" if md.strip() else "") + text
    path.write_text(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtts", default="0,50", help="RTTs in ms, comma-separated (default 0,50)")
    ap.add_argument("--loads", type=int, help="measured loads per path and RTT (default 7; "
                    "--quick: 2)")
    ap.add_argument("--quick", action="store_true", help="2 loads per path and RTT; writes "
                    "results-pageload-quick.{md,json}, not results.md")
    ap.add_argument("--jlab-venv", type=Path, default=DEFAULT_JLAB_VENV,
                    help=f"venv holding jupyterlab (created on first use; default "
                    f"{DEFAULT_JLAB_VENV})")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs) and print it")
    args = ap.parse_args()
    try:
        rtts = [int(x) for x in args.rtts.split(",") if x.strip()]
    except ValueError:
        ap.error("--rtts: integers in ms, e.g. 0,50")
    if not rtts or any(r < 0 for r in rtts):
        ap.error("--rtts: at least one RTT, none negative")
    loads = args.loads or (2 if args.quick else 7)
    argv = (["--quick"] if args.quick else []) + \
        (["--rtts", args.rtts] if args.rtts != "0,50" else []) + \
        (["--loads", str(args.loads)] if args.loads else [])
    stem = "results-pageload-quick" if args.quick else "results-pageload"
    if not os.access(CHROMIUM, os.X_OK):
        print(f"{CHROMIUM} not found: apt-get install -y chromium", file=sys.stderr)
        return 1

    def on_term(signum, frame):  # SIGTERM: clean up as for Ctrl-C
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    bench = Bench(Params(loads=loads, rtts=rtts), args.jlab_venv, args.keep)
    status, rc = "", 0
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        status, rc = "interrupted", 130
    except Exception as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        status, rc = f"aborted: {short(e)}", 1
    finally:
        try:
            bench.close()
        finally:
            text, data = report(bench, argv, status)
            if args.quick:
                (BENCH / f"{stem}.md").write_text(text)
                md = f"bench/{stem}.md"
            else:
                put_section(BENCH / "results.md", text)
                md = "its section of bench/results.md"
            (BENCH / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
            sys.stdout.write(text)
            log(f"wrote {md} and bench/{stem}.json ({time.monotonic() - T_START:.0f} s)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
