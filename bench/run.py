#!/usr/bin/env python3
"""tunneld benchmark: direct vs ``ssh -N -L`` vs tunneld vs ``sshtunnel``, side by side.

    python bench/run.py            # full run (a few minutes), writes bench/results.{md,json}
    python bench/run.py --quick    # smaller sizes, one repetition
    python bench/run.py --long-link                 # + the "Long link" section (20/50/100 ms)
    python bench/run.py --long-link 50 --long-link-only --quick   # only that section, quickly

One run starts a throw-away OpenSSH sshd on 127.0.0.1 and target servers on 127.0.0.2 (so the
server's "localhost" is not the client's), then measures every path against the same sshd:

  direct     client -> target, no tunnel (the physical limit)
  ssh -L     OpenSSH client: ssh -F <temp home>/.ssh/config -N -L ... (-c aes128-gcm or default)
  tunneld    python -m tunneld in the temp home, forwards added with python -m tunnelctl add
  sshtunnel  the PyPI package (paramiko), when it is importable

Metrics: bulk throughput (one connection, each direction, forced aes128-gcm and each tool's
default cipher), new-connection latency, concurrency (100 / 1 000 / 10 000 simultaneous
echo connections), small-message ping-pong, daemon memory, `tunnelctl list` wall time.
Long link (``--long-link RTTS``): the same direct / ssh -L / tunneld comparison (aes128-gcm)
through bench/delay.py, a proxy that adds a round trip: direct goes client -> proxy ->
target, the tunnels ssh to a proxy in front of sshd (a host alias ``ll<RTT>`` whose Port is the
proxy's).  Bulk throughput each way, new-connection time, tunneld's RSS during the download,
each tunneld row optionally with a ``max_window`` (``--max-window``); a row without the proxy
and one through it at 0 ms check that the proxy is not the bottleneck.
Each repeated measurement is reported as the median of its repetitions.  Progress goes to
stderr; every process started here is stopped at the end (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import servers as S
from delay import DelayProxy  # noqa: E402

T_START = time.monotonic()
#: where results.md and results.json are written (--results-dir)
RESULTS = BENCH
TARGET_HOST = "127.0.0.2"
LOCAL = "127.0.0.1"
GCM = "aes128-gcm@openssh.com"
MB = 1_000_000

# time and count bounds of every loop
BULK_TIMEOUT = 120.0          # one bulk transfer
OP_TIMEOUT = 10.0             # one socket operation in latency / ping-pong
LOOP_CAP = 15.0               # one latency or ping-pong measurement (fewer samples if hit)
CONC_TIMEOUT = 30.0           # connect, and echo, of one connection in the concurrency test
READY_TIMEOUT = 30.0          # a tunnel becoming usable
FD_MARGIN = 200               # file descriptors kept free besides the N connections


#: sections of results.md written by other tools (bench/soak.py's figures): a new run keeps
#: them, from this heading to the end of the file
KEPT_SECTION = "\n## Chaos soak"


def _kept_sections(path: Path) -> str:
    try:
        text = path.read_text()
    except OSError:
        return ""
    i = text.find(KEPT_SECTION)
    return text[i:] if i >= 0 else ""


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T_START:6.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Params:
    mb: int
    reps: int
    bulk_reps: int
    conn_n: int
    ping_n: int
    conc: list[int]
    conc_reps: int
    list_runs: int
    mem_hosts: int = 10
    mem_ports: int = 100
    mem_conns: int = 1000
    ll_mb: int = 100          # long link: one bulk transfer
    ll_reps: int = 3          # long link: repetitions of the bulk transfers
    ll_conn_n: int = 30       # long link: new connections (each costs 2 round trips or more)


FULL = Params(mb=200, reps=3, bulk_reps=5, conn_n=500, ping_n=2000,
              conc=[100, 1000, 10000], conc_reps=3, list_runs=20)
QUICK = Params(mb=50, reps=1, bulk_reps=1, conn_n=200, ping_n=500,
               conc=[100, 1000, 10000], conc_reps=1, list_runs=10,
               ll_mb=50, ll_reps=1, ll_conn_n=10)


# ------------------------------------------------------------------------------------------
# small helpers


def pct(samples: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(samples)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def short(exc: BaseException | str, limit: int = 160) -> str:
    text = exc if isinstance(exc, str) else (f"{type(exc).__name__}: {exc}" if str(exc)
                                             else type(exc).__name__)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def wait_accepts(port: int, proc: subprocess.Popen | None, timeout: float, what: str,
                 logfile: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: "
                               f"{short(tail(logfile) if logfile else '', 400)}")
        try:
            socket.create_connection((LOCAL, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what}: port {port} did not accept within {timeout:g}s")


def echo_once(host: str, port: int, timeout: float = 5.0) -> None:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"hello")
        if S.recv_exact(s, 5) != b"hello":
            raise RuntimeError("echo returned other bytes")


def free_block(n: int, start: int = 20000, stop: int = 32000,
               avoid: set[int] | None = None) -> int:
    """First port P such that P..P+n-1 are all bindable on 127.0.0.1 (below the ephemeral
    range, so outgoing connections do not take them meanwhile)."""
    avoid = avoid or set()
    p = start
    while p + n <= stop:
        ok = True
        for q in range(p, p + n):
            if q in avoid:
                ok = False
            else:
                with socket.socket() as s:
                    try:
                        s.bind((LOCAL, q))
                    except OSError:
                        ok = False
            if not ok:
                p = q + 1
                break
        if ok:
            return p
    raise RuntimeError(f"no block of {n} free ports in {start}-{stop}")


def proc_usage(pid: int) -> dict[str, int] | None:
    """RSS (KiB) and number of open file descriptors of ``pid``."""
    try:
        return {"rss_kib": S.rss_kib(pid), "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    except (OSError, RuntimeError):
        return None


def cpu_seconds(pids: list[int]) -> float | None:
    """CPU seconds (user + system) used so far by the threads of ``pids``, from the
    scheduler's nanosecond counters (Linux /proc/PID/task/TID/schedstat), or None."""
    if not pids:
        return None
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return None   # the process is gone
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, IndexError, ValueError):
                continue   # a thread that ended meanwhile (its time is lost: an undercount)
    return total / 1e9


def listening(port: int) -> bool:
    """True when something listens on 127.0.0.1:port (Linux /proc; no connection made, so
    no channel is opened through a tunnel)."""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            return any(ln.split()[1] == want and ln.split()[3] == "0A"
                       for ln in list(f)[1:])
    except OSError:
        return False


def wait_listening(port: int, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if listening(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what}: nothing listens on port {port} after {timeout:g}s")


class LogWatch:
    """Lines appended to a log file since the last mark()."""

    def __init__(self, path: Path):
        self.path = path
        self.pos = 0

    def mark(self) -> None:
        try:
            self.pos = self.path.stat().st_size
        except OSError:
            self.pos = 0

    def new(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.pos)
                data = f.read(4_000_000)
        except OSError:
            return []
        return data.decode(errors="replace").splitlines()


def summarize_log(lines: list[str], keep: int = 3) -> dict[str, Any] | None:
    """Counts of WARNING/ERROR-ish lines and a few distinct examples (digits masked)."""
    import re
    bad = [ln for ln in lines if re.search(r"\b(WARNING|ERROR|CRITICAL|error|fatal|"
                                           r"Traceback|refused|failed)\b", ln)]
    if not bad:
        return None
    kinds = collections.Counter(re.sub(r"\d+", "N", ln)[:200] for ln in bad)
    return {"lines": len(bad), "examples": [k for k, _ in kinds.most_common(keep)]}


# ------------------------------------------------------------------------------------------
# measurements (blocking client in this process; the servers run elsewhere)

_PAYLOAD = memoryview(os.urandom(S.CHUNK))


def bulk_upload(host: str, port: int, nbytes: int) -> float:
    """MB/s from the first byte sent to the sink's acknowledgement of the last."""
    with socket.socket() as s:
        S.set_bufs(s)
        s.settimeout(30)
        s.connect((host, port))
        deadline = time.perf_counter() + BULK_TIMEOUT
        t0 = time.perf_counter()
        s.sendall(struct.pack("!Q", nbytes))
        left = nbytes
        while left:
            n = min(S.CHUNK, left)
            s.sendall(_PAYLOAD[:n])
            left -= n
            if time.perf_counter() > deadline:
                raise TimeoutError(f"upload not done within {BULK_TIMEOUT:g}s")
        got = struct.unpack("!Q", S.recv_exact(s, 8))[0]
        t1 = time.perf_counter()
    if got != nbytes:
        raise RuntimeError(f"sink received {got} of {nbytes} bytes")
    return nbytes / (t1 - t0) / MB


def bulk_download(host: str, port: int, nbytes: int) -> float:
    """MB/s from the first byte received to the last."""
    buf = bytearray(S.CHUNK)
    view = memoryview(buf)
    with socket.socket() as s:
        S.set_bufs(s)
        s.settimeout(30)
        s.connect((host, port))
        s.sendall(struct.pack("!Q", nbytes))
        first = s.recv_into(view)
        if not first:
            raise ConnectionError("EOF before the first byte")
        t0 = time.perf_counter()
        deadline = t0 + BULK_TIMEOUT
        got = first
        while got < nbytes:
            n = s.recv_into(view)
            if not n:
                raise ConnectionError(f"EOF after {got} of {nbytes} bytes")
            got += n
            if time.perf_counter() > deadline:
                raise TimeoutError(f"download not done within {BULK_TIMEOUT:g}s")
        t1 = time.perf_counter()
    return (nbytes - first) / (t1 - t0) / MB


def stalled_download(host: str, port: int, nbytes: int, fast: int, stall: float,
                     pids: list[int]) -> dict[str, float]:
    """Read ``fast`` bytes of an ``nbytes`` download at full speed, then nothing for ``stall``
    seconds (what waits for the reader piles up in the tunnel, up to its window), then the
    rest: the tunnel processes' RSS growth at the end of the stall (MiB) and the download's
    MB/s over all of it."""
    buf = bytearray(S.CHUNK)
    view = memoryview(buf)
    before = sum(S.rss_kib(x) for x in pids)
    with socket.socket() as s:
        S.set_bufs(s)
        s.settimeout(30)
        s.connect((host, port))
        s.sendall(struct.pack("!Q", nbytes))
        t0 = time.perf_counter()
        deadline = t0 + BULK_TIMEOUT
        got, held = 0, None
        while got < nbytes:
            if held is None and got >= fast:
                time.sleep(stall)
                held = sum(S.rss_kib(x) for x in pids)
            n = s.recv_into(view)
            if not n:
                raise ConnectionError(f"EOF after {got} of {nbytes} bytes")
            got += n
            if time.perf_counter() > deadline:
                raise TimeoutError(f"download not done within {BULK_TIMEOUT:g}s")
        t1 = time.perf_counter()
    return {"rss_growth_mib": ((held or before) - before) / 1024,
            "mbps": nbytes / (t1 - t0 - stall) / MB}


def new_conn_latency(host: str, port: int, n: int) -> dict[str, Any]:
    """Open, 100-byte echo, close; sequentially, n times (at most LOOP_CAP seconds)."""
    msg = b"x" * 100
    samples: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    end = time.monotonic() + LOOP_CAP
    for _ in range(n):
        if time.monotonic() > end:
            break  # fewer samples: reported as n
        t0 = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=OP_TIMEOUT) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(msg)
                if S.recv_exact(s, 100) != msg:
                    raise RuntimeError("wrong echo")
            samples.append(time.perf_counter() - t0)
        except (OSError, RuntimeError, ConnectionError) as e:
            errors[short(e, 80)] += 1
    if not samples:
        raise RuntimeError(f"no successful connection: {dict(errors)}")
    return {"median_ms": statistics.median(samples) * 1e3, "p99_ms": pct(samples, 99) * 1e3,
            "n": len(samples), "errors": dict(errors)}


def ping_pong(host: str, port: int, n: int, size: int = 64) -> dict[str, Any]:
    """n round trips of ``size`` bytes on one open connection (at most LOOP_CAP seconds)."""
    msg = b"p" * size
    samples: list[float] = []
    with socket.create_connection((host, port), timeout=OP_TIMEOUT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(20):  # warm-up: channel open, caches
            s.sendall(msg)
            S.recv_exact(s, size)
        end = time.monotonic() + LOOP_CAP
        for _ in range(n):
            if time.monotonic() > end:
                break
            t0 = time.perf_counter()
            s.sendall(msg)
            S.recv_exact(s, size)
            samples.append(time.perf_counter() - t0)
    return {"p50_ms": pct(samples, 50) * 1e3, "p99_ms": pct(samples, 99) * 1e3,
            "max_ms": max(samples) * 1e3, "n": len(samples)}


NETSTAT_KEYS = ("ListenOverflows", "ListenDrops", "TCPSynRetrans", "TCPTimeouts")


def netstat() -> dict[str, int]:
    """Selected TcpExt/Tcp counters of /proc/net/netstat and /proc/net/snmp (system-wide)."""
    out: dict[str, int] = {}
    for f in ("/proc/net/netstat", "/proc/net/snmp"):
        try:
            lines = open(f).read().splitlines()
        except OSError:
            continue
        for names, values in zip(lines[::2], lines[1::2]):
            for k, v in zip(names.split()[1:], values.split()[1:]):
                if k in NETSTAT_KEYS or k == "RetransSegs":
                    out[k] = int(v)
    return out


def _event_loop_runner() -> Callable[[Any], Any]:
    try:
        import uvloop
        return uvloop.run
    except ImportError:  # pragma: no cover
        return asyncio.run


async def _concurrent(host: str, port: int, n: int,
                      hold: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Open n connections at once; when every connect has finished, each sends 100 bytes
    and reads them back; then ``hold()`` (if given) runs while all are open; then all close."""
    msg = b"c" * 100
    errors: collections.Counter[str] = collections.Counter()
    pending = n
    all_open = asyncio.Event()
    echoed = 0
    all_echoed = asyncio.Event()
    release = asyncio.Event()
    t_open: list[float] = []

    async def one() -> None:
        nonlocal pending, echoed
        w = None
        phase = "connect"
        try:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(host, port), CONC_TIMEOUT)
            finally:
                pending -= 1
                if pending == 0:
                    t_open.append(time.perf_counter())
                    all_open.set()
            await all_open.wait()
            phase = "echo"
            w.write(msg)
            data = await asyncio.wait_for(r.readexactly(len(msg)), CONC_TIMEOUT)
            if data != msg:
                raise RuntimeError("wrong echo")
        except (TimeoutError, OSError, asyncio.IncompleteReadError, RuntimeError) as e:
            name = type(e).__name__
            if isinstance(e, OSError) and e.errno:
                name += f"[{os.strerror(e.errno)}]"
            errors[f"{phase}: {name}"] += 1
        finally:
            echoed += 1
            if echoed == n:
                all_echoed.set()
            if hold is not None:
                await release.wait()
            if w is not None:
                w.close()

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    await all_echoed.wait()
    t1 = time.perf_counter()
    extra = None
    if hold is not None:
        extra = await hold()
        release.set()
    await asyncio.gather(*tasks)
    await asyncio.sleep(0.2)  # let the closes go out
    return {"total_s": t1 - t0, "connect_s": (t_open[0] - t0) if t_open else None,
            "errors": sum(errors.values()), "error_kinds": dict(errors), "hold": extra}


def concurrency(host: str, port: int, n: int, hold=None) -> dict[str, Any]:
    before = netstat()
    r = _event_loop_runner()(_concurrent(host, port, n, hold))
    after = netstat()
    r["netstat"] = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k)}
    return r


# ------------------------------------------------------------------------------------------
# the paths under test


class Path_:
    """One way from the client to the targets.  ``ports`` maps echo/sink/source to the port
    the client connects to on ``host``; ``error`` is set when the path could not be set up."""

    tool = "?"
    host = LOCAL

    def __init__(self, key: str, variant: str):
        self.key = key
        self.variant = variant
        self.ports: dict[str, int] = {}
        self.error: str | None = None
        self.cipher: str | None = None
        self.logs: list[LogWatch] = []

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def restart(self) -> None:
        self.stop()
        self.start()

    def pids(self) -> list[int]:
        return []


class Direct(Path_):
    tool = "direct"
    host = TARGET_HOST

    def __init__(self, targets: dict[str, int]):
        super().__init__("direct", "-")
        self.ports = dict(targets)
        self.cipher = "none"


class SshL(Path_):
    tool = "ssh"

    def __init__(self, bench: Bench, variant: str):
        super().__init__(f"ssh-{variant}", variant)
        self.b = bench
        self.proc: subprocess.Popen | None = None
        self.logfile = bench.base / f"ssh-{variant}.stderr"
        self.logs = [LogWatch(self.logfile)]

    def command(self, forwards: list[tuple[int, int]], variant: str | None = None) -> list[str]:
        cmd = [self.b.sshd.ssh_path, "-F", str(self.b.sshd.config), "-N",
               "-o", "ExitOnForwardFailure=yes", "-o", "ControlMaster=no"]
        if (variant or self.variant) == "gcm":
            cmd += ["-c", GCM]
        for lport, rport in forwards:
            cmd += ["-L", f"{LOCAL}:{lport}:{TARGET_HOST}:{rport}"]
        return cmd + ["bench"]

    def start(self) -> None:
        t = self.b.targets
        self.ports = {k: S.free_port() for k in t}
        err = self.logfile.open("ab")
        self.proc = subprocess.Popen(
            self.command([(self.ports[k], t[k]) for k in t]), env=self.b.sshd.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True)
        err.close()
        for k in t:
            wait_accepts(self.ports[k], self.proc, READY_TIMEOUT, "ssh -L", self.logfile)
        echo_once(LOCAL, self.ports["echo"], 10)
        if self.cipher is None:
            self.cipher = self.b.ssh_negotiated_cipher(self.variant)

    def stop(self) -> None:
        S.stop_process(self.proc)
        self.proc = None

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []


class Tunneld:
    """A tunneld process in the temp HOME, driven with python -m tunnelctl."""

    def __init__(self, bench: Bench, name: str):
        self.b = bench
        self.env = dict(bench.sshd.env, TUNNELD_NO_AUTOSTART="1", PYTHONUNBUFFERED="1")
        self.env.pop("TUNNELD_SOCKET", None)
        self.env.pop("TUNNELD_CONFIG", None)
        self.logfile = bench.base / f"tunneld-{name}.stderr"
        self.proc: subprocess.Popen | None = None
        bench.daemons.append(self)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> None:
        err = self.logfile.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tunneld"], cwd=REPO, env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=err, start_new_session=True)
        err.close()
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
            timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "tunnelctl", *args], cwd=REPO, env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"tunnelctl {' '.join(args)[:80]} exited {r.returncode}: "
                               f"{short(r.stderr or r.stdout, 400)}")
        return r

    def hosts(self) -> dict[str, dict]:
        return {h["name"]: h for h in json.loads(self.ctl("list", "--json").stdout)["hosts"]}

    def wait_connected(self, names: list[str], timeout: float = READY_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        hosts: dict[str, dict] = {}
        while time.monotonic() < deadline:
            hosts = self.hosts()
            if all(hosts.get(n, {}).get("state") == "connected" for n in names):
                return hosts
            time.sleep(0.1)
        states = {n: (hosts.get(n, {}).get("state"), hosts.get(n, {}).get("last_error"))
                  for n in names}
        raise RuntimeError(f"tunneld hosts not connected within {timeout:g}s: {states}")

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


class TunneldPath(Path_):
    tool = "tunneld"

    def __init__(self, bench: Bench, daemon: Tunneld, variant: str):
        super().__init__(f"tunneld-{variant}", variant)
        self.b = bench
        self.d = daemon
        self.alias = "benchgcm" if variant == "gcm" else "bench"
        self.logs = [LogWatch(daemon.logfile)]

    def start(self) -> None:
        if self.d.proc is None or self.d.proc.poll() is not None:
            self.d.start()
        t = self.b.targets
        if not self.ports:
            self.ports = {k: S.free_port() for k in t}
        self.d.ctl("add", self.alias, *(f"{self.ports[k]}:{TARGET_HOST}:{t[k]}" for k in t))
        host = self.d.wait_connected([self.alias])[self.alias]
        self.cipher = host.get("cipher") or "?"
        echo_once(LOCAL, self.ports["echo"], 10)

    def restart(self) -> None:
        # the daemon serves both tunneld paths: restart it and re-add (a no-op if persisted)
        self.d.stop()
        self.start()

    def pids(self) -> list[int]:
        return [self.d.pid] if self.d.proc else []


class Sshtunnel(Path_):
    tool = "sshtunnel"

    def __init__(self, bench: Bench, variant: str):
        super().__init__(f"sshtunnel-{variant}", variant)
        self.b = bench
        self.proc: subprocess.Popen | None = None
        self.logfile = bench.base / f"sshtunnel-{variant}.stderr"
        self.logs = [LogWatch(self.logfile)]

    @staticmethod
    def spawn(bench: Bench, forwards: list[tuple[int, int]], cipher: str | None,
              logfile: Path, groups: int = 1) -> tuple[subprocess.Popen, dict]:
        cmd = [sys.executable, str(BENCH / "servers.py"), "sshtunnel",
               "--ssh-port", str(bench.sshd.port), "--user", bench.sshd.user,
               "--key", str(bench.sshd.identity), "--groups", str(groups)]
        if cipher:
            cmd += ["--cipher", cipher]
        cmd += [f"{lp}:{TARGET_HOST}:{rp}" for lp, rp in forwards]
        err = logfile.open("ab")
        proc = subprocess.Popen(cmd, env=bench.sshd.env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        err.close()
        line = _readline(proc, READY_TIMEOUT)
        if not line:
            S.stop_process(proc)
            raise RuntimeError(f"sshtunnel did not start: {short(tail(logfile), 400)}")
        info = json.loads(line)
        if info.get("error"):
            S.stop_process(proc)
            raise RuntimeError(info["error"])
        return proc, info

    def start(self) -> None:
        t = self.b.targets
        self.ports = {k: S.free_port() for k in t}
        self.proc, info = self.spawn(self.b, [(self.ports[k], t[k]) for k in t],
                                     GCM if self.variant == "gcm" else None, self.logfile)
        self.cipher = info.get("cipher")
        self.b.versions.update(info.get("versions", {}))
        for k in t:
            wait_accepts(self.ports[k], self.proc, READY_TIMEOUT, "sshtunnel", self.logfile)
        echo_once(LOCAL, self.ports["echo"], 10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        S.stop_process(self.proc, timeout=5)
        self.proc = None

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    import selectors
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if sel.select(timeout):
            return proc.stdout.readline().decode(errors="replace").strip()
        return ""
    finally:
        sel.close()


# ------------------------------------------------------------------------------------------
# long link: the paths through bench/delay.py

LL_SAMPLE = 0.02               # s between two RSS samples during a long-link download
LL_SAMPLES_MAX = 20000         # RSS samples kept at most (BULK_TIMEOUT / LL_SAMPLE is 6000)
LL_STALL = 2.0                 # s a long-link download's reader stops, halfway


class RssSampler:
    """Peak RSS of some processes, sampled from /proc in a thread until stop()."""

    def __init__(self, pids: list[int]):
        import threading
        self.pids = pids
        self.before = sum(S.rss_kib(x) for x in pids)
        self.peak = self.before
        self.n = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(LL_SAMPLE) and self.n < LL_SAMPLES_MAX:
            try:
                v = sum(S.rss_kib(x) for x in self.pids)
            except (OSError, RuntimeError):
                return
            self.n += 1
            self.peak = max(self.peak, v)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._t.join(timeout=5)
        with contextlib.suppress(OSError, RuntimeError):
            self.peak = max(self.peak, sum(S.rss_kib(x) for x in self.pids))
        return {"before_kib": self.before, "peak_kib": self.peak, "samples": self.n}


class LLDirect(Path_):
    """client -> one delay proxy per target port -> target."""

    tool = "direct"

    def __init__(self, host: str, ports: dict[str, int]):
        super().__init__("direct", "-")
        self.host = host
        self.ports = dict(ports)
        self.cipher = "none"


class LLSsh(SshL):
    """ssh -N -L (aes128-gcm) to a host alias whose Port may be a delay proxy's."""

    def __init__(self, bench: Bench, alias: str, tag: str):
        super().__init__(bench, "gcm")
        self.alias = alias
        self.logfile = bench.base / f"ssh-ll-{tag}.stderr"
        self.logs = [LogWatch(self.logfile)]

    def command(self, forwards: list[tuple[int, int]], variant: str | None = None) -> list[str]:
        return super().command(forwards, variant)[:-1] + [self.alias]


def ll_label(rtt: str) -> str:
    return "no proxy" if rtt == "none" else f"{rtt} ms"


def ll_key(window: str | None) -> str:
    return "tunneld-gcm" if window is None else f"tunneld-gcm-mw{window}"


def ll_name(key: str) -> str:
    if key == "direct":
        return "direct"
    if key == "ssh-gcm":
        return "ssh -L"
    if key == "tunneld-gcm":
        return "tunneld"
    return f"tunneld, max_window {key.removeprefix('tunneld-gcm-mw')}"


def parse_rtts(text: str) -> list[str]:
    """"20,50,100" -> ["20", "50", "100"] (ms, as labels: 0.5 stays "0.5")."""
    out = []
    for part in text.split(","):
        part = part.strip().removesuffix("ms").strip()
        if not part:
            continue
        v = float(part)
        if not 0 <= v <= 2000:
            raise argparse.ArgumentTypeError(f"RTT {part} ms: expected 0..2000")
        out.append(f"{v:g}")
    return list(dict.fromkeys(out))


def parse_windows(text: str) -> list[str | None]:
    """"default,2MiB,16MiB" -> [None, "2MiB", "16MiB"] (None: no max_window key written)."""
    import re
    out: list[str | None] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.lower() == "default":
            out.append(None)
        elif re.fullmatch(r"\d+(\.\d+)?\s*([kKmMgG]i?[bB]?|[bB])?", part):
            out.append(part.replace(" ", ""))
        else:
            raise argparse.ArgumentTypeError(f"max_window {part!r}: bytes or e.g. 16MiB")
    return list(dict.fromkeys(out)) or [None]


def toml_size(window: str) -> str:
    return window if window.isdigit() else json.dumps(window)


# ------------------------------------------------------------------------------------------
# results


class Results:
    """metric -> path key -> {"samples": [...], "value": median, "error": str, ...}"""

    def __init__(self) -> None:
        self.metrics: dict[str, dict[str, dict[str, Any]]] = collections.defaultdict(dict)
        self.notes: list[str] = []
        self.logs: dict[str, dict[str, Any]] = {}

    def add(self, metric: str, path: str, sample: float | None = None,
            error: str | None = None, **extra: Any) -> None:
        cell = self.metrics[metric].setdefault(path, {"samples": []})
        if sample is not None:
            cell["samples"].append(sample)
            cell["value"] = statistics.median(cell["samples"])
        if error is not None:
            cell.setdefault("errors_seen", []).append(error)
            if "value" not in cell:
                cell["error"] = error
        for k, v in extra.items():
            cell.setdefault(k, []).append(v)

    def value(self, metric: str, path: str) -> float | None:
        return self.metrics.get(metric, {}).get(path, {}).get("value")

    def cell(self, metric: str, path: str) -> dict[str, Any]:
        return self.metrics.get(metric, {}).get(path, {})


# ------------------------------------------------------------------------------------------
# the bench


class Bench:
    def __init__(self, p: Params, quick: bool, keep: bool, rtts: list[str] | None = None,
                 long_only: bool = False, windows: list[str | None] | None = None):
        self.p = p
        self.rtts = rtts or []           # long link: RTTs (ms, as text); none: no section
        self.long_only = long_only
        self.windows = windows or [None]  # long link: one tunneld row per max_window
        self.long_info: dict[str, Any] | None = None
        self.daemons: list[Tunneld] = []
        self.quick = quick
        self.keep = keep
        self.res = Results()
        self.versions: dict[str, str] = {}
        self.base = Path(tempfile.mkdtemp(prefix="tunneld-bench-"))
        self.stack = contextlib.ExitStack()
        self.sshd: S.SSHD
        self.targets: dict[str, int] = {}
        self.paths: list[Path_] = []
        self.fd_limit = 0
        self._cipher_cache: dict[str, str] = {}
        self.load_start: tuple[float, float, float] | None = None

    # -- setup -------------------------------------------------------------------------------

    def raise_fd_limit(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        log(f"RLIMIT_NOFILE: soft {soft} -> {self.fd_limit} (hard {hard}); children inherit it")

    def setup(self) -> None:
        self.load_start = os.getloadavg()
        self.raise_fd_limit()
        self.sshd = S.SSHD(self.base)
        self.stack.callback(self.sshd.close)
        self.sshd.add_alias("bench")
        self.sshd.add_alias("benchgcm", Ciphers=GCM)
        for k in range(self.p.mem_hosts):
            self.sshd.add_alias(f"mem{k}")
        self.sshd.start()
        log(f"sshd on 127.0.0.1:{self.sshd.port} (temp dir {self.base})")
        tproc = subprocess.Popen([sys.executable, str(BENCH / "servers.py"), "targets",
                                  TARGET_HOST], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=(self.base / "targets.stderr").open("ab"),
                                 start_new_session=True)
        self.stack.callback(S.stop_process, tproc)
        line = _readline(tproc, 20)
        if not line:
            raise RuntimeError(f"target servers did not start: "
                               f"{tail(self.base / 'targets.stderr')}")
        self.targets = json.loads(line)
        log(f"targets on {TARGET_HOST}: {self.targets}")
        self.collect_versions()

        self.daemon = Tunneld(self, "bench")
        self.stack.callback(self.daemon.stop)
        if self.long_only:
            return   # the long-link section sets up its own paths
        have_sshtunnel = importlib.util.find_spec("sshtunnel") is not None
        direct = Direct(self.targets)
        self.paths = [direct]
        for variant in ("gcm", "default"):
            self.paths.append(SshL(self, variant))
            self.paths.append(TunneldPath(self, self.daemon, variant))
            st = Sshtunnel(self, variant)
            if not have_sshtunnel:
                st.error = "not installed"
            self.paths.append(st)
        for path in self.paths:
            self.stack.callback(path.stop)
            if path.error:
                continue
            try:
                path.start()
                log(f"{path.key}: ready (cipher {path.cipher}, ports {path.ports})")
            except Exception as e:  # one path failing must not stop the others
                path.error = short(e, 300)
                log(f"{path.key}: FAILED to start: {path.error}")

    def collect_versions(self) -> None:
        import asyncssh
        v = self.versions
        v["python"] = platform.python_version()
        v["asyncssh"] = asyncssh.__version__
        with contextlib.suppress(ImportError):
            import uvloop
            v["uvloop"] = uvloop.__version__
        r = subprocess.run([self.sshd.ssh_path, "-V"], capture_output=True, text=True)
        v["openssh"] = (r.stderr or r.stdout).strip()
        for mod in ("paramiko", "sshtunnel"):
            with contextlib.suppress(Exception):
                from importlib.metadata import version
                v[mod] = version(mod)
        try:
            rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "tunneld",
                                    "tunnelctl"], cwd=REPO, capture_output=True, text=True,
                                   timeout=10).stdout.strip()
            v["tunneld"] = rev + (" + uncommitted changes" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            v["tunneld"] = "?"

    def ssh_negotiated_cipher(self, variant: str) -> str:
        """What the OpenSSH client negotiates with this sshd (one `ssh -v ... true`)."""
        if variant not in self._cipher_cache:
            cmd = [self.sshd.ssh_path, "-F", str(self.sshd.config), "-v"]
            if variant == "gcm":
                cmd += ["-c", GCM]
            r = subprocess.run(cmd + ["bench", "true"], env=self.sshd.env,
                               capture_output=True, text=True, timeout=30)
            found = "?"
            for ln in r.stderr.splitlines():
                if "kex: client->server cipher:" in ln:
                    found = ln.split("cipher:")[1].split()[0]
            self._cipher_cache[variant] = found
        return self._cipher_cache[variant]

    # -- running one measurement on every path -----------------------------------------------

    def healthy(self, path: Path_) -> bool:
        """Set up and answering an echo; restarts a broken tunnel once."""
        if path.error:
            return False
        try:
            echo_once(path.host, path.ports["echo"], 5)
            return True
        except Exception as e:
            log(f"{path.key}: not answering ({short(e, 80)}); restarting it")
        try:
            path.restart()
            self.res.notes.append(f"{path.key} was restarted once after it stopped answering.")
            return True
        except Exception as e:
            path.error = f"stopped answering, restart failed: {short(e, 200)}"
            log(f"{path.key}: {path.error}")
            return False

    def each(self, paths: list[Path_], metric: str, fn: Callable[[Path_], None],
             rep: int = 0) -> None:
        """Run ``fn`` on every path (rotated by ``rep`` so that no path always follows the
        same one); a failing path records its error and the others go on."""
        k = rep % len(paths) if paths else 0
        for path in paths[k:] + paths[:k]:
            if not self.healthy(path):
                self.res.add(metric, path.key, error=path.error)
                continue
            for lw in path.logs:
                lw.mark()
            try:
                fn(path)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                self.res.add(metric, path.key, error=short(e))
                log(f"  {path.key}: {metric}: ERROR {short(e)}")
            for lw in path.logs:
                s = summarize_log(lw.new())
                if s:
                    self.res.add(metric, path.key, log=s)

    def by_variant(self, variant: str) -> list[Path_]:
        return [p for p in self.paths if p.variant in (variant, "-")]

    # -- the metrics -------------------------------------------------------------------------

    def run_bulk(self) -> None:
        nbytes = self.p.mb * MB
        for rep in range(self.p.bulk_reps):
            for variant in ("gcm", "default"):
                for direction, fn, port in (("up", bulk_upload, "sink"),
                                            ("down", bulk_download, "source")):
                    metric = f"bulk.{direction}.{variant}"

                    def measure(path: Path_) -> None:
                        if path.key == "direct" and variant == "default":
                            # same physical path: reuse the gcm round's numbers
                            return
                        c0 = cpu_seconds(path.pids())
                        v = fn(path.host, path.ports[port], nbytes)
                        c1 = cpu_seconds(path.pids())
                        self.res.add(metric, path.key, v)
                        if c0 is not None and c1 is not None:   # ms per 100 MB
                            self.res.add(f"cpu.{metric}", path.key,
                                         (c1 - c0) * 1e3 * 100 * MB / nbytes)
                        if path.key == "direct":
                            self.res.add(f"bulk.{direction}.default", path.key, v)
                        log(f"  rep {rep + 1} {direction:4} {path.key:18} {v:8.1f} MB/s")
                    self.each(self.by_variant(variant), metric, measure, rep)

    def run_latency(self) -> None:
        for rep in range(self.p.reps):
            for variant in ("gcm", "default"):
                def measure(path: Path_) -> None:
                    if path.key == "direct" and variant == "default":
                        return
                    c0 = cpu_seconds(path.pids())
                    r = new_conn_latency(path.host, path.ports["echo"], self.p.conn_n)
                    c1 = cpu_seconds(path.pids())
                    keys = [variant] + (["default"] if path.key == "direct" else [])
                    for k in keys:
                        self.res.add(f"conn.median.{k}", path.key, r["median_ms"])
                        self.res.add(f"conn.p99.{k}", path.key, r["p99_ms"],
                                     kinds=r["errors"], n=r["n"])
                    q = ping_pong(path.host, path.ports["echo"], self.p.ping_n)
                    c2 = cpu_seconds(path.pids())
                    if c0 is not None and c1 is not None and c2 is not None:  # µs each
                        self.res.add(f"cpu.conn.{variant}", path.key,
                                     (c1 - c0) * 1e6 / max(1, r["n"]))
                        self.res.add(f"cpu.ping.{variant}", path.key,
                                     (c2 - c1) * 1e6 / max(1, q["n"]))
                    for k in keys:
                        self.res.add(f"ping.p50.{k}", path.key, q["p50_ms"])
                        self.res.add(f"ping.p99.{k}", path.key, q["p99_ms"], n=q["n"],
                                     max_ms=q["max_ms"])
                    log(f"  rep {rep + 1} {path.key:18} new conn median {r['median_ms']:.3f}"
                        f" p99 {r['p99_ms']:.3f} ms ({r['n']} ok, errors {r['errors'] or 0});"
                        f" ping p50 {q['p50_ms']:.3f} p99 {q['p99_ms']:.3f} ms")
                self.each(self.by_variant(variant), f"conn.median.{variant}", measure, rep)

    def run_concurrency(self) -> None:
        for n in self.p.conc:
            if n + FD_MARGIN > self.fd_limit:
                msg = (f"N={n} skipped: RLIMIT_NOFILE is {self.fd_limit} (hard limit), "
                       f"{n} connections + {FD_MARGIN} spare descriptors do not fit")
                self.res.notes.append(msg)
                log(msg)
                for path in self.by_variant("gcm"):
                    self.res.add(f"conc.{n}", path.key, error="skipped: fd limit")
                continue
            reps = self.p.conc_reps if n < 10000 else max(1, min(self.p.conc_reps, 2))
            slow: set[str] = set()
            for rep in range(reps):
                def measure(path: Path_) -> None:
                    if path.key in slow:
                        return  # a first round that hit its time limits is not repeated
                    pids = path.pids()
                    before = [proc_usage(x) for x in pids]
                    r = concurrency(path.host, path.ports["echo"], n)
                    time.sleep(0.5 if n >= 1000 else 0.05)  # let the closes settle
                    after = [proc_usage(x) for x in pids]
                    self.res.add(f"conc.{n}", path.key, r["total_s"], errors=r["errors"],
                                 kinds=r["error_kinds"], connect_s=r["connect_s"],
                                 netstat=r["netstat"], usage_before=before,
                                 usage_after=after)
                    if r["total_s"] > CONC_TIMEOUT:
                        slow.add(path.key)
                    log(f"  rep {rep + 1} N={n:<6} {path.key:18} {r['total_s']:7.2f} s, "
                        f"{r['errors']} errors {r['error_kinds'] or ''} "
                        f"netstat {r['netstat']}" +
                        (f"; process rss/fds {before} -> {after}" if pids else ""))
                self.each(self.by_variant("gcm"), f"conc.{n}", measure, rep)

    def run_list_timing(self, label: str) -> None:
        env = self.daemon.env
        n = self.p.list_runs
        cmds = {"python -c pass": [sys.executable, "-c", "pass"],
                "python -m tunnelctl list": [sys.executable, "-m", "tunnelctl", "list"]}
        script = Path(sys.executable).parent / "tunnelctl"
        if script.exists():
            cmds["tunnelctl list (console script)"] = [str(script), "list"]
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for _ in range(n):
            for k, cmd in cmds.items():
                t0 = time.perf_counter()
                r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=30)
                dt = time.perf_counter() - t0
                if r.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd[-2:])} exited {r.returncode}: "
                                       f"{short(r.stderr.decode(errors='replace'))}")
                times[k].append(dt)
        for k, v in times.items():
            self.res.add(f"list.{label}", k, statistics.median(v) * 1e3,
                         all_ms=[round(x * 1e3, 2) for x in v])
        log(f"  list timing ({label}): " + ", ".join(
            f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in times.items()))

    # memory -------------------------------------------------------------------------------

    def _per_conn(self, pid: int, port: int) -> dict[str, Any]:
        """RSS of ``pid`` before, with ``mem_conns`` open idle connections, and after."""
        n = self.p.mem_conns

        async def hold() -> dict[str, int]:
            await asyncio.sleep(1.0)
            return {"rss_open": S.rss_kib(pid)}
        time.sleep(0.5)
        before = S.rss_kib(pid)
        r = concurrency(LOCAL, port, n, hold=hold)
        time.sleep(1.0)
        after = S.rss_kib(pid)
        open_ = r["hold"]["rss_open"]
        return {"rss_before_kib": before, "rss_open_kib": open_, "rss_after_close_kib": after,
                "per_conn_kib": (open_ - before) / n, "errors": r["errors"],
                "error_kinds": r["error_kinds"]}

    def mem_tunneld(self, base_port: int) -> None:
        p = self.p
        # a fresh daemon: take the benchmark's forwards away so they are not restored
        for alias in ("bench", "benchgcm"):
            self.daemon.ctl("remove", alias, check=False)
        self.daemon.stop()
        d = Tunneld(self, "memory")
        self.stack.callback(d.stop)
        d.start()
        time.sleep(0.5)
        rss_empty = S.rss_kib(d.pid)
        aliases = [f"mem{k}" for k in range(p.mem_hosts)]
        t0 = time.monotonic()
        for k, alias in enumerate(aliases):
            a = base_port + k * p.mem_ports
            d.ctl("add", alias, f"{a}-{a + p.mem_ports - 1}:{TARGET_HOST}:"
                  f"{40000 + k * p.mem_ports}-{40000 + (k + 1) * p.mem_ports - 1}")
        d.wait_connected(aliases, timeout=60)
        log(f"  tunneld: {p.mem_hosts} hosts x {p.mem_ports} forwards added and connected in "
            f"{time.monotonic() - t0:.1f} s")
        time.sleep(2.0)
        rss_idle = S.rss_kib(d.pid)
        self.res.add("mem.idle", "tunneld", rss_idle / 1024, rss_empty_kib=rss_empty,
                     per_forward_kib=(rss_idle - rss_empty) / (p.mem_hosts * p.mem_ports))
        log(f"  tunneld RSS: empty {rss_empty / 1024:.1f} MiB, idle with "
            f"{p.mem_hosts * p.mem_ports} forwards {rss_idle / 1024:.1f} MiB")
        echo_port = base_port + p.mem_hosts * p.mem_ports
        d.ctl("add", aliases[0], f"{echo_port}:{TARGET_HOST}:{self.targets['echo']}")
        echo_once(LOCAL, echo_port, 10)
        lw = LogWatch(d.logfile)
        lw.mark()
        r = self._per_conn(d.pid, echo_port)
        self.res.add("mem.per_conn", "tunneld", r["per_conn_kib"], **{
            k: v for k, v in r.items() if k != "per_conn_kib"})
        if (s := summarize_log(lw.new())):
            self.res.add("mem.per_conn", "tunneld", log=s)
        log(f"  tunneld per open connection: {r['per_conn_kib']:.1f} KiB "
            f"({r['errors']} errors)")
        try:
            self.run_list_timing(f"{p.mem_hosts * p.mem_ports}fwd")
        except Exception as e:
            self.res.add(f"list.{p.mem_hosts * p.mem_ports}fwd", "python -m tunnelctl list",
                         error=short(e))
        d.stop()

    def mem_ssh(self, base_port: int) -> None:
        p = self.p
        procs = []
        helper = SshL(self, "gcm")
        try:
            for k in range(p.mem_hosts):
                a = base_port + k * p.mem_ports
                fwds = [(a + i, 40000 + k * p.mem_ports + i) for i in range(p.mem_ports)]
                if k == 0:
                    fwds.append((base_port + p.mem_hosts * p.mem_ports, self.targets["echo"]))
                err = (self.base / "ssh-memory.stderr").open("ab")
                procs.append(subprocess.Popen(
                    helper.command(fwds, "default"), env=self.sshd.env,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                    start_new_session=True))
                err.close()
            echo_port = base_port + p.mem_hosts * p.mem_ports
            for k, proc in enumerate(procs):
                wait_listening(base_port + k * p.mem_ports + p.mem_ports - 1, proc,
                               READY_TIMEOUT, "ssh -L (memory)")
            wait_listening(echo_port, procs[0], READY_TIMEOUT, "ssh -L (memory)")
            time.sleep(2.0)
            rss = [S.rss_kib(pr.pid) for pr in procs]
            self.res.add("mem.idle", "ssh", sum(rss) / 1024, per_process_kib=rss)
            log(f"  ssh -L RSS: {p.mem_hosts} processes x {p.mem_ports} forwards: "
                f"{sum(rss) / 1024:.1f} MiB in all")
            echo_once(LOCAL, echo_port, 10)
            r = self._per_conn(procs[0].pid, echo_port)
            self.res.add("mem.per_conn", "ssh", r["per_conn_kib"], **{
                k: v for k, v in r.items() if k != "per_conn_kib"})
            log(f"  ssh -L per open connection: {r['per_conn_kib']:.1f} KiB "
                f"({r['errors']} errors)")
        finally:
            for proc in procs:
                S.stop_process(proc)

    def mem_sshtunnel(self, base_port: int) -> None:
        p = self.p
        fwds = []
        for k in range(p.mem_hosts):
            a = base_port + k * p.mem_ports
            fwds += [(a + i, 40000 + k * p.mem_ports + i) for i in range(p.mem_ports)]
        proc, _ = Sshtunnel.spawn(self, fwds, None, self.base / "sshtunnel-memory.stderr",
                                  groups=p.mem_hosts)
        try:
            time.sleep(2.0)
            rss = S.rss_kib(proc.pid)
            self.res.add("mem.idle", "sshtunnel", rss / 1024)
            log(f"  sshtunnel RSS idle with {len(fwds)} forwards: {rss / 1024:.1f} MiB")
        finally:
            if proc.stdin:
                proc.stdin.close()
            S.stop_process(proc, timeout=5)
        # per connection: through the running sshtunnel path's echo forward
        st = next((x for x in self.paths if x.key == "sshtunnel-default"), None)
        if st is not None and self.healthy(st):
            r = self._per_conn(st.pids()[0], st.ports["echo"])
            self.res.add("mem.per_conn", "sshtunnel", r["per_conn_kib"], **{
                k: v for k, v in r.items() if k != "per_conn_kib"})
            log(f"  sshtunnel per open connection: {r['per_conn_kib']:.1f} KiB "
                f"({r['errors']} errors)")

    def run_memory(self) -> None:
        p = self.p
        need = p.mem_hosts * p.mem_ports + 1
        if p.mem_conns + FD_MARGIN > self.fd_limit:
            p.mem_conns = max(10, self.fd_limit - FD_MARGIN)
            self.res.notes.append(f"per-connection memory measured with {p.mem_conns} "
                                  "connections (fd limit)")
        base = free_block(need)
        for name, fn in (("tunneld", self.mem_tunneld), ("ssh", self.mem_ssh),
                         ("sshtunnel", self.mem_sshtunnel)):
            if name == "sshtunnel" and importlib.util.find_spec("sshtunnel") is None:
                self.res.add("mem.idle", name, error="not installed")
                self.res.add("mem.per_conn", name, error="not installed")
                continue
            log(f"memory: {name}")
            try:
                fn(base)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                log(f"  memory {name}: ERROR {short(e, 300)}")
                for m in ("mem.idle", "mem.per_conn"):
                    if not self.res.cell(m, name).get("samples"):
                        self.res.add(m, name, error=short(e))
            time.sleep(0.5)

    # long link ------------------------------------------------------------------------------

    def _proxy_alias(self, rtt: str, port: int) -> str:
        """A host alias ll<RTT> for sshd behind the delay proxy on ``port`` (aes128-gcm), and
        sshd's host key known under that port."""
        alias = f"ll{rtt.replace('.', '_')}"
        self.sshd.add_alias(alias, Port=str(port), Ciphers=GCM)
        key = self.sshd.known_hosts.read_text().splitlines()[0].split()[1:3]
        with self.sshd.known_hosts.open("a") as f:
            f.write(f"[127.0.0.1]:{port} {' '.join(key)}\n")
        return alias

    def _ll_daemon(self, tag: str, window: str | None) -> Tunneld:
        """A fresh tunneld of its own state (no forward restored from another row) and its
        own config.toml: ``[defaults] max_window`` when ``window`` is given, else none."""
        d = Tunneld(self, f"ll-{tag}")
        self.stack.callback(d.stop)
        conf = self.base / f"ll-config-{tag}.toml"
        if window is not None:
            conf.write_text(f"[defaults]\nmax_window = {toml_size(window)}\n")
        d.env["TUNNELD_CONFIG"] = str(conf)   # a missing file is an empty config
        d.env["XDG_STATE_HOME"] = str(self.base / "ll-state" / tag)
        return d

    def _ll_measure(self, rtt: str, path: Path_) -> None:
        """Every long-link metric of one path (download first: its RSS growth is then not
        hidden by memory an earlier transfer left allocated)."""
        pre = f"long.{rtt}"
        nbytes = self.p.ll_mb * MB
        for rep in range(self.p.ll_reps):
            for direction, fn, port in (("down", bulk_download, "source"),
                                        ("up", bulk_upload, "sink")):
                metric = f"{pre}.bulk.{direction}"
                if not self.healthy(path):
                    self.res.add(metric, path.key, error=path.error)
                    continue
                try:
                    pids = path.pids()
                    sampler = RssSampler(pids) if pids else None
                    c0 = cpu_seconds(pids)
                    try:
                        v = fn(path.host, path.ports[port], nbytes)
                    finally:
                        rss = sampler.stop() if sampler else None
                    c1 = cpu_seconds(pids)
                    extra: dict[str, Any] = {}
                    if c0 is not None and c1 is not None:
                        extra["cpu_ms_per_100MB"] = (c1 - c0) * 1e3 * 100 * MB / nbytes
                    if rss:
                        extra["rss"] = rss
                    self.res.add(metric, path.key, v, **extra)
                    msg = f"  {ll_label(rtt):8} rep {rep + 1} {direction:4} {path.key:22} " \
                          f"{v:8.1f} MB/s"
                    if rss:
                        msg += (f", RSS {rss['before_kib'] / 1024:.1f} -> peak "
                                f"{rss['peak_kib'] / 1024:.1f} MiB")
                        if direction == "down":
                            self.res.add(f"{pre}.rss.down", path.key, rss["peak_kib"] / 1024)
                            self.res.add(f"{pre}.rss.busy", path.key,
                                         (rss["peak_kib"] - rss["before_kib"]) / 1024)
                    log(msg)
                except KeyboardInterrupt:
                    raise
                except Exception as e:
                    self.res.add(metric, path.key, error=short(e))
                    log(f"  {ll_label(rtt)} {path.key}: {metric}: ERROR {short(e)}")
        pids = path.pids()
        if pids and self.healthy(path):
            try:  # a reader that stops: what the tunnel holds for it (its window, at most)
                r = stalled_download(path.host, path.ports["source"], nbytes, nbytes // 2,
                                     LL_STALL, pids)
                self.res.add(f"{pre}.rss.stalled", path.key, r["rss_growth_mib"])
                log(f"  {ll_label(rtt):8} {path.key:22} reader stopped {LL_STALL:g}s after "
                    f"{nbytes // 2 // MB} MB: RSS +{r['rss_growth_mib']:.1f} MiB")
            except KeyboardInterrupt:
                raise
            except Exception as e:
                self.res.add(f"{pre}.rss.stalled", path.key, error=short(e))
                log(f"  {ll_label(rtt)} {path.key}: stalled reader: ERROR {short(e)}")
        if not self.healthy(path):
            self.res.add(f"{pre}.conn.median", path.key, error=path.error)
            return
        try:
            r = new_conn_latency(path.host, path.ports["echo"], self.p.ll_conn_n)
            self.res.add(f"{pre}.conn.median", path.key, r["median_ms"], n=r["n"])
            self.res.add(f"{pre}.conn.p99", path.key, r["p99_ms"], kinds=r["errors"],
                         n=r["n"])
            log(f"  {ll_label(rtt):8} {path.key:22} new conn median {r['median_ms']:.2f} "
                f"p99 {r['p99_ms']:.2f} ms ({r['n']} ok, errors {r['errors'] or 0})")
        except KeyboardInterrupt:
            raise
        except Exception as e:
            self.res.add(f"{pre}.conn.median", path.key, error=short(e))
            log(f"  {ll_label(rtt)} {path.key}: new conn: ERROR {short(e)}")

    def run_long_link(self) -> None:
        """For each RTT ("none": no proxy, "0": the proxy's own cost, then the long links):
        direct, ssh -L and each tunneld row, one path at a time, each through its own delay
        proxies (one per target port for direct, one in front of sshd for the tunnels)."""
        for d in self.daemons:   # one daemon at a time per runtime dir
            d.stop()
        rtts = ["none", "0"] + [r for r in self.rtts if r not in ("none", "0")]
        info: dict[str, Any] = {
            "rtts_ms": rtts, "max_windows": self.windows, "mb": self.p.ll_mb,
            "reps": self.p.ll_reps, "conn_n": self.p.ll_conn_n,
            "paths": {"direct": "direct", "ssh-gcm": "ssh -L", **{
                ll_key(w): ll_name(ll_key(w)) for w in self.windows}},
            "max_window_by_path": {ll_key(w): w for w in self.windows},
            "proxy": {"handshake_delay_rtt": 1.5, "queue_mib": 64},
            "proxy_stats": {}}
        self.long_info = info
        for rtt in rtts:
            log(f"== long link: {ll_label(rtt)}")
            proxies: dict[str, DelayProxy] = {}
            try:
                if rtt == "none":
                    host, ports, alias = TARGET_HOST, dict(self.targets), "benchgcm"
                else:
                    ends = {k: (TARGET_HOST, v) for k, v in self.targets.items()}
                    ends["sshd"] = (LOCAL, self.sshd.port)
                    for k, end in ends.items():
                        proxies[k] = DelayProxy(end, float(rtt), stderr_path=self.base /
                                                f"delay-{rtt}-{k}.stderr")
                        self.stack.callback(proxies[k].stop)
                        proxies[k].start()
                    host = LOCAL
                    ports = {k: proxies[k].port for k in self.targets}
                    alias = self._proxy_alias(rtt, proxies["sshd"].port)
                paths: list[Path_] = [LLDirect(host, ports), LLSsh(self, alias, rtt)]
                for w in self.windows:
                    tag = f"{rtt}-{w or 'default'}"
                    tp = TunneldPath(self, self._ll_daemon(tag, w), "gcm")
                    tp.key, tp.alias = ll_key(w), alias
                    paths.append(tp)
                for path in paths:
                    try:
                        path.start()
                        log(f"  {path.key}: ready (cipher {path.cipher})")
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:
                        path.error = short(e, 300)
                        log(f"  {path.key}: FAILED to start: {path.error}")
                    for lw in path.logs:
                        lw.mark()
                    if not path.error:
                        self._ll_measure(rtt, path)
                    for lw in path.logs:
                        if (sm := summarize_log(lw.new())):
                            self.res.add(f"long.{rtt}.bulk.down", path.key, log=sm)
                    if path.error:
                        for m in ("bulk.down", "bulk.up", "conn.median"):
                            if not self.res.cell(f"long.{rtt}.{m}", path.key):
                                self.res.add(f"long.{rtt}.{m}", path.key, error=path.error)
                    if isinstance(path, TunneldPath):
                        path.d.stop()
                    else:
                        path.stop()
            finally:
                for k, px in proxies.items():
                    st = px.stop()
                    if st:
                        info["proxy_stats"].setdefault(rtt, {})[k] = st

    # -- the whole run -----------------------------------------------------------------------

    def run(self) -> None:
        self.setup()
        if self.long_only:
            self.run_long_link()
            return
        stages = [("bulk throughput", self.run_bulk),
                  ("new-connection latency and ping-pong", self.run_latency),
                  ("concurrency", self.run_concurrency)]
        for name, fn in stages:
            log(f"== {name}")
            fn()
        log("== tunnelctl list timing")
        try:
            if not self.healthy(next(p for p in self.paths if p.key == "tunneld-gcm")):
                raise RuntimeError("tunneld is not running")
            self.run_list_timing("bench")
        except Exception as e:
            self.res.add("list.bench", "python -m tunnelctl list", error=short(e))
            log(f"  list timing: ERROR {short(e)}")
        # the comparison's tunnels are no longer needed (except sshtunnel's, reused below)
        for path in self.paths:
            if path.tool == "ssh":
                path.stop()
        log("== memory")
        self.run_memory()
        if self.rtts:
            self.run_long_link()

    def close(self) -> None:
        self.stack.close()
        for f in sorted(self.base.glob("*.stderr")) + [self.base / "sshd" / "sshd.log"]:
            lines = LogWatch(f).new()
            s = summarize_log(lines, keep=4)
            if s:
                s["total_lines"] = len(lines)
                self.res.logs[str(f.relative_to(self.base))] = s
        if self.keep:
            log(f"kept {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# report

COLS = [("direct", "direct"), ("ssh", "ssh -L"), ("tunneld", "tunneld"),
        ("sshtunnel", "sshtunnel")]


def fmt_num(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def issue_targets(res: Results, p: Params) -> list[dict[str, str]]:
    """The targets of issue 5, each with the measured value and whether it is met."""
    rows = []

    def r(metric: str, a: str, b: str) -> float | None:
        x, y = res.value(metric, a), res.value(metric, b)
        return x / y if x is not None and y else None

    def add(target: str, value: float | None, ok: Callable[[float], bool], fmt: str) -> None:
        rows.append({"target": target,
                     "measured": "—" if value is None else fmt.format(value),
                     "met": "—" if value is None else ("yes" if ok(value) else "**no**")})

    for d, name in (("up", "upload"), ("down", "download")):
        add(f"{name} ≥ 1.0× ssh -L, aes128-gcm both", r(f"bulk.{d}.gcm", "tunneld-gcm",
                                                        "ssh-gcm"), lambda v: v >= 1.0,
            "{:.3f}×")
    for d, name in (("up", "upload"), ("down", "download")):
        add(f"{name}, tunneld default ≥ ssh -L default",
            r(f"bulk.{d}.default", "tunneld-default", "ssh-default"), lambda v: v >= 1.0,
            "{:.3f}×")
    add("new-connection latency (median) ≤ 1.0× ssh -L",
        r("conn.median.gcm", "tunneld-gcm", "ssh-gcm"), lambda v: v <= 1.0, "{:.3f}×")
    add("new-connection latency p99 ≤ 1.0× ssh -L",
        r("conn.p99.gcm", "tunneld-gcm", "ssh-gcm"), lambda v: v <= 1.0, "{:.3f}×")
    add("ping-pong p99 ≤ 1.0× ssh -L", r("ping.p99.gcm", "tunneld-gcm", "ssh-gcm"),
        lambda v: v <= 1.0, "{:.3f}×")
    big = max(p.conc)
    c = res.cell(f"conc.{big}", "tunneld-gcm")
    errs = c.get("errors")
    add(f"{big} concurrent channels on one connection, zero errors",
        max(errs) if errs else None, lambda v: v == 0, "{:.0f} errors (worst repetition)")
    add("`tunnelctl list` ≤ 3× `python -c pass`",
        r("list.bench", "python -m tunnelctl list", "python -c pass"), lambda v: v <= 3.0,
        "{:.3f}×")
    return rows


#: the long-link section of results.md: from this heading to the next "## " heading
LONG_SECTION = "\n## Long link"
LL_METRICS = [("upload (MB/s)", "bulk.up", True), ("download (MB/s)", "bulk.down", True),
              ("new conn, median (ms)", "conn.median", False),
              ("new conn, p99 (ms)", "conn.p99", False),
              ("RSS peak in download (MiB)", "rss.down", False),
              ("RSS growth in download (MiB)", "rss.busy", False),
              ("RSS growth, reader stopped (MiB)", "rss.stalled", False)]


def _section_span(text: str, heading: str) -> tuple[int, int] | None:
    i = text.find(heading)
    if i < 0:
        return None
    j = text.find("\n## ", i + 1)
    return i, (j if j >= 0 else len(text))


def _old_long_link() -> tuple[str, dict[str, Any]]:
    """The long-link section of the current results.md and its part of results.json (kept
    by a run without --long-link, as KEPT_SECTION is)."""
    text = ""
    with contextlib.suppress(OSError):
        md = (RESULTS / "results.md").read_text()
        if (span := _section_span(md, LONG_SECTION)):
            text = md[span[0]:span[1]]
    data: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        old = json.loads((RESULTS / "results.json").read_text())
        if old.get("long_link"):
            data = {"long_link": old["long_link"],
                    "metrics": {k: v for k, v in old.get("metrics", {}).items()
                                if k.startswith("long.")}}
    return text, data


def long_link_section(b: Bench, argv: list[str], now: str) -> list[str]:
    res, info = b.res, b.long_info or {}
    lines: list[str] = []
    out = lines.append
    rtts = info.get("rtts_ms", [])
    keys = list(info.get("paths", {}))
    tkeys = [k for k in keys if k.startswith("tunneld")]

    def val(rtt: str, m: str, key: str) -> float | None:
        return res.value(f"long.{rtt}.{m}", key)

    def cell(rtt: str, m: str, key: str) -> str:
        c = res.cell(f"long.{rtt}.{m}", key)
        if "value" in c:
            return fmt_num(c["value"])
        if c.get("error") and m in ("bulk.up", "bulk.down", "conn.median"):
            return f"error: {short(c['error'], 60)}"
        return "—"

    def ratio(rtt: str, m: str, a: str, b_: str) -> str:
        x, y = val(rtt, m, a), val(rtt, m, b_)
        return "—" if x is None or not y else f"{x / y:.2f}×"

    out(LONG_SECTION.strip() + " (a round trip added by bench/delay.py; aes128-gcm)")
    out("")
    out(f"`python bench/run.py{' ' + ' '.join(argv) if argv else ''}` — {now}; load average "
        f"at start {'/'.join(f'{x:.2f}' for x in b.load_start or ())}. "
        f"Direct: client → delay proxy → target; ssh -L and tunneld: ssh to a delay proxy "
        f"in front of sshd (host alias `ll<RTT>`), the target behind sshd on the server's "
        f"loopback. Each direction of each connection is delivered RTT/2 late; the TCP "
        f"handshake costs 1.5 RTT more (a new direct connection takes 2 RTT, as on a real "
        f"link); TCP's own window is not modelled (up to 64 MiB in flight per direction). "
        f"Bulk: one connection, {info.get('mb')} MB, median of {info.get('reps')} "
        f"(download first); new connection = open + 100-byte echo + close, "
        f"{info.get('conn_n')}× sequentially; RSS of the tunnel process sampled every "
        f"{LL_SAMPLE * 1e3:.0f} ms during the download (growth = peak − RSS just before); "
        f"reader stopped: one more download whose reader stops for {LL_STALL:g} s halfway, "
        f"the tunnel's RSS growth at the end of the stop (what it holds for a reader that "
        f"does not read: its window at most, plus the kernel's socket buffers). "
        f"\"no proxy\" and \"0 ms\" are loopback without and through the proxy: the proxy's "
        f"own cost.")
    out("")
    out("| RTT | path | " + " | ".join(m[0] for m in LL_METRICS) + " |")
    out("|---|---|" + "---:|" * len(LL_METRICS))
    for rtt in rtts:
        lab = ll_label(rtt)
        for k in keys:
            out(f"| {lab} | {ll_name(k)} | " +
                " | ".join(cell(rtt, m, k) for _, m, _ in LL_METRICS) + " |")
        for t in tkeys:
            for base, bname in (("ssh-gcm", "ssh -L"), ("direct", "direct")):
                out(f"| {lab} | {ll_name(t)} ÷ {bname} | " + " | ".join(
                    ratio(rtt, m, t, base) if (base == "ssh-gcm" or not m.startswith("rss"))
                    else "—" for _, m, _ in LL_METRICS) + " |")
    out("")
    # the proxy's own cost: 0 ms through it ÷ no proxy
    if "none" in rtts and "0" in rtts:
        parts = []
        for k in keys:
            r = []
            for d, name in (("up", "upload"), ("down", "download")):
                x, y = val("0", f"bulk.{d}", k), val("none", f"bulk.{d}", k)
                if x is not None and y:
                    r.append(f"{name} {fmt_num(y)} → {fmt_num(x)} MB/s ({x / y:.2f}×)")
            if r:
                parts.append(f"{ll_name(k)}: " + ", ".join(r))
        if parts:
            out("Proxy check (no proxy → through the proxy at 0 ms): " + "; ".join(parts) +
                ".")
            out("")
    stats = info.get("proxy_stats", {})
    notes = []
    mib = 1 << 20
    for rtt, per in stats.items():
        sshd = per.get("sshd", {})
        direct = [s for k, s in per.items() if k != "sshd"]
        dpeak = max((s.get("peak_queue", 0) for s in direct), default=0)
        dfull = sum(s.get("queue_full", 0) for s in direct)
        notes.append(f"{ll_label(rtt)}: in front of sshd peak queue "
                     f"{sshd.get('peak_queue', 0) / mib:.1f} MiB, "
                     f"{sshd.get('queue_full', 0)} pause(s) at 64 MiB, timers late by up to "
                     f"{sshd.get('max_late_ms', 0):.0f} ms; direct's: peak "
                     f"{dpeak / mib:.1f} MiB, {dfull} pause(s), late by up to "
                     f"{max((s.get('max_late_ms', 0) for s in direct), default=0):.0f} ms")
    if notes:
        out("Delay proxies: " + "; ".join(notes) + ". A pause at 64 MiB in front of sshd "
            "would mean the proxy, not the tunnel, limited a transfer; on direct's it is the "
            "link being full (64 MiB per RTT/2). Upload times include one round trip (the "
            "sink's acknowledgement), download times start at the first byte.")
        out("")
    obs = []
    for metric, cells in res.metrics.items():
        if not metric.startswith("long."):
            continue
        for key, c in cells.items():
            for entry in c.get("log", []):
                obs.append(f"{ll_name(key)}, {metric}: {entry['lines']} warning/error log "
                           f"line(s), e.g. `{entry['examples'][0][:150]}`")
            kinds: collections.Counter[str] = collections.Counter()
            for k in c.get("kinds", []):
                kinds.update(k)
            if kinds:
                obs.append(f"{ll_name(key)}, {metric}: client errors " +
                           ", ".join(f"{k} × {n}" for k, n in kinds.most_common()))
            for e in c.get("errors_seen", []):
                obs.append(f"{ll_name(key)}, {metric}: {e}")
    for o in list(dict.fromkeys(obs))[:20]:
        out(f"- {o}")
    if obs:
        out("")
    return lines


def long_link_json(b: Bench, argv: list[str], now: str) -> dict[str, Any]:
    return dict(b.long_info or {}, command=["python", "bench/run.py", *argv], date=now,
                loadavg_start=b.load_start, loadavg_end=os.getloadavg(), versions=b.versions,
                metrics_prefix="long.<rtt>.{bulk.up,bulk.down,conn.median,conn.p99,"
                               "rss.down,rss.busy,rss.stalled}")


def write_long_only(b: Bench, wall: float, argv: list[str]) -> None:
    """--long-link-only: replace (or insert) the long-link section of results.md and its
    part of results.json; the rest of both files stays as it was."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = "\n" + "\n".join(long_link_section(b, argv, now))
    md_path = RESULTS / "results.md"
    try:
        md = md_path.read_text()
    except OSError:
        md = "# tunneld benchmark results\n"
    if (span := _section_span(md, LONG_SECTION)):
        md = md[:span[0]] + section.rstrip("\n") + "\n" + md[span[1]:]
    else:
        at = next((i for i in (md.find("\n## Targets of issue 5"), md.find(KEPT_SECTION))
                   if i >= 0), len(md.rstrip("\n")))
        md = md[:at] + section.rstrip("\n") + "\n" + md[at:]
    md_path.write_text(md)
    js_path = RESULTS / "results.json"
    try:
        data = json.loads(js_path.read_text())
    except (OSError, ValueError):
        data = {}
    metrics = {k: v for k, v in data.get("metrics", {}).items() if not k.startswith("long.")}
    metrics.update({k: v for k, v in b.res.metrics.items() if k.startswith("long.")})
    data["metrics"] = metrics
    data["long_link"] = dict(long_link_json(b, argv, now), wall_s=wall)
    js_path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def write_report(b: Bench, wall: float, argv: list[str]) -> None:
    if b.long_only:
        write_long_only(b, wall, argv)
        return
    res, p = b.res, b.p
    paths = {x.key: x for x in b.paths}

    def cell(metric: str, key: str, unit: str = "") -> str:
        c = res.cell(metric, key)
        if "value" in c:
            s = fmt_num(c["value"]) + (f" {unit}" if unit else "")
            errs = c.get("errors")
            if errs:
                s += f", {int(statistics.median(errs))} err"
            return s
        if c.get("error"):
            return "not installed" if c["error"] == "not installed" else \
                f"error: {short(c['error'], 70)}"
        path = paths.get(key)
        if path is not None and path.error:
            return "not installed" if path.error == "not installed" else \
                f"error: {short(path.error, 70)}"
        return "—"

    def ratio(metric: str, a: str, b_: str) -> str:
        x, y = res.value(metric, a), res.value(metric, b_)
        if x is None or y is None or y == 0:
            return "—"
        return f"{x / y:.2f}×"

    lines: list[str] = []
    out = lines.append
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu = "?"
    with contextlib.suppress(OSError):
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    v = b.versions
    out("# tunneld benchmark results")
    out("")
    out(f"`python bench/run.py{' ' + ' '.join(argv) if argv else ''}` — {now}, "
        f"wall time {wall:.0f} s. {os.cpu_count()} CPUs ({cpu}), Linux "
        f"{platform.release()}.")
    out("")
    out(f"Versions: tunneld {v.get('tunneld')}, Python {v.get('python')}, asyncssh "
        f"{v.get('asyncssh')}, uvloop {v.get('uvloop', '-')}, {v.get('openssh')}, "
        f"sshtunnel {v.get('sshtunnel', 'not installed')} (paramiko {v.get('paramiko', '-')}).")
    out("")
    load_end = os.getloadavg()
    if b.load_start:
        busy = b.load_start[0] > 0.5
        out(f"Load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in b.load_start)}, "
            f"at end {'/'.join(f'{x:.2f}' for x in load_end)}"
            + (" — **the machine was not idle when the run started (other processes "
               "share these CPUs); take small differences with care**." if busy else "."))
        out("")
    out(f"Setup: one OpenSSH sshd on 127.0.0.1, targets on 127.0.0.2, everything on loopback. "
        f"Medians of {p.bulk_reps} repetition(s) for throughput, {p.reps} for latency, "
        f"up to {p.conc_reps} for concurrency. "
        f"Ratios: tunneld ÷ ssh -L and tunneld ÷ direct (throughput: higher is better; "
        f"times: lower is better).")
    out("")
    ciphers = ", ".join(f"{paths[k].tool} {paths[k].cipher or '?'}"
                        for k in ("ssh-default", "tunneld-default", "sshtunnel-default")
                        if k in paths and not paths[k].error)
    out(f"Default ciphers negotiated: {ciphers}.")
    out("")

    def table(title: str, rows: list[tuple[str, str, str, str]]) -> None:
        out(f"## {title}")
        out("")
        out("| metric | " + " | ".join(c[1] for c in COLS) +
            " | tunneld ÷ ssh -L | tunneld ÷ direct | sshtunnel ÷ ssh -L |")
        out("|---|" + "---:|" * (len(COLS) + 3))
        for label, metric, variant, unit in rows:
            keys = {c: (c if c == "direct" else f"{c}-{variant}") for c, _ in COLS}
            out(f"| {label} | " + " | ".join(cell(metric, keys[c], unit) for c, _ in COLS) +
                f" | {ratio(metric, keys['tunneld'], keys['ssh'])}"
                f" | {ratio(metric, keys['tunneld'], keys['direct'])}"
                f" | {ratio(metric, keys['sshtunnel'], keys['ssh'])} |")
        out("")

    table(f"Bulk throughput, one connection, {p.mb} MB (MB/s, 1 MB = 10⁶ bytes)", [
        ("upload, aes128-gcm", "bulk.up.gcm", "gcm", ""),
        ("download, aes128-gcm", "bulk.down.gcm", "gcm", ""),
        ("upload, default cipher", "bulk.up.default", "default", ""),
        ("download, default cipher", "bulk.down.default", "default", ""),
    ])
    table(f"Latency (ms): new connection = open + 100-byte echo + close, {p.conn_n}× "
          f"sequentially; ping-pong = {p.ping_n} round trips of 64 bytes on one connection", [
        ("new connection, median (aes128-gcm)", "conn.median.gcm", "gcm", ""),
        ("new connection, p99 (aes128-gcm)", "conn.p99.gcm", "gcm", ""),
        ("ping-pong p50 (aes128-gcm)", "ping.p50.gcm", "gcm", ""),
        ("ping-pong p99 (aes128-gcm)", "ping.p99.gcm", "gcm", ""),
        ("new connection, median (default)", "conn.median.default", "default", ""),
        ("new connection, p99 (default)", "conn.p99.default", "default", ""),
        ("ping-pong p50 (default)", "ping.p50.default", "default", ""),
        ("ping-pong p99 (default)", "ping.p99.default", "default", ""),
    ])
    table("CPU time of the tunnel process per operation (user + system; lower is better; "
          "less sensitive to a busy machine than the times above)", [
        (f"{what} ({name})", f"cpu.{metric}.{variant}", variant, "")
        for variant, name in (("gcm", "aes128-gcm"), ("default", "default"))
        for what, metric in (("upload, ms per 100 MB", "bulk.up"),
                             ("download, ms per 100 MB", "bulk.down"),
                             ("new connection, µs each", "conn"),
                             ("ping-pong, µs per round trip", "ping"))])
    table("Concurrency: N simultaneous connections, each a 100-byte echo (total seconds, "
          "errors; aes128-gcm)",
          [(f"N = {n}", f"conc.{n}", "gcm", "s") for n in p.conc])

    # memory: its own small table (not per cipher)
    out(f"## Memory (RSS; {p.mem_hosts} hosts × {p.mem_ports} forwards; "
        f"{p.mem_conns} idle connections through one forward)")
    out("")
    out("| metric | ssh -L | tunneld | sshtunnel | tunneld ÷ ssh -L |")
    out("|---|---:|---:|---:|---:|")
    for label, metric, unit in (
            (f"idle, {p.mem_hosts} hosts × {p.mem_ports} forwards (MiB, all processes)",
             "mem.idle", "MiB"),
            ("per extra open connection (KiB)", "mem.per_conn", "KiB")):
        out(f"| {label} | " + " | ".join(cell(metric, k) for k in
                                         ("ssh", "tunneld", "sshtunnel")) +
            f" | {ratio(metric, 'tunneld', 'ssh')} |")
    out("")
    idle = res.cell("mem.idle", "tunneld")
    if idle.get("rss_empty_kib"):
        out(f"tunneld RSS with no forwards: {idle['rss_empty_kib'][0] / 1024:.1f} MiB; "
            f"per idle forward: {idle['per_forward_kib'][0]:.1f} KiB. "
            f"ssh -L is one process per host, so its idle figure adds {p.mem_hosts} processes.")
        out("")

    out(f"## `tunnelctl list` wall time (median of {p.list_runs} runs, same interpreter)")
    out("")
    out("| daemon state | python -c pass | python -m tunnelctl list | ratio | "
        "tunnelctl console script | ratio |")
    out("|---|---:|---:|---:|---:|---:|")
    for label, name in (("bench", "benchmark daemon (6 forwards)"),
                        (f"{p.mem_hosts * p.mem_ports}fwd",
                         f"{p.mem_hosts} hosts × {p.mem_ports} forwards")):
        m = f"list.{label}"
        base = "python -c pass"
        out(f"| {name} | {cell(m, base, 'ms')} | {cell(m, 'python -m tunnelctl list', 'ms')} |"
            f" {ratio(m, 'python -m tunnelctl list', base)} |"
            f" {cell(m, 'tunnelctl list (console script)', 'ms')} |"
            f" {ratio(m, 'tunnelctl list (console script)', base)} |")
    out("")

    old_long_md, old_long_json = _old_long_link()
    if b.long_info is not None:
        lines.extend(long_link_section(b, argv, now))
    elif old_long_md:   # from an earlier run: kept, it names its own command and date
        lines.extend(old_long_md.strip("\n").split("\n") + [""])

    targets = issue_targets(res, p)
    out("## Targets of issue 5")
    out("")
    out("| target | measured | met |")
    out("|---|---:|:---:|")
    for t in targets:
        out(f"| {t['target']} | {t['measured']} | {t['met']} |")
    out("")
    out("## Notes")
    out("")
    out("- Throughput is timed at the client: upload from the first byte sent to the sink's "
        "acknowledgement of the last; download from the first byte received to the last. "
        "Client and target sockets ask for 4 MiB buffers.")
    out("- Latency and concurrency rows use each tool with aes128-gcm forced (ssh: `-c`; "
        "tunneld: `Ciphers` in the host's ~/.ssh/config entry; sshtunnel: paramiko's cipher "
        "list) unless marked default.")
    out("- Concurrency: all N connects are started at once; when every connect has finished, "
        f"each connection sends 100 bytes and reads them back. Each step of a connection has "
        f"a {CONC_TIMEOUT:g} s limit; the total includes connects, echoes and waiting for "
        "them. Errors are counted per connection (details in results.json).")
    for note in dict.fromkeys(res.notes):
        out(f"- {note}")
    obs = []
    for metric, cells in res.metrics.items():
        for key, c in cells.items():
            for entry in c.get("log", []):
                obs.append(f"{key}, {metric}: {entry['lines']} warning/error log line(s), "
                           f"e.g. `{entry['examples'][0][:150]}`")
            kinds: collections.Counter[str] = collections.Counter()
            for k in c.get("kinds", []) + c.get("error_kinds", []):
                kinds.update(k)
            if kinds:
                obs.append(f"{key}, {metric}: client errors " +
                           ", ".join(f"{k} × {n}" for k, n in kinds.most_common()))
            for e in c.get("errors_seen", []):
                obs.append(f"{key}, {metric}: {e}")
            nst = collections.Counter()
            for d in c.get("netstat", []):
                nst.update({k: v for k, v in d.items() if k in ("ListenOverflows",
                                                                  "ListenDrops",
                                                                  "TCPSynRetrans")})
            if nst and (kinds or metric.startswith("conc.")):
                obs.append(f"{key}, {metric}: kernel counters over its run(s): " +
                           ", ".join(f"{k} +{v}" for k, v in sorted(nst.items())))
    if obs:
        out("")
        out("### Errors and log lines seen during the run")
        out("")
        for o in list(dict.fromkeys(obs))[:60]:
            out(f"- {o}")
    if res.logs:
        out("")
        out("### Warning/error lines in the processes' logs over the whole run")
        out("")
        for name, sm in res.logs.items():
            ex = "; ".join(f"`{e[:140]}`" for e in sm["examples"][:3])
            out(f"- {name}: {sm['lines']} of {sm['total_lines']} lines, e.g. {ex}")
    out("")
    (RESULTS / "results.md").write_text("\n".join(lines) + _kept_sections(RESULTS / "results.md"))

    data = {"command": ["python", "bench/run.py", *argv], "date": now, "wall_s": wall,
            "params": p.__dict__, "versions": v, "cpus": os.cpu_count(), "cpu": cpu,
            "fd_limit": b.fd_limit, "loadavg_start": b.load_start, "loadavg_end": load_end,
            "paths": {k: {"tool": x.tool, "variant": x.variant, "cipher": x.cipher,
                          "error": x.error} for k, x in paths.items()},
            "metrics": res.metrics, "notes": res.notes, "logs": res.logs,
            "targets": targets}
    if b.long_info is not None:
        data["long_link"] = long_link_json(b, argv, now)
    elif old_long_json:
        data["long_link"] = old_long_json["long_link"]
        data["metrics"] = dict(res.metrics, **old_long_json["metrics"])
    (RESULTS / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")


# ------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="50 MB transfers, fewer iterations, one repetition (about 2-3 min)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temp dir (sshd, tunneld, ssh logs) and print its path")
    ap.add_argument("--long-link", nargs="?", const="20,50,100", metavar="RTTS",
                    help="add the 'Long link' section: each RTT in ms (default 20,50,100) "
                         "through bench/delay.py, plus rows without the proxy and at 0 ms")
    ap.add_argument("--long-link-only", action="store_true",
                    help="run only the long-link section (RTTs of --long-link, else "
                         "20,50,100); replaces that section of results.md/json, the rest "
                         "of them stays")
    ap.add_argument("--max-window", metavar="LIST",
                    help="long link: one tunneld row per max_window written to its "
                         "config.toml, e.g. 2MiB,16MiB,64MiB ('default': no key written); "
                         "default: one row, no key")
    ap.add_argument("--results-dir", type=Path, metavar="DIR",
                    help="write (and update) results.md/json there instead of bench/")
    args = ap.parse_args()
    if args.results_dir:
        global RESULTS
        RESULTS = args.results_dir.resolve()
        RESULTS.mkdir(parents=True, exist_ok=True)
    argv = ["--quick"] if args.quick else []
    params = QUICK if args.quick else FULL
    rtts: list[str] = []
    windows: list[str | None] = [None]
    if args.long_link is not None or args.long_link_only:
        try:
            rtts = parse_rtts(args.long_link or "20,50,100")
            windows = parse_windows(args.max_window) if args.max_window else [None]
        except (argparse.ArgumentTypeError, ValueError) as e:
            ap.error(str(e))
        argv += ["--long-link", ",".join(rtts)]
        if args.long_link_only:
            argv.append("--long-link-only")
        if args.max_window:
            argv += ["--max-window", ",".join(w or "default" for w in windows)]
            if any(w is not None for w in windows) and "max_window" not in \
                    (REPO / "tunneld" / "config.py").read_text():
                log("warning: tunneld/config.py has no max_window: those rows will fail")
    elif args.max_window:
        ap.error("--max-window needs --long-link or --long-link-only")

    def on_term(signum, frame):  # SIGTERM: clean up as for Ctrl-C
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    bench = Bench(params, args.quick, args.keep, rtts=rtts, long_only=args.long_link_only,
                  windows=windows)
    status = 0
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted: cleaning up; writing what was measured")
        status = 130
    except Exception as e:
        import traceback
        traceback.print_exc()
        log(f"aborted: {short(e, 400)}; writing what was measured")
        status = 1
    finally:
        try:
            bench.close()
        finally:
            wall = time.monotonic() - T_START
            write_report(bench, wall, argv)
            log(f"wrote {RESULTS / 'results.md'} and results.json ({wall:.0f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
