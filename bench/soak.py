#!/usr/bin/env python3
"""Chaos soak of tunneld: real sshd in a network namespace, a fault proxy, load, faults.

Run (as root: it makes a network namespace)::

    .venv/bin/python bench/soak.py --minutes 15            # the soak
    .venv/bin/python bench/soak.py --minutes 1             # the CI version (< 2 min in all)
    .venv/bin/python bench/soak.py --minutes 5 --seed 7 --json /tmp/soak.json --keep

It prints a short report to stdout (progress to stderr), writes every figure and the fault
timeline to ``--json`` (default ``bench/soak-results.json``) and exits 0 only if every pass
criterion holds (1 otherwise, 2 if the set-up itself failed, 130 when interrupted).  Not
part of the pytest suite.

Set-up (all throw-away, under one ``tempfile.mkdtemp`` directory; removed at the end, also on
^C or an error, unless ``--keep``):

* a network namespace ``soak-<pid>-<hex>`` with a veth pair (10.252.x.y/30, names ``sk<hex>a``/
  ``sk<hex>b``); inside it a real OpenSSH ``sshd`` on port 22 (own host key, authorized_keys,
  ``SetEnv HOME=`` a throw-away home: the approach of tests/e2e/conftest.py, copied here so the
  bench depends neither on pytest nor on test code being edited) and the target servers on the
  namespace's own 127.0.0.1: an echo server (:7000) and a bulk server (:7001: ``D``+N → N random
  bytes + their sha256; ``U``+N+bytes → the sha256 of what it received);
* a fault-injecting TCP proxy (own process, so that the harness's threads do not slow the data
  path) between tunneld and sshd; the ssh alias ``soak`` goes through it;
* ``.venv/bin/tunneld`` with HOME/XDG_*/TUNNELD_SOCKET in the temp dir and a config.toml with
  keepalive_interval = 1, keepalive_count_max = 2, connect_timeout = 5, hold_timeout = 30;
  driven with ``.venv/bin/tunnelctl``.

Forwards (all ``LPORT:127.0.0.1:TPORT``, ports chosen below the ephemeral range): echo-a,
echo-b, bulk-a, bulk-b (``tunnelctl add``), echo-cfg (declared in config.toml), and two that
come and go: reload-echo (declared in config.toml or not, applied with ``tunnelctl reload``)
and dyn-echo (``tunnelctl add``/``remove`` at run time).  The load uses only the permanent ones.

Load (threads; every socket operation has a timeout, every loop a bound): echo round trips with
random payloads compared byte for byte; bulk transfers of 1-4 MB each way checked with sha256;
bursts of 16 short connections every 2-5 s; three idle long-lived connections that send a
little every 2-6 s (5-20 s in long runs) and watch their socket in between.

Faults, one at a time at random intervals (``--seed``), each with start and end time:
``rst`` (proxy RSTs every connection), ``blackhole`` (2-20 s, 2-6 s in runs of 2 minutes or
less; then resume + RST, as a dead link ends), ``sshd-restart`` (listener and sessions killed,
0-2 s down, started again), ``refused`` (RST + the proxy refuses new connections for 2-5 s),
``kill9`` (the daemon killed with SIGKILL, started again 0.5-2 s later: alternately by
``tunneld`` and by an autostarting ``tunnelctl list``; at most every 45 s in short runs, where
it comes first, and every 150 s in long ones, so that one daemon lives long enough for the
resource trend), ``reload`` (reload-echo toggled in config.toml, ``tunnelctl reload``),
``reconnect`` (``tunnelctl reconnect soak``), ``add-remove`` (dyn-echo added or removed).  Each
cycle runs every kind once in random order, with 1-3 s (3-12 s in long runs) between faults.

Figures (the JSON has all of them; "cut" means the harness saw a reset or a short read):

* ``corrupted``: transfers whose content was wrong (an echo that differs from what was sent,
  even in a cut transfer's prefix; a sha256 that does not match; extra bytes), and their bytes
  (exact for echoes, the transfer size for a hash mismatch).  PASS iff 0.
* ``refused``: ECONNREFUSED on connect to a forward's local port.  ``while_daemon_ran`` (the
  listeners must stay bound through host outages, clients are held): PASS iff 0.
  ``daemon_down`` (from a kill -9 until the restarted daemon lists every forward, and likewise
  after a crash): reported.
* ``cut``: transfers cut by faults (expected), per workload, reason and fault kind; ``outside
  any fault window`` counts cuts more than 5 s after the last fault's recovery (reported: a
  connection tunneld dropped for no reason would show there); ``ended_by_clean_eof``: cuts
  that arrived as a clean EOF (FIN) mid-stream rather than a reset (reported: a protocol
  delimited by EOF would take those as complete).
* ``stalled``: transfers without progress for 45 s (hold_timeout + connect_timeout + the
  keepalive's 3 s + 7 s): tunneld neither served nor closed them.  PASS iff 0.
* ``recovery``: per fault, the time from its end (link back, sshd accepting, listener open,
  daemon back and listing its forwards, command returned) until an echo (a tiny download on
  bulk forwards) succeeded through every forward.  Median and max per kind.  PASS iff max
  <= 2 s for the host faults (rst, blackhole, sshd-restart, refused), and every fault of any
  kind recovered within 30 s.
* ``states``: ``tunnelctl list --json`` against what the harness expects: every forward present
  with its origin, none extra, "listening" iff the host is connected, the host connected once
  every forward works, forwards.json holding exactly the "added" ones; a removed forward's port
  refusing connections.  Checked after every recovery (a problem counts as stuck if it is still
  there 5 s later) and every 4 s in between (stuck if seen in checks at least 5 s apart with
  none clean between).  PASS iff nothing stuck.
* ``crashes``: the daemon died without our kill -9 (seen by the /proc sampler; it is started
  again so that the soak goes on).  PASS iff none.
* ``commands``: every tunnelctl command of a fault exited 0 in time.  PASS iff all did.
* ``resources``: the daemon's fds, RSS and threads from /proc/PID every 1 s (2 s in long runs);
  for every daemon life with at least 20 s of samples after a 10 s warm-up, the medians of its
  first and last thirds.  FAIL on growth of more than 20 fds, more than 8 threads, or more than
  25 % and 20 MiB of RSS.  (Lives too short to judge are listed as such.)
* ``log``: lines with ERROR/CRITICAL and tracebacks in the daemon log (``tunnelctl logs
  --daemon``'s file, XDG_STATE_HOME/tunneld/log/tunneld.log and its rotations) and in the stderr
  of the daemons the harness started; counts and the first few.  PASS iff no traceback and no
  ERROR/CRITICAL line.
* ``harness``: sanity of the run itself: every fault kind ran, uploads and downloads were
  checked, no harness step failed.  PASS iff so.
* ``connect_attempts`` (reported, no criterion): the daemon's connection attempts to the server
  (its log's ``-> connecting`` lines) per second and per fault kind, and the proxy's counters.
* ``daemon_down_secs`` / ``kill9_restart_to_working`` (reported): how long each kill -9 left
  the daemon absent, and the time from the restart command until every forward worked.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import errno
import fcntl
import hashlib
import json
import os
import pwd
import random
import re
import secrets
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV_BIN = REPO / ".venv" / "bin"
TUNNELD = VENV_BIN / "tunneld"
TUNNELCTL = VENV_BIN / "tunnelctl"
PYTHON = sys.executable

ALIAS = "soak"
#: target ports inside the namespace (its own loopback: nothing else listens there)
ECHO_PORT, BULK_PORT = 7000, 7001
#: daemon settings written to config.toml
KEEPALIVE_INTERVAL, KEEPALIVE_COUNT_MAX = 1, 2
CONNECT_TIMEOUT, HOLD_TIMEOUT, STOP_TIMEOUT = 5, 30, 2

#: a cycle (every fault kind once, in random order) includes kill9 only if the last one was
#: this long ago: daemon lives long enough for the resource trend
KILL9_EVERY_SHORT, KILL9_EVERY = 45.0, 150.0
#: a transfer without progress for this long is "stalled": tunneld neither served nor closed it
STALL_LIMIT = HOLD_TIMEOUT + CONNECT_TIMEOUT + KEEPALIVE_INTERVAL * (KEEPALIVE_COUNT_MAX + 1) + 7
#: socket operations wake this often to look at the stop flag and the stall clock
IO_TICK = 0.5
#: one read/write on the bulk path
CHUNK = 256 * 1024
#: a forward that does not work again this long after a fault's end has not recovered
RECOVERY_LIMIT = 30.0
#: pass criterion: max recovery after a host fault
HOST_FAULT_RECOVERY_MAX = 2.0
HOST_FAULTS = ("rst", "blackhole", "sshd-restart", "refused")
FAULT_KINDS = ("rst", "blackhole", "sshd-restart", "refused", "kill9", "reload", "reconnect",
               "add-remove")
#: one probe attempt (connect, send, read the answer); failed attempts are retried at once
PROBE_ATTEMPT = 3.0
PROBE_RETRY = 0.05
#: a problem still there this long after first seen is "stuck"
STUCK_AFTER = 5.0
STATE_CHECK_EVERY = 4.0
#: resource trend: warm-up after a daemon start, minimum span to judge, growth thresholds
WARMUP = 10.0
TREND_MIN_SPAN = 20.0
FD_GROWTH_MAX = 20
THREAD_GROWTH_MAX = 8
RSS_GROWTH_MAX_FRACTION, RSS_GROWTH_MAX_KIB = 0.25, 20 * 1024
#: cuts later than this after a fault's recovery are "outside any fault window"
CUT_ATTRIBUTION_SLACK = 5.0
#: timeouts of helper commands
CTL_TIMEOUT = 30.0
SSHD_START_TIMEOUT = 10.0
DAEMON_START_TIMEOUT = 20.0
KILL_TIMEOUT = 10.0
#: the proxy stops reading a side while this much is queued for the other
PROXY_HIGH_WATER = 1 << 20
#: forward (and proxy) ports are picked here: below the ephemeral range, so no client socket
#: can sit on a removed forward's port
PORT_RANGE = (20000, 32000)

NETNS_PREFIX = "soak-"
NETNS_NET = (10, 252)
NETNS_LOCK = "/run/lock/tunneld-soak-netns.lock"

T0 = time.monotonic()


def now() -> float:
    """Seconds since the harness started (monotonic: comparable across threads)."""
    return time.monotonic() - T0


def wall(t: float) -> str:
    """ISO wall-clock time of harness time ``t``."""
    ts = time.time() - (now() - t)
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


_print_lock = threading.Lock()


def say(msg: str) -> None:
    with _print_lock:
        print(f"[{now():7.2f}] {msg}", file=sys.stderr, flush=True)


def r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


# ==========================================================================================
# processes


def proc_state(pid: int) -> str | None:
    """The state letter of ``pid`` (``Z`` for a zombie), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return data[data.rfind(")") + 2:].split()[0]


def reap(pid: int) -> None:
    """Collect ``pid`` if it is our (possibly adopted) child; nothing otherwise."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def kill_and_wait(pids: set[int], timeout: float = KILL_TIMEOUT) -> set[int]:
    """SIGKILL ``pids`` (by pid), reap the ones that are our children, wait until all are gone;
    returns those still alive after ``timeout``."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    left = set(pids)
    while left and time.monotonic() < deadline:
        for pid in list(left):
            reap(pid)
            if proc_state(pid) in (None, "Z", "X"):
                reap(pid)
                left.discard(pid)
        if left:
            time.sleep(0.02)
    return left


def become_subreaper() -> None:
    """Orphans of our children (the daemon a `tunnelctl list` autostarts) become ours, so we
    can reap the ones we kill (PR_SET_CHILD_SUBREAPER)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)


def stop_popen(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)


def free_port(rng: random.Random, taken: set[int], host: str = "127.0.0.1") -> int:
    """A port in PORT_RANGE that is free on ``host`` now and not in ``taken``."""
    for _ in range(1000):
        port = rng.randrange(*PORT_RANGE)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError(f"no free port in {PORT_RANGE}")


def tool(name: str) -> str:
    for path in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}", f"/sbin/{name}"):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
    raise RuntimeError(f"{name} not found: apt-get install -y openssh-server openssh-client "
                       "iproute2")


# ==========================================================================================
# the network namespace


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([tool("ip"), *args], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=10)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
    return r


def netns_names() -> set[str]:
    return {line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()}


def netns_pids(name: str) -> set[int]:
    return {int(x) for x in ip("netns", "pids", name, check=False).stdout.split() if x.isdigit()}


def _pid_alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")


@contextlib.contextmanager
def netns_lock():
    try:
        fd = os.open(NETNS_LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError:
        fd = os.open(tempfile.gettempdir(), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass
class NetNS:
    """``ip netns add soak-<pid>-<hex>`` plus a veth pair with a /30 from 10.252.0.0/16."""

    name: str
    veth_host: str
    veth_ns: str
    host_ip: str = ""
    ns_ip: str = ""
    closed: bool = False

    @classmethod
    def create(cls, rng: random.Random) -> NetNS:
        with netns_lock():
            cls.sweep_stale()
            while True:
                tag = secrets.token_hex(3)
                name = f"{NETNS_PREFIX}{os.getpid()}-{tag}"
                veth_host, veth_ns = f"sk{tag}a", f"sk{tag}b"
                if name not in netns_names() and not os.path.exists(
                        f"/sys/class/net/{veth_host}"):
                    break
            ip("netns", "add", name)
            ns = cls(name, veth_host, veth_ns)
            try:
                ip("-n", name, "link", "set", "lo", "up")
                used = set(re.findall(r"inet (\d+\.\d+\.\d+\.\d+)", ip("-o", "-4", "addr").stdout))
                used |= set(re.findall(r"(\d+\.\d+\.\d+\.\d+)", ip("-4", "route").stdout))
                for _ in range(10000):
                    base = rng.randrange(16384) * 4
                    addrs = [f"{NETNS_NET[0]}.{NETNS_NET[1]}.{(base + k) // 256}.{(base + k) % 256}"
                             for k in range(4)]
                    if not used.intersection(addrs):
                        break
                else:
                    raise RuntimeError("no free /30 in 10.252.0.0/16")
                ns.host_ip, ns.ns_ip = addrs[1], addrs[2]
                ip("link", "add", veth_host, "type", "veth", "peer", "name", veth_ns,
                   "netns", name)
                ip("addr", "add", f"{ns.host_ip}/30", "dev", veth_host)
                ip("-n", name, "addr", "add", f"{ns.ns_ip}/30", "dev", veth_ns)
                ip("link", "set", veth_host, "up")
                ip("-n", name, "link", "set", veth_ns, "up")
            except BaseException:
                ns.close()
                raise
        return ns

    @staticmethod
    def sweep_stale() -> None:
        """Remove ``soak-<pid>-*`` namespaces whose harness died (SIGKILL leaves them)."""
        for name in netns_names():
            m = re.fullmatch(rf"{NETNS_PREFIX}(\d+)-([0-9a-f]+)", name)
            if m is None or _pid_alive(int(m.group(1))):
                continue
            with contextlib.suppress(Exception):
                kill_and_wait(netns_pids(name))
                ip("link", "del", f"sk{m.group(2)}a", check=False)
                ip("netns", "del", name, check=False)

    def exec_argv(self, argv: list[str]) -> list[str]:
        return [tool("ip"), "netns", "exec", self.name, *argv]

    def close(self) -> list[str]:
        """Kill everything left in the namespace, delete the veth pair and the namespace."""
        if self.closed:
            return []
        self.closed = True
        errors = []
        left = kill_and_wait(netns_pids(self.name))
        if left:
            errors.append(f"processes in {self.name} survived SIGKILL: {sorted(left)}")
        if os.path.exists(f"/sys/class/net/{self.veth_host}"):
            r = ip("link", "del", self.veth_host, check=False)
            if r.returncode != 0:
                errors.append(f"ip link del {self.veth_host}: {r.stderr.strip()}")
        if self.name in netns_names():
            r = ip("netns", "del", self.name, check=False)
            if r.returncode != 0:
                errors.append(f"ip netns del {self.name}: {r.stderr.strip()}")
        return errors


# ==========================================================================================
# sshd in the namespace


def keygen(path: Path, comment: str) -> None:
    subprocess.run([tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", comment,
                    "-f", str(path)], check=True, stdin=subprocess.DEVNULL, capture_output=True,
                   timeout=30)


class SSHD:
    """A throw-away OpenSSH sshd on port 22 of the namespace, its keys and the client files
    (as tests/e2e/conftest.py's SSHServer: host key, AuthorizedKeysFile, SetEnv HOME)."""

    def __init__(self, base: Path, ns: NetNS):
        self.ns = ns
        self.workdir = base / "sshd"
        self.workdir.mkdir(parents=True)
        self.server_home = self.workdir / "server-home"
        self.server_home.mkdir(mode=0o700)
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.config = self.workdir / "sshd_config"
        self.log = self.workdir / "sshd.log"
        self.stderr = self.workdir / "sshd.stderr"
        self.sshd_path = tool("sshd")
        self.address = (ns.ns_ip, 22)
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def write_files(self, client_identity: Path) -> None:
        keygen(self.host_key, "tunneld-soak-hostkey")
        shutil.copyfile(client_identity.with_suffix(".pub"), self.authorized_keys)
        self.authorized_keys.chmod(0o600)
        self.config.write_text("\n".join([
            f"ListenAddress {self.ns.ns_ip}:22",
            f"HostKey {self.host_key}",
            f"PidFile {self.workdir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "StrictModes no", "UsePAM no", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password", "AllowTcpForwarding yes", "GatewayPorts no",
            "PermitOpen any", "ClientAliveInterval 0", "MaxSessions 100",
            "MaxStartups 100:30:200", "LogLevel VERBOSE", "PrintMotd no",
            "PermitUserEnvironment no",
            f"SetEnv HOME={self.server_home}", "",
        ]))

    def host_pub(self) -> tuple[str, str]:
        kind, key = self.host_key.with_suffix(".pub").read_text().split()[:2]
        return kind, key

    def start(self) -> None:
        """Start sshd and wait until it sends its banner."""
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        with self.stderr.open("ab") as err:
            self.proc = subprocess.Popen(
                self.ns.exec_argv([self.sshd_path, "-D", "-e", "-f", str(self.config),
                                   "-E", str(self.log)]),
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True)
        deadline = time.monotonic() + SSHD_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(self.address, timeout=1) as s:
                    s.settimeout(2)
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"sshd did not accept on {self.address} within {SSHD_START_TIMEOUT}s")

    def kill(self, keep: set[int]) -> None:
        """SIGKILL the listener and every session process: all processes in the namespace but
        ``keep`` (the targets).  (sshd forks a process per connection.)"""
        pids = netns_pids(self.ns.name) - keep - {os.getpid()}
        if self.proc is not None:
            pids.add(self.proc.pid)
        left = kill_and_wait(pids)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        self.proc = None
        if left:
            raise RuntimeError(f"sshd processes survived SIGKILL: {sorted(left)}")


# ==========================================================================================
# helper processes: target servers (in the namespace) and the fault proxy


def _serve(listener: socket.socket, handler: Callable[[socket.socket], None]) -> None:
    def one(conn: socket.socket) -> None:
        try:
            conn.settimeout(120)
            handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=one, args=(conn,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()


def _recv_exact(conn: socket.socket, n: int, h: Any = None) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        data = conn.recv(min(CHUNK, n - len(buf)))
        if not data:
            return None
        buf += data
    return bytes(buf)


def _echo_handler(conn: socket.socket) -> None:
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def _bulk_handler(conn: socket.socket) -> None:
    """``D`` + 8-byte N: send N random bytes, then their sha256 (32 bytes).
    ``U`` + 8-byte N + N bytes: reply with the sha256 of the N bytes (nothing on a short read).
    Then half-close and wait for the client to close."""
    head = _recv_exact(conn, 9)
    if head is None:
        return
    cmd, n = head[:1], struct.unpack("!Q", head[1:])[0]
    h = hashlib.sha256()
    if cmd == b"D":
        left = n
        while left:
            data = os.urandom(min(CHUNK, left))
            h.update(data)
            conn.sendall(data)
            left -= len(data)
        conn.sendall(h.digest())
    elif cmd == b"U":
        left = n
        while left:
            data = conn.recv(min(CHUNK, left))
            if not data:
                return
            h.update(data)
            left -= len(data)
        conn.sendall(h.digest())
    else:
        return
    conn.shutdown(socket.SHUT_WR)
    with contextlib.suppress(OSError):
        conn.settimeout(30)
        while conn.recv(65536):
            pass


def targets_main() -> int:
    """``soak.py _targets``: echo and bulk servers on 127.0.0.1 (run inside the namespace).
    Prints one JSON line when ready; exits when stdin closes."""
    listeners = []
    for port, handler in ((ECHO_PORT, _echo_handler), (BULK_PORT, _bulk_handler)):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(1024)
        listeners.append(s)
        _serve(s, handler)
    print(json.dumps({"echo": ECHO_PORT, "bulk": BULK_PORT, "pid": os.getpid()}), flush=True)
    while os.read(0, 1024):
        pass
    os._exit(0)


class _End:
    """One socket of a proxied pair; ``buf`` holds what waits to be written to it."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.peer: _End | None = None
        self.buf = bytearray()
        self.read_eof = False   # the socket sent us EOF
        self.shut = False       # we passed an EOF on to it
        self.mask = 0


def proxy_main(listen: str, target: str) -> int:
    """``soak.py _proxy LHOST:LPORT THOST:TPORT``: a TCP proxy that misbehaves on command.

    Commands on stdin, one per line, each answered ``ok ...`` on stdout: ``pause`` (black
    hole: nothing is read, written or accepted; bytes wait in the kernel's buffers),
    ``resume``, ``reset`` (RST both sides of every connection), ``close`` (close the listener:
    connections are refused), ``open``, ``stats``.  Exits when stdin closes.  Non-blocking,
    with per-direction buffers bounded by PROXY_HIGH_WATER; half-closes are passed on; a reset
    on one side is passed on as a reset."""
    lhost, lport = listen.rsplit(":", 1)
    thost, tport = target.rsplit(":", 1)
    sel = selectors.DefaultSelector()
    os.set_blocking(0, False)
    sel.register(0, selectors.EVENT_READ, "ctl")
    ends: dict[socket.socket, _End] = {}
    state = {"paused": False, "accepted": 0, "upstream_refused": 0, "resets": 0}
    listener: list[socket.socket | None] = [None]
    ctl_buf = bytearray()

    def open_listener() -> None:
        if listener[0] is None:
            ls = socket.socket()
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind((lhost, int(lport)))
            ls.listen(128)
            ls.setblocking(False)
            listener[0] = ls
            watch_listener()

    def watch_listener() -> None:
        """The listener is watched iff it is open and we are not paused."""
        ls = listener[0]
        if ls is None:
            return
        registered = ls in sel.get_map()
        if state["paused"] and registered:
            sel.unregister(ls)
        elif not state["paused"] and not registered:
            sel.register(ls, selectors.EVENT_READ, "accept")

    def close_listener() -> None:
        ls, listener[0] = listener[0], None
        if ls is not None:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(ls)
            ls.close()

    def drop(e: _End, rst: bool) -> None:
        for x in (e, e.peer):
            if x is None or x.sock not in ends:
                continue
            del ends[x.sock]
            if x.mask:
                with contextlib.suppress(KeyError, ValueError):
                    sel.unregister(x.sock)
            if rst:
                with contextlib.suppress(OSError):
                    x.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            x.sock.close()

    def want(e: _End) -> None:
        mask = 0
        if not state["paused"]:
            if not e.read_eof and e.peer is not None and len(e.peer.buf) < PROXY_HIGH_WATER:
                mask |= selectors.EVENT_READ
            if e.buf:
                mask |= selectors.EVENT_WRITE
        if mask != e.mask:
            if e.mask == 0:
                sel.register(e.sock, mask, e)
            elif mask == 0:
                sel.unregister(e.sock)
            else:
                sel.modify(e.sock, mask, e)
            e.mask = mask

    def set_paused(paused: bool) -> None:
        state["paused"] = paused
        watch_listener()
        for e in list(ends.values()):
            want(e)

    def accept() -> None:
        try:
            c, _ = listener[0].accept()  # type: ignore[union-attr]
        except OSError:
            return
        try:
            u = socket.create_connection((thost, int(tport)), timeout=2)
        except OSError:
            state["upstream_refused"] += 1
            with contextlib.suppress(OSError):
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            return
        state["accepted"] += 1
        a, b = _End(c), _End(u)
        a.peer, b.peer = b, a
        for e in (a, b):
            e.sock.setblocking(False)
            e.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ends[e.sock] = e
            want(e)

    def maybe_done(e: _End) -> None:
        p = e.peer
        if p is not None and e.read_eof and p.read_eof and not e.buf and not p.buf:
            drop(e, rst=False)

    def on_read(e: _End) -> None:
        try:
            data = e.sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            drop(e, rst=True)
            return
        p = e.peer
        assert p is not None
        if data:
            p.buf += data
            flush(p)
        else:
            e.read_eof = True
            if not p.buf and not p.shut:
                with contextlib.suppress(OSError):
                    p.sock.shutdown(socket.SHUT_WR)
                p.shut = True
            maybe_done(e)

    def flush(e: _End) -> None:
        if e.sock not in ends:
            return
        try:
            while e.buf:
                n = e.sock.send(e.buf[:CHUNK])
                del e.buf[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            drop(e, rst=True)
            return
        p = e.peer
        if not e.buf and p is not None and p.read_eof and not e.shut:
            with contextlib.suppress(OSError):
                e.sock.shutdown(socket.SHUT_WR)
            e.shut = True
            maybe_done(e)

    def command(line: str) -> str:
        if line == "pause":
            set_paused(True)
        elif line == "resume":
            set_paused(False)
        elif line == "reset":
            n = len(ends) // 2
            for e in list(ends.values()):
                drop(e, rst=True)
            state["resets"] += n
            return f"ok reset {n}"
        elif line == "close":
            close_listener()
        elif line == "open":
            open_listener()
        elif line == "stats":
            return "ok " + json.dumps({**state, "connections": len(ends) // 2,
                                       "listening": listener[0] is not None})
        else:
            return f"error unknown command {line!r}"
        return f"ok {line}"

    open_listener()
    print("ok ready", flush=True)
    while True:
        for key, mask in sel.select(timeout=0.5):
            if key.data == "ctl":
                data = os.read(0, 4096)
                if not data:
                    return 0
                ctl_buf.extend(data)
                while b"\n" in ctl_buf:
                    line, _, rest = bytes(ctl_buf).partition(b"\n")
                    ctl_buf[:] = rest
                    reply = command(line.decode().strip())
                    os.write(1, (reply + "\n").encode())
            elif key.data == "accept":
                if listener[0] is not None and not state["paused"]:
                    accept()
            else:
                e = key.data
                if e.sock not in ends:
                    continue
                if mask & selectors.EVENT_WRITE:
                    flush(e)
                if mask & selectors.EVENT_READ and e.sock in ends:
                    on_read(e)
        for e in list(ends.values()):
            if e.sock in ends:
                want(e)


class ProxyControl:
    """The harness's end of the proxy process."""

    def __init__(self, listen_port: int, target: tuple[str, int], log: Path):
        self.port = listen_port
        self._lock = threading.Lock()
        self._err = log.open("ab")
        self.proc = subprocess.Popen(
            [PYTHON, str(Path(__file__).resolve()), "_proxy", f"127.0.0.1:{listen_port}",
             f"{target[0]}:{target[1]}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, bufsize=0)
        if self._readline(10) != "ok ready":
            raise RuntimeError("the fault proxy did not start")

    def _readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        buf = b""
        deadline = time.monotonic() + timeout
        try:
            while not buf.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise RuntimeError("the fault proxy did not answer within "
                                       f"{timeout:g}s")
                ch = self.proc.stdout.read(1)
                if not ch:
                    raise RuntimeError("the fault proxy exited")
                buf += ch
        finally:
            sel.close()
        return buf.decode().strip()

    def cmd(self, line: str) -> str:
        with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write((line + "\n").encode())
            reply = self._readline(10)
        if not reply.startswith("ok"):
            raise RuntimeError(f"fault proxy: {line}: {reply}")
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin:
                self.proc.stdin.close()
        stop_popen(self.proc)
        self._err.close()


# ==========================================================================================
# the daemon under test


class Daemon:
    """tunneld in the temp HOME, its files, and tunnelctl in the same environment."""

    def __init__(self, base: Path, home: Path, runtime: Path):
        self.base = base
        self.home = home
        env = dict(os.environ)
        for k in ("SSH_AUTH_SOCK", "TUNNELD_CONFIG", "TUNNELD_LOG_LEVEL", "NOTIFY_SOCKET",
                  "DISPLAY", "WAYLAND_DISPLAY"):
            env.pop(k, None)
        env.update(
            HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
            XDG_STATE_HOME=str(home / ".local" / "state"),
            XDG_DATA_HOME=str(home / ".local" / "share"), XDG_CACHE_HOME=str(home / ".cache"),
            XDG_RUNTIME_DIR=str(runtime), TUNNELD_SOCKET=str(runtime / "tunneld" / "tunneld.sock"),
            TUNNELD_NO_AUTOSTART="1", PYTHONUNBUFFERED="1",
        )
        self.env = env
        self.autostart_env = {k: v for k, v in env.items() if k != "TUNNELD_NO_AUTOSTART"}
        self.config_file = home / ".config" / "tunneld" / "config.toml"
        self.config_file.parent.mkdir(parents=True)
        # where this tunneld keeps its files, asked of tunneld itself (paths.py)
        r = subprocess.run([PYTHON, "-c", "from tunneld import paths; import json; print("
                            "json.dumps([str(paths.log_file()), str(paths.state_file()), "
                            "str(paths.lock_path())]))"], env=env, capture_output=True,
                           text=True, timeout=30, check=True)
        log_file, state_file, lock = json.loads(r.stdout)
        self.log_file, self.state_file, self.lock_file = Path(log_file), Path(state_file), \
            Path(lock)
        self.stderr_path = base / "tunneld.stderr"
        self.procs: list[subprocess.Popen] = []
        self.pid: int | None = None

    def ctl(self, *args: str, timeout: float = CTL_TIMEOUT, autostart: bool = False
            ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([str(TUNNELCTL), *args],
                                  env=self.autostart_env if autostart else self.env,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(exc.cmd, 124, exc.stdout or "",
                                               f"timed out after {timeout:g}s")

    def status_pid(self) -> int | None:
        r = self.ctl("status", "--json", timeout=10)
        if r.returncode != 0:
            return None
        try:
            return int(json.loads(r.stdout)["pid"])
        except (ValueError, KeyError, TypeError):
            return None

    def list(self, timeout: float = 10) -> dict | None:
        r = self.ctl("list", "--json", timeout=timeout)
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def start(self) -> None:
        """``tunneld`` (not detached: its stderr is kept) and wait until it answers."""
        with self.stderr_path.open("ab") as err:
            proc = subprocess.Popen([str(TUNNELD)], env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = self.stderr_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"tunneld exited with {proc.returncode}: "
                                   + " | ".join(tail))
            pid = self.status_pid()
            if pid is not None:
                self.pid = pid
                return
            time.sleep(0.05)
        raise RuntimeError(f"tunneld did not answer within {DAEMON_START_TIMEOUT}s")

    def autostart(self) -> None:
        """An autostarting ``tunnelctl list`` starts it; then learn its pid."""
        r = self.ctl("list", "--json", autostart=True, timeout=DAEMON_START_TIMEOUT)
        if r.returncode != 0:
            raise RuntimeError(f"autostarting tunnelctl list exited {r.returncode}: "
                               f"{r.stderr.strip()}")
        self.pid = self.status_pid()
        if self.pid is None:
            raise RuntimeError("the autostarted daemon does not answer status")

    def kill9(self) -> None:
        pid = self.pid
        self.pid = None
        if pid is None:
            return
        left = kill_and_wait({pid})
        for p in self.procs:
            p.poll()
        if left:
            raise RuntimeError(f"tunneld {pid} survived SIGKILL")

    def _lock_pid(self) -> int | None:
        """The pid in the daemon's lock file, if that process is a tunneld of our HOME."""
        try:
            pid = int(self.lock_file.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except (OSError, ValueError, IndexError):
            return None
        if b"tunneld" in cmdline and f"HOME={self.home}\0".encode() in environ:
            return pid
        return None

    def close(self) -> None:
        """`tunnelctl stop`, then SIGKILL whatever of ours is left (by pid)."""
        pids = {p for p in (self.pid, self._lock_pid()) if p}
        pids |= {p.pid for p in self.procs if p.poll() is None}
        if pids:
            self.ctl("stop", timeout=15)
            deadline = time.monotonic() + STOP_TIMEOUT + 10
            while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
                for p in pids:
                    reap(p)
                time.sleep(0.05)
            kill_and_wait({p for p in pids if _pid_alive(p)})
            for p in pids:
                reap(p)
        for p in self.procs:
            stop_popen(p)


# ==========================================================================================
# load: counters, socket helpers, workers


class Cut(Exception):
    """The transfer was cut (reset, EOF before the end, connect failed); ``partial`` holds what
    was read before."""

    def __init__(self, reason: str, partial: bytes = b""):
        super().__init__(reason)
        self.reason = reason
        self.partial = partial


class Stalled(Exception):
    pass


class Abandoned(Exception):
    """The run ended while the transfer was under way (not counted)."""


class Refused(Exception):
    pass


@dataclass
class Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: Counter = field(default_factory=Counter)           # workload -> completed transfers
    bytes_checked: int = 0                                  # bytes compared or hash-verified
    corrupted: list[dict] = field(default_factory=list)
    corrupted_bytes: int = 0
    cuts: list[dict] = field(default_factory=list)          # {t, workload, reason, port}
    stalls: list[dict] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)       # {t, port, workload}
    connect_errors: list[dict] = field(default_factory=list)
    connections: int = 0
    harness_errors: list[str] = field(default_factory=list)

    def add_ok(self, workload: str, nbytes: int) -> None:
        with self.lock:
            self.ok[workload] += 1
            self.bytes_checked += nbytes

    def add_corrupt(self, workload: str, port: int, nbytes: int, detail: str) -> None:
        with self.lock:
            self.corrupted.append({"t": r3(now()), "workload": workload, "port": port,
                                   "bytes": nbytes, "detail": detail})
            self.corrupted_bytes += nbytes
        say(f"CORRUPTION {workload} on :{port}: {detail}")

    def add_cut(self, workload: str, port: int, reason: str) -> None:
        with self.lock:
            self.cuts.append({"t": r3(now()), "workload": workload, "port": port,
                              "reason": reason})

    def add_stall(self, workload: str, port: int, detail: str) -> None:
        with self.lock:
            self.stalls.append({"t": r3(now()), "workload": workload, "port": port,
                                "detail": detail})
        say(f"STALL {workload} on :{port}: {detail}")


def _reason(exc: OSError) -> str:
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, BrokenPipeError):
        return "broken pipe"
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


class IO:
    """Socket operations with a stall clock (no progress for STALL_LIMIT) and the stop flag,
    for the load; or with a hard deadline, for probes."""

    def __init__(self, stop: threading.Event, deadline: float | None = None):
        self.stop = stop
        self.deadline = deadline

    def connect(self, port: int) -> socket.socket:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionRefusedError:
            raise Refused() from None
        except OSError as exc:
            raise Cut("connect " + _reason(exc)) from None
        s.settimeout(IO_TICK)
        return s

    def _waited(self, last: float) -> None:
        t = time.monotonic()
        if self.stop.is_set():
            raise Abandoned()
        if self.deadline is not None:
            if t > self.deadline:
                raise Stalled("probe deadline")
        elif t - last > STALL_LIMIT:
            raise Stalled(f"no progress for {STALL_LIMIT:g}s")

    def send(self, s: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        off, last = 0, time.monotonic()
        while off < len(view):
            try:
                n = s.send(view[off:off + CHUNK])
            except socket.timeout:
                self._waited(last)
                continue
            except OSError as exc:
                raise Cut("send " + _reason(exc)) from None
            off += n
            last = time.monotonic()

    def recv(self, s: socket.socket, n: int, sink: Callable[[bytes], None] | None = None
             ) -> bytes:
        """Read exactly ``n`` bytes (given to ``sink`` instead of kept, if set).  Raises Cut
        with what was read on EOF or reset."""
        buf = bytearray()
        got, last = 0, time.monotonic()
        while got < n:
            try:
                data = s.recv(min(CHUNK, n - got))
            except socket.timeout:
                self._waited(last)
                continue
            except OSError as exc:
                raise Cut("recv " + _reason(exc), bytes(buf)) from None
            if not data:
                raise Cut(f"short read ({got} of {n} bytes, then EOF)", bytes(buf))
            got += len(data)
            last = time.monotonic()
            if sink is not None:
                sink(data)
            else:
                buf += data
        return bytes(buf)


def echo_check(io: IO, s: socket.socket, payload: bytes) -> None:
    """One echo round trip; raises Cut / a corruption ValueError."""
    io.send(s, payload)
    try:
        back = io.recv(s, len(payload))
    except Cut as cut:
        if cut.partial != payload[:len(cut.partial)]:
            bad = sum(a != b for a, b in zip(cut.partial, payload))
            raise ValueError(f"cut echo whose {len(cut.partial)}-byte prefix differs in "
                             f"{bad} bytes", bad or len(cut.partial)) from None
        raise
    if back != payload:
        bad = sum(a != b for a, b in zip(back, payload))
        raise ValueError(f"echo of {len(payload)} bytes differs in {bad} bytes", bad)


def download_check(io: IO, s: socket.socket, n: int) -> None:
    io.send(s, b"D" + struct.pack("!Q", n))
    h = hashlib.sha256()
    io.recv(s, n, h.update)
    digest = io.recv(s, 32)
    if digest != h.digest():
        raise ValueError(f"download of {n} bytes: sha256 mismatch", n)


def upload_check(io: IO, s: socket.socket, data: bytes) -> None:
    io.send(s, b"U" + struct.pack("!Q", len(data)) + data)
    try:
        digest = io.recv(s, 32)
    except Cut as cut:
        raise Cut("no digest after upload: " + cut.reason) from None
    if digest != hashlib.sha256(data).digest():
        raise ValueError(f"upload of {len(data)} bytes: the server's sha256 differs",
                         len(data))


class Load:
    """The worker threads and their outcomes."""

    def __init__(self, stats: Stats, echo_ports: list[int], bulk_ports: list[int], seed: int,
                 short: bool):
        self.stats = stats
        self.echo_ports = echo_ports
        self.bulk_ports = bulk_ports
        self.seed = seed
        self.short = short
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def _spawn(self, name: str, fn: Callable[[random.Random], None], n: int) -> None:
        rng = random.Random(f"{self.seed}-{name}-{n}")
        t = threading.Thread(target=self._guard, args=(name, fn, rng), name=f"{name}-{n}",
                             daemon=True)
        self.threads.append(t)
        t.start()

    def _guard(self, name: str, fn: Callable[[random.Random], None], rng: random.Random) -> None:
        try:
            fn(rng)
        except Abandoned:
            pass
        except Exception as exc:  # a harness bug: make it loud, it fails the run
            with self.stats.lock:
                self.stats.harness_errors.append(f"load {name}: {exc!r}")
            say(f"HARNESS ERROR in {name}: {exc!r}")
            raise

    def start(self) -> None:
        for i, port in enumerate(self.echo_ports):
            self._spawn("echo", lambda rng, p=port: self.echo_worker(rng, p), i)
        for i, port in enumerate(self.bulk_ports):
            self._spawn("bulk", lambda rng, p=port: self.bulk_worker(rng, p), i)
        self._spawn("burst", self.burst_worker, 0)
        for i in range(3):
            self._spawn("idle", lambda rng, p=self.echo_ports[i % len(self.echo_ports)]:
                        self.idle_worker(rng, p), i)

    def close(self) -> list[str]:
        self.stop.set()
        stuck = []
        deadline = time.monotonic() + 10
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
            if t.is_alive():
                stuck.append(t.name)
        return stuck

    def sleep(self, secs: float) -> None:
        if self.stop.wait(secs):
            raise Abandoned()

    def _run_one(self, workload: str, port: int, body: Callable[[IO, socket.socket], int],
                 io: IO | None = None) -> bool:
        """Connect to ``port`` and run ``body`` (returns the bytes it verified); classify the
        outcome.  True if it completed."""
        io = io or IO(self.stop)
        t = now()
        try:
            s = io.connect(port)
        except Refused:
            with self.stats.lock:
                self.stats.refused.append({"t": r3(t), "port": port, "workload": workload})
            self.sleep(0.1)
            return False
        except Cut as cut:
            with self.stats.lock:
                self.stats.connect_errors.append({"t": r3(t), "port": port,
                                                  "workload": workload, "error": cut.reason})
            self.sleep(0.1)
            return False
        with self.stats.lock:
            self.stats.connections += 1
        try:
            with s:
                nbytes = body(io, s)
            self.stats.add_ok(workload, nbytes)
            return True
        except Cut as cut:
            self.stats.add_cut(workload, port, cut.reason)
        except ValueError as exc:
            self.stats.add_corrupt(workload, port, int(exc.args[1]), str(exc.args[0]))
        except Stalled as exc:
            self.stats.add_stall(workload, port, str(exc))
        return False

    def echo_worker(self, rng: random.Random, port: int) -> None:
        """Connections of 1-20 echo round trips of 1 B - 64 KiB random payloads."""
        while not self.stop.is_set():
            rounds = rng.randint(1, 20)

            def body(io: IO, s: socket.socket) -> int:
                total = 0
                for _ in range(rounds):
                    payload = rng.randbytes(rng.choice((1, 16, 512, 4096, 32768, 65536)))
                    echo_check(io, s, payload)
                    total += len(payload)
                    self.sleep(rng.uniform(0.01, 0.1))
                return total
            self._run_one("echo", port, body)
            self.sleep(rng.uniform(0.05, 0.3))

    def bulk_worker(self, rng: random.Random, port: int) -> None:
        """1-4 MB each way, checked with sha256, with pauses between."""
        while not self.stop.is_set():
            n = rng.randint(1_000_000, 4_000_000)
            if rng.random() < 0.5:
                data = rng.randbytes(n)
                self._run_one("upload", port, lambda io, s: (upload_check(io, s, data), n)[1])
            else:
                self._run_one("download", port, lambda io, s: (download_check(io, s, n), n)[1])
            self.sleep(rng.uniform(0.2, 1.0))

    def burst_worker(self, rng: random.Random) -> None:
        """Every 2-5 s, 16 short connections at once (one small echo each)."""
        while not self.stop.is_set():
            self.sleep(rng.uniform(2, 5))
            threads = []
            for i in range(16):
                port = rng.choice(self.echo_ports)
                payload = rng.randbytes(rng.randint(1, 4096))
                t = threading.Thread(
                    target=self._guard, daemon=True, name=f"burst-conn-{i}",
                    args=("burst", lambda _rng, p=port, d=payload: self._run_one(
                        "burst", p, lambda io, s: (echo_check(io, s, d), len(d))[1]), rng))
                threads.append(t)
                t.start()
            for t in threads:
                t.join(STALL_LIMIT + 15)

    def idle_watch(self, s: socket.socket, secs: float) -> None:
        """Wait ``secs`` on an idle connection, watching it: EOF or a reset is a cut (seen
        when it happens), bytes nobody asked for are a corruption."""
        deadline = time.monotonic() + secs
        sel = selectors.DefaultSelector()
        sel.register(s, selectors.EVENT_READ)
        try:
            while (left := deadline - time.monotonic()) > 0:
                if self.stop.is_set():
                    raise Abandoned()
                if not sel.select(min(left, IO_TICK)):
                    continue
                try:
                    data = s.recv(65536)
                except socket.timeout:
                    continue
                except OSError as exc:
                    raise Cut("reset while idle" if isinstance(exc, ConnectionResetError)
                              else f"{_reason(exc)} while idle") from None
                if not data:
                    raise Cut("EOF while idle")
                raise ValueError(f"{len(data)} bytes arrived unasked on an idle connection",
                                 len(data))
        finally:
            sel.close()

    def idle_worker(self, rng: random.Random, port: int) -> None:
        """A long-lived connection that sends a little every few seconds; reopened when cut."""
        quiet = (2, 6) if self.short else (5, 20)
        while not self.stop.is_set():
            def body(io: IO, s: socket.socket) -> int:
                total = 0
                while True:
                    self.idle_watch(s, rng.uniform(*quiet))
                    payload = rng.randbytes(rng.randint(8, 256))
                    echo_check(io, s, payload)
                    total += len(payload)
                    self.stats.add_ok("idle-message", len(payload))
            self._run_one("idle", port, body)
            self.sleep(0.2)


# ==========================================================================================
# faults, probes, state checks: the soak itself


@dataclass
class Forward:
    name: str
    port: int
    target: int          # ECHO_PORT or BULK_PORT
    origin: str          # "added" or "config"

    @property
    def spec(self) -> str:
        return f"{self.port}:127.0.0.1:{self.target}"


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.minutes = args.minutes
        self.short = args.minutes <= 2
        self.seed = args.seed
        self.rng = random.Random(args.seed)
        self.base = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
        self.stats = Stats()
        self.faults: list[dict] = []
        self.anomalies: list[dict] = []       # state problems (transient and stuck)
        self.commands: list[dict] = []        # tunnelctl commands issued by faults
        self.samples: list[dict] = []         # /proc samples of the daemon
        self.daemon_lives: list[dict] = []    # {pid, start, end, how}
        self.down_windows: list[list[float]] = []  # [kill, back] of each kill -9
        self.harness_errors: list[str] = []
        self.teardown_errors: list[str] = []
        #: deaths of the daemon that were not our kill -9
        self.crashes: list[dict] = []
        self.ns: NetNS | None = None
        self.sshd: SSHD | None = None
        self.proxy: ProxyControl | None = None
        self.daemon: Daemon | None = None
        self.load: Load | None = None
        self.targets: subprocess.Popen | None = None
        self.targets_pid: int | None = None
        self.forwards: dict[str, Forward] = {}
        #: names of the forwards that exist now (what list must show)
        self.expected: set[str] = set()
        #: held while the expected set changes or the daemon is down (the checker skips then)
        self.change_lock = threading.Lock()
        self.stop_bg = threading.Event()
        self.bg_threads: list[threading.Thread] = []
        self.run_start = 0.0
        self.run_end = 0.0
        self.restart_count = 0
        #: problem seen by the periodic check -> (first seen, reported stuck)
        self._periodic_seen: dict[str, tuple[float, bool]] = {}

    # -- set-up ----------------------------------------------------------------------------

    def setup(self) -> None:
        say(f"set-up in {self.base}")
        if os.geteuid() != 0:
            raise RuntimeError("the soak needs root (ip netns add)")
        for exe in (TUNNELD, TUNNELCTL):
            if not exe.exists():
                raise RuntimeError(f"{exe} is missing: .venv/bin/pip install -e .")
        become_subreaper()
        home = self.base / "home"
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        runtime = self.base / "run"
        runtime.mkdir(mode=0o700)
        identity = home / ".ssh" / "id_ed25519"
        keygen(identity, "root@tunneld-soak")

        self.ns = NetNS.create(self.rng)
        say(f"netns {self.ns.name}: {self.ns.veth_host} {self.ns.host_ip} <-> "
            f"{self.ns.veth_ns} {self.ns.ns_ip}")
        self.sshd = SSHD(self.base, self.ns)
        self.sshd.write_files(identity)
        self.sshd.start()

        # targets on the namespace's own loopback
        with (self.base / "targets.stderr").open("ab") as err:
            self.targets = subprocess.Popen(
                self.ns.exec_argv([PYTHON, str(Path(__file__).resolve()), "_targets"]),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                start_new_session=True)
        sel = selectors.DefaultSelector()
        sel.register(self.targets.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
        if not sel.select(15):
            raise RuntimeError("the target servers did not start")
        sel.close()
        self.targets_pid = json.loads(self.targets.stdout.readline())["pid"]  # type: ignore

        taken: set[int] = set()
        self.proxy = ProxyControl(free_port(self.rng, taken), self.sshd.address,
                                  self.base / "proxy.stderr")
        kind, key = self.sshd.host_pub()
        (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{self.proxy.port} {kind} {key}\n")
        (home / ".ssh" / "known_hosts").chmod(0o600)
        user = pwd.getpwuid(os.getuid()).pw_name
        (home / ".ssh" / "config").write_text("\n".join([
            f"Host {ALIAS}", "    HostName 127.0.0.1", f"    Port {self.proxy.port}",
            f"    User {user}", f"    IdentityFile {identity}", "    IdentitiesOnly yes",
            f"    UserKnownHostsFile {home / '.ssh' / 'known_hosts'}",
            "    StrictHostKeyChecking yes", "    BatchMode yes", "    UpdateHostKeys no", ""]))
        (home / ".ssh" / "config").chmod(0o600)

        for name, target, origin in (("echo-a", ECHO_PORT, "added"),
                                     ("echo-b", ECHO_PORT, "added"),
                                     ("bulk-a", BULK_PORT, "added"),
                                     ("bulk-b", BULK_PORT, "added"),
                                     ("echo-cfg", ECHO_PORT, "config"),
                                     ("reload-echo", ECHO_PORT, "config"),
                                     ("dyn-echo", ECHO_PORT, "added")):
            self.forwards[name] = Forward(name, free_port(self.rng, taken), target, origin)

        self.daemon = Daemon(self.base, home, runtime)
        self.reload_declared = False
        self.write_config()
        self.daemon.start()
        self.daemon_lives.append({"pid": self.daemon.pid, "start": now(), "how": "tunneld"})
        self.expected = {"echo-cfg"}
        for name in ("echo-a", "echo-b", "bulk-a", "bulk-b"):
            r = self.daemon.ctl("add", ALIAS, self.forwards[name].spec)
            if r.returncode != 0:
                raise RuntimeError(f"tunnelctl add failed: {r.stderr.strip()}")
            self.expected.add(name)
        rec = self.wait_all_working(now(), limit=30)
        if any(v is None for v in rec.values()):
            raise RuntimeError(f"the forwards do not work after set-up: {rec}; see "
                               f"{self.daemon.log_file}")
        problems = self.check_state("set-up", require_connected=True)
        if problems:
            raise RuntimeError(f"wrong state after set-up: {problems}")
        say(f"ready: daemon pid {self.daemon.pid}, proxy :{self.proxy.port}, forwards "
            + ", ".join(f"{f.name}=:{f.port}" for f in self.forwards.values()))

    def write_config(self) -> None:
        assert self.daemon is not None
        forwards = [self.forwards["echo-cfg"].spec]
        if self.reload_declared:
            forwards.append(self.forwards["reload-echo"].spec)
        text = "\n".join([
            "[defaults]",
            f"keepalive_interval = {KEEPALIVE_INTERVAL}",
            f"keepalive_count_max = {KEEPALIVE_COUNT_MAX}",
            f"connect_timeout = {CONNECT_TIMEOUT}",
            f"hold_timeout = {HOLD_TIMEOUT}",
            f"stop_timeout = {STOP_TIMEOUT}",
            "",
            f"[hosts.{ALIAS}]",
            "forwards = [" + ", ".join(f'"{f}"' for f in forwards) + "]",
            ""])
        tomllib.loads(text)
        tmp = self.daemon.config_file.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.daemon.config_file)

    # -- probes ----------------------------------------------------------------------------

    def probe_once(self, fwd: Forward) -> str | None:
        """One echo (tiny download on a bulk forward) through ``fwd``: None if it worked,
        else why not.  Outcomes also count in the stats (refusals, corruption)."""
        io = IO(self.stop_bg, deadline=time.monotonic() + PROBE_ATTEMPT)
        t = now()
        try:
            s = io.connect(fwd.port)
        except Refused:
            with self.stats.lock:
                self.stats.refused.append({"t": r3(t), "port": fwd.port, "workload": "probe"})
            return "refused"
        except Cut as cut:
            return cut.reason
        try:
            with s:
                if fwd.target == ECHO_PORT:
                    payload = os.urandom(32)
                    echo_check(io, s, payload)
                else:
                    download_check(io, s, 64)
            return None
        except Cut as cut:
            return cut.reason
        except Stalled:
            return f"no answer within {PROBE_ATTEMPT:g}s"
        except Abandoned:
            return "abandoned"
        except ValueError as exc:
            self.stats.add_corrupt("probe", fwd.port, int(exc.args[1]), str(exc.args[0]))
            return "corrupt"

    def wait_all_working(self, since: float, limit: float = RECOVERY_LIMIT
                         ) -> dict[str, float | None]:
        """Probe every expected forward until it works; seconds from ``since`` to its first
        success (None: not within ``limit``)."""
        result: dict[str, float | None] = {}
        last_error: dict[str, str] = {}

        def one(fwd: Forward) -> None:
            deadline = since + limit
            while now() < deadline and not self.stop_bg.is_set():
                why = self.probe_once(fwd)
                if why is None:
                    result[fwd.name] = max(0.0, now() - since)
                    return
                last_error[fwd.name] = why
                time.sleep(PROBE_RETRY)
            result[fwd.name] = None

        threads = [threading.Thread(target=one, args=(self.forwards[n],), daemon=True)
                   for n in sorted(self.expected)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(limit + PROBE_ATTEMPT + 5)
        for name, v in result.items():
            if v is None:
                say(f"  {name} did not work within {limit:g}s (last: {last_error.get(name)})")
        return result

    def refuses(self, fwd: Forward) -> bool:
        """True if ``fwd``'s port refuses connections (as a removed forward's must)."""
        try:
            with socket.create_connection(("127.0.0.1", fwd.port), timeout=2):
                return False
        except ConnectionRefusedError:
            return True
        except OSError:
            return False

    def closed_check(self, fwd: Forward, why: str) -> None:
        """A removed forward's port must refuse connections: an anomaly if it does not at
        once, stuck if it still accepts STUCK_AFTER later."""
        first = now()
        while not self.refuses(fwd):
            if now() - first >= STUCK_AFTER:
                self.anomalies.append({"t": r3(first), "where": fwd.name, "stuck": True,
                                       "problems": [f"{fwd.name} (:{fwd.port}) still accepts "
                                                    f"connections {STUCK_AFTER:g}s {why}"]})
                say(f"  STUCK: {fwd.name} still listening {why}")
                return
            time.sleep(0.2)
        if now() - first > 0.1:
            self.anomalies.append({"t": r3(first), "where": fwd.name, "stuck": False,
                                   "problems": [f"{fwd.name} (:{fwd.port}) accepted connections "
                                                f"{now() - first:.1f}s {why}"]})

    # -- state checks ----------------------------------------------------------------------

    def check_state(self, where: str, require_connected: bool) -> list[str]:
        """``tunnelctl list --json`` and forwards.json against the expected forwards: a list
        of problems (empty: all well)."""
        assert self.daemon is not None
        data = self.daemon.list()
        if data is None:
            return ["tunnelctl list --json failed"]
        problems = []
        host = next((h for h in data.get("hosts", []) if h.get("name") == ALIAS), None)
        if host is None:
            return [f"host {ALIAS} missing from list"]
        if require_connected and host["state"] != "connected":
            problems.append(f"host {host['state']} ({host.get('last_error')}) although every "
                            "forward works")
        by_port = {}
        for f in host.get("forwards", []):
            try:
                by_port[int(f["listen"].rsplit(":", 1)[1])] = f
            except (KeyError, ValueError):
                problems.append(f"forward with an unreadable listen address: {f}")
        want = {self.forwards[n].port: self.forwards[n] for n in self.expected}
        for port, fwd in want.items():
            got = by_port.get(port)
            if got is None:
                problems.append(f"{fwd.name} (:{port}) missing")
                continue
            if got.get("origin") != fwd.origin:
                problems.append(f"{fwd.name} origin {got.get('origin')}, expected {fwd.origin}")
            expect_state = "listening" if host["state"] == "connected" else "waiting"
            if got.get("state") != expect_state:
                problems.append(f"{fwd.name} {got.get('state')} while the host is "
                                f"{host['state']}")
        for port, got in by_port.items():
            if port not in want:
                problems.append(f"unexpected forward {got.get('spec')} ({got.get('origin')})")
        # forwards.json: exactly the forwards of origin "added"
        try:
            saved = json.loads(self.daemon.state_file.read_text()).get("hosts", {}).get(ALIAS, [])
            saved_ports = {int(s.split(":")[0]) for s in saved}
        except (OSError, ValueError, AttributeError) as exc:
            saved_ports = None
            if any(f.origin == "added" for f in want.values()):
                problems.append(f"forwards.json unreadable: {exc}")
        listed_added = {p for p, f in by_port.items() if f.get("origin") == "added"}
        if saved_ports is not None and saved_ports != listed_added:
            problems.append(f"forwards.json has ports {sorted(saved_ports)}, list's added "
                            f"forwards are {sorted(listed_added)}")
        return problems

    def settle_check(self, where: str, require_connected: bool = True) -> dict:
        """A check after a recovery: problems still there STUCK_AFTER later are stuck."""
        first = now()
        problems = self.check_state(where, require_connected)
        if not problems:
            return {"ok": True}
        say(f"  state problems after {where}: {problems}")
        while now() - first < STUCK_AFTER:
            time.sleep(1.0)
            later = self.check_state(where, require_connected)
            if not later:
                self.anomalies.append({"t": r3(first), "where": where, "problems": problems,
                                       "stuck": False, "cleared_after": r3(now() - first)})
                say(f"  ... cleared after {now() - first:.1f}s")
                return {"ok": False, "stuck": False, "problems": problems}
            problems = later
        self.anomalies.append({"t": r3(first), "where": where, "problems": problems,
                               "stuck": True})
        say(f"  STUCK for {STUCK_AFTER:g}s: {problems}")
        return {"ok": False, "stuck": True, "problems": problems}

    def periodic_check(self) -> None:
        """Between faults and during them: invariants only (no 'must be connected')."""
        if not self.change_lock.acquire(blocking=False):
            return
        try:
            if self.daemon is None or self.daemon.pid is None:
                return
            t = now()
            problems = self.check_state("periodic", require_connected=False)
        finally:
            self.change_lock.release()
        if problems == ["tunnelctl list --json failed"]:
            return
        for p, (first, stuck) in list(self._periodic_seen.items()):
            if p not in problems:
                del self._periodic_seen[p]
                if not stuck:
                    self.anomalies.append({"t": r3(first), "where": "periodic",
                                           "problems": [p], "stuck": False,
                                           "cleared_after": r3(t - first)})
        for p in problems:
            first, stuck = self._periodic_seen.setdefault(p, (t, False))
            if not stuck and t - first >= STUCK_AFTER:
                self._periodic_seen[p] = (first, True)
                self.anomalies.append({"t": r3(first), "where": "periodic",
                                       "problems": [p], "stuck": True})
                say(f"STUCK (periodic, since {first:.1f}): {p}")

    # -- background: /proc sampler and periodic checks -----------------------------------------

    def sampler(self) -> None:
        interval = 1.0 if self.short else 2.0
        next_check = now() + STATE_CHECK_EVERY
        while not self.stop_bg.wait(interval):
            d = self.daemon
            pid = d.pid if d else None
            if pid is not None and proc_state(pid) in (None, "Z", "X"):
                try:
                    self.handle_crash(pid)
                except Exception as exc:  # noqa: BLE001 - reported; the run goes on
                    self.harness_errors.append(f"restart after a crash: {exc!r}")
                continue
            if pid is not None:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    fds = len(os.listdir(f"/proc/{pid}/fd"))
                    stat = Path(f"/proc/{pid}/stat").read_text()
                    ticks = stat[stat.rfind(")") + 2:].split()
                    cpu = (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")
                    fields = dict(line.split(":", 1) for line in status.splitlines()
                                  if ":" in line)
                    life = self.daemon_lives[-1]
                    if life["pid"] == pid:
                        self.samples.append({
                            "t": r3(now()), "pid": pid, "life": len(self.daemon_lives) - 1,
                            "age": r3(now() - life["start"]),
                            "rss_kib": int(fields["VmRSS"].split()[0]),
                            "threads": int(fields["Threads"]), "fds": fds,
                            "cpu_s": round(cpu, 2)})
                except (OSError, KeyError, ValueError, IndexError):
                    pass
            if now() >= next_check:
                next_check = now() + STATE_CHECK_EVERY
                try:
                    self.periodic_check()
                except Exception as exc:  # noqa: BLE001 - a harness bug: reported
                    self.harness_errors.append(f"periodic check: {exc!r}")

    def handle_crash(self, pid: int) -> None:
        """The daemon died without our kill -9: record it (a failure), restart it so that the
        soak goes on.  Skipped while a kill9 fault holds the lock (that death is ours)."""
        if not self.change_lock.acquire(timeout=0.5):
            return
        try:
            d = self.daemon
            if d is None or d.pid != pid or proc_state(pid) not in (None, "Z", "X"):
                return
            t = now()
            reap(pid)
            last_seen = max((x["t"] for x in self.samples if x["pid"] == pid),
                            default=self.daemon_lives[-1]["start"])
            window = [last_seen, None]
            self.down_windows.append(window)  # type: ignore[arg-type]
            try:
                tail = d.log_file.read_text(errors="replace").splitlines()[-15:]
            except OSError:
                tail = []
            crash = {"t": r3(t), "pid": pid, "last_seen_alive": r3(last_seen),
                     "log_tail": tail}
            self.crashes.append(crash)
            d.pid = None
            self.daemon_lives[-1].update(end=t, crashed=True)
            say(f"DAEMON {pid} DIED ON ITS OWN (last seen alive at {last_seen:.1f}); "
                "restarting it")
            d.start()
            self.daemon_lives.append({"pid": d.pid, "start": now(), "how": "after a crash"})
            crash["restarted_pid"] = d.pid
            if not self.wait_listed():
                crash["note"] = "the restarted daemon did not list every forward"
            window[1] = now()
        finally:
            self.change_lock.release()

    def wait_listed(self) -> bool:
        """Wait until the daemon lists every expected forward (bound); False on time-out."""
        assert self.daemon is not None
        deadline = now() + DAEMON_START_TIMEOUT
        while now() < deadline:
            data = self.daemon.list()
            host = next((h for h in (data or {}).get("hosts", []) if h["name"] == ALIAS), None)
            ports = {int(x["listen"].rsplit(":", 1)[1]) for x in
                     (host or {}).get("forwards", []) if x.get("state") != "closed"}
            if {self.forwards[n].port for n in self.expected} <= ports:
                return True
            time.sleep(0.05)
        return False

    # -- faults ----------------------------------------------------------------------------

    def ctl_step(self, fault: dict, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.daemon is not None
        t = now()
        r = self.daemon.ctl(*args)
        entry = {"t": r3(t), "command": "tunnelctl " + " ".join(args), "rc": r.returncode,
                 "secs": r3(now() - t)}
        if r.returncode != 0:
            entry["stderr"] = r.stderr.strip()[-2000:]
            say(f"  COMMAND FAILED: {entry['command']} -> {r.returncode}: {r.stderr.strip()}")
        self.commands.append(entry)
        fault.setdefault("commands", []).append(entry)
        return r

    def fault_rst(self, f: dict) -> None:
        f["start"] = now()
        f["params"] = {"reset": self.proxy.cmd("reset")}  # type: ignore[union-attr]
        f["end"] = now()

    def fault_blackhole(self, f: dict) -> None:
        secs = self.rng.uniform(2, 6 if self.short else 20)
        f["params"] = {"secs": r3(secs)}
        f["start"] = now()
        self.proxy.cmd("pause")  # type: ignore[union-attr]
        self.stop_bg.wait(secs)
        self.proxy.cmd("reset")  # type: ignore[union-attr]
        self.proxy.cmd("resume")  # type: ignore[union-attr]
        f["end"] = now()

    def fault_sshd_restart(self, f: dict) -> None:
        down = self.rng.uniform(0, 2)
        f["params"] = {"down_secs": r3(down)}
        f["start"] = now()
        self.sshd.kill({self.targets_pid} if self.targets_pid else set())  # type: ignore
        self.stop_bg.wait(down)
        self.sshd.start()  # type: ignore[union-attr]
        f["end"] = now()

    def fault_refused(self, f: dict) -> None:
        secs = self.rng.uniform(2, 5)
        f["params"] = {"secs": r3(secs)}
        f["start"] = now()
        self.proxy.cmd("reset")  # type: ignore[union-attr]
        self.proxy.cmd("close")  # type: ignore[union-attr]
        self.stop_bg.wait(secs)
        self.proxy.cmd("open")  # type: ignore[union-attr]
        f["end"] = now()

    def fault_kill9(self, f: dict) -> None:
        assert self.daemon is not None
        gap = self.rng.uniform(0.5, 2)
        how = "autostart" if self.restart_count % 2 == 0 else "tunneld"
        self.restart_count += 1
        f["params"] = {"down_secs": r3(gap), "restart": how, "old_pid": self.daemon.pid}
        with self.change_lock:
            f["start"] = now()
            window = [f["start"], None]
            self.down_windows.append(window)  # type: ignore[arg-type]
            self.daemon.kill9()
            self.daemon_lives[-1]["end"] = now()
            self.stop_bg.wait(gap)
            f["restart_at"] = r3(now())
            if how == "tunneld":
                self.daemon.start()
            else:
                self.daemon.autostart()
            self.daemon_lives.append({"pid": self.daemon.pid, "start": now(), "how": how})
            f["params"]["new_pid"] = self.daemon.pid
            # back: it answers and lists every forward it should have restored
            if not self.wait_listed():
                f.setdefault("notes", []).append("the restarted daemon did not list every "
                                                 f"forward within {DAEMON_START_TIMEOUT:g}s")
            window[1] = now()
            f["end"] = now()
            f["daemon_down_secs"] = r3(f["end"] - f["start"])

    def fault_reload(self, f: dict) -> None:
        fwd = self.forwards["reload-echo"]
        with self.change_lock:
            self.reload_declared = not self.reload_declared
            f["params"] = {"reload-echo": "declared" if self.reload_declared else "dropped"}
            self.write_config()
            f["start"] = now()
            r = self.ctl_step(f, "reload")
            if r.returncode != 0:  # the running config stays: so does ours (failure counted)
                self.reload_declared = not self.reload_declared
                self.write_config()
            elif self.reload_declared:
                self.expected.add(fwd.name)
            else:
                self.expected.discard(fwd.name)
            f["end"] = now()
        if r.returncode == 0 and not self.reload_declared:
            self.closed_check(fwd, "after it left the config")

    def fault_reconnect(self, f: dict) -> None:
        f["start"] = now()
        self.ctl_step(f, "reconnect", ALIAS)
        f["end"] = now()

    def fault_add_remove(self, f: dict) -> None:
        fwd = self.forwards["dyn-echo"]
        with self.change_lock:
            adding = fwd.name not in self.expected
            f["params"] = {"dyn-echo": "added" if adding else "removed"}
            f["start"] = now()
            r = self.ctl_step(f, "add" if adding else "remove", ALIAS, fwd.spec)
            if r.returncode == 0:  # else the failure is counted and our view stays
                (self.expected.add if adding else self.expected.discard)(fwd.name)
            f["end"] = now()
        if r.returncode == 0 and not adding:
            self.closed_check(fwd, "after tunnelctl remove")

    FAULTS = {"rst": fault_rst, "blackhole": fault_blackhole,
              "sshd-restart": fault_sshd_restart, "refused": fault_refused,
              "kill9": fault_kill9, "reload": fault_reload, "reconnect": fault_reconnect,
              "add-remove": fault_add_remove}
    #: seconds a fault may take, for the schedule (it starts only if it can end in the run)
    BUDGET = {"rst": 1, "blackhole": 21, "sshd-restart": 4, "refused": 6, "kill9": 6,
              "reload": 2, "reconnect": 2, "add-remove": 2}

    def fault_loop(self) -> None:
        gaps = (1.0, 3.0) if self.short else (3.0, 12.0)
        kill_every = KILL9_EVERY_SHORT if self.short else KILL9_EVERY
        last_kill: float | None = None
        cycle = 0
        bag: list[str] = []
        while not self.stop_bg.is_set():
            if not bag:
                kill_due = last_kill is None or now() - last_kill >= kill_every
                bag = [k for k in FAULT_KINDS if k != "kill9" or kill_due]
                self.rng.shuffle(bag)
                if self.short and cycle == 0:
                    # kill9 first (bag.pop() takes the last): one daemon life spans most of a
                    # short run, long enough for the resource trend
                    bag.remove("kill9")
                    bag.append("kill9")
                cycle += 1
            kind = bag.pop()
            gap = self.rng.uniform(*gaps)
            budget = self.BUDGET[kind] if not (kind == "blackhole" and self.short) else 7
            if now() + gap + budget > self.run_end:
                # try the kinds left in this cycle that fit; else the run is over
                fitting = [k for k in bag if now() + gap + self.BUDGET[k] <= self.run_end]
                if not fitting:
                    return
                bag.remove(fitting[0])
                bag.append(kind)
                kind = fitting[0]
            if self.stop_bg.wait(gap):
                return
            if kind == "kill9":
                last_kill = now()
            self.run_fault(kind, cycle)

    def run_fault(self, kind: str, cycle: int) -> None:
        f: dict[str, Any] = {"n": len(self.faults) + 1, "kind": kind, "cycle": cycle}
        say(f"fault {f['n']}: {kind}")
        try:
            self.FAULTS[kind](self, f)
        except Exception as exc:  # noqa: BLE001 - a harness step failed: fatal for the run
            f.setdefault("start", now())
            f["end"] = now()
            f["error"] = repr(exc)
            self.harness_errors.append(f"fault {kind}: {exc!r}")
            say(f"  HARNESS ERROR during {kind}: {exc!r}")
            self.faults.append(self._fault_record(f))
            raise
        rec = self.wait_all_working(f["end"])
        f["recovery_per_forward"] = {k: r3(v) for k, v in sorted(rec.items())}
        f["recovered"] = all(v is not None for v in rec.values())
        f["recovery"] = r3(max(rec.values())) if f["recovered"] and rec else None
        f["recovered_at"] = r3(f["end"] + (f["recovery"] or RECOVERY_LIMIT))
        if "restart_at" in f and f["recovery"] is not None:
            f["restart_to_working"] = r3(f["end"] + f["recovery"] - f["restart_at"])
        f["state"] = self.settle_check(f"{kind} #{f['n']}")
        say(f"  {kind} {json.dumps(f.get('params', {}))}: lasted {f['end'] - f['start']:.2f}s,"
            f" recovered in " + (f"{f['recovery']:.3f}s" if f["recovered"] else "NEVER")
            + ("" if f["state"]["ok"] else f"; state: {f['state']}"))
        self.faults.append(self._fault_record(f))

    @staticmethod
    def _fault_record(f: dict) -> dict:
        out = dict(f)
        for k in ("start", "end"):
            if k in out:
                out[k + "_wall"] = wall(out[k])
                out[k] = r3(out[k])
        return out

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> None:
        assert self.daemon is not None
        self.run_start = now()
        self.run_end = self.run_start + self.minutes * 60
        f = self.forwards
        self.load = Load(self.stats, [f["echo-a"].port, f["echo-b"].port, f["echo-cfg"].port],
                         [f["bulk-a"].port, f["bulk-b"].port], self.seed, self.short)
        self.load.start()
        t = threading.Thread(target=self.sampler, name="sampler", daemon=True)
        t.start()
        self.bg_threads.append(t)
        say(f"load running; faults for {self.minutes:g} min")
        self.stop_bg.wait(3.0)  # let the load get going before the first fault
        try:
            self.fault_loop()
            left = self.run_end - now()
            if left > 0:
                self.stop_bg.wait(left)
        finally:
            say("run over: stopping the load")
            stuck = self.load.close()
            if stuck:
                self.harness_errors.append(f"load threads did not stop: {stuck}")
        self.final_state = self.settle_check("the end of the run")
        self.stop_bg.set()
        for t in self.bg_threads:
            t.join(10)

    # -- tear-down -------------------------------------------------------------------------

    def stop_daemon(self) -> None:
        """First step of the tear-down (before the report, so its log is complete)."""
        self.stop_bg.set()
        if self.load is not None:
            self.load.stop.set()
        try:
            if self.daemon is not None:
                self.daemon.close()
        except Exception as exc:  # noqa: BLE001 - clean up the rest anyway
            self.teardown_errors.append(f"daemon: {exc!r}")

    def teardown(self) -> None:
        say("tear-down")
        self.stop_daemon()
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("proxy", lambda: self.proxy and self.proxy.close()),
            ("targets", lambda: self._close_targets()),
            ("sshd", lambda: self.sshd and self.sshd.proc and self.sshd.kill(set())),
            ("netns", lambda: self.ns and self.teardown_errors.extend(self.ns.close())),
        ]
        for name, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - clean up the rest anyway
                self.teardown_errors.append(f"{name}: {exc!r}")
        if self.args.keep:
            say(f"kept {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)
        for e in self.teardown_errors:
            say(f"TEAR-DOWN PROBLEM: {e}")

    def _close_targets(self) -> None:
        if self.targets is not None:
            with contextlib.suppress(OSError):
                self.targets.stdin.close()  # type: ignore[union-attr]
            stop_popen(self.targets, 3)
            if self.targets_pid:
                kill_and_wait({self.targets_pid})

    # -- the report ------------------------------------------------------------------------

    def scan_logs(self) -> dict:
        """ERROR/CRITICAL lines and tracebacks in the daemon's log files and stderr."""
        assert self.daemon is not None
        files = sorted(self.daemon.log_file.parent.glob(self.daemon.log_file.name + "*"),
                       key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
        out: dict[str, Any] = {"files": [str(p) for p in files]}
        for label, paths in (("log", files), ("stderr", [self.daemon.stderr_path])):
            errors, tracebacks, warnings, lines = [], [], 0, 0
            for p in paths:
                try:
                    text = p.read_text(errors="replace").splitlines()
                except OSError:
                    continue
                for i, line in enumerate(text):
                    lines += 1
                    level = re.match(r"(?:\d{4}-\d\d-\d\dT[\d:]+ )?([A-Z]+) ", line)
                    if level and level.group(1) in ("ERROR", "CRITICAL"):
                        errors.append(line[:500])
                    elif level and level.group(1) == "WARNING":
                        warnings += 1
                    if line.startswith("Traceback (most recent call last)"):
                        tracebacks.append("\n".join(text[max(0, i - 1):i + 25])[:3000])
            out[label] = {"lines": lines, "errors": len(errors), "warnings": warnings,
                          "tracebacks": len(tracebacks), "first_errors": errors[:8],
                          "first_tracebacks": tracebacks[:3]}
        return out

    def connect_attempts(self) -> dict:
        """Connection attempts of the daemon to the server: its log's ``-> connecting`` lines
        (one per attempt) and its summaries of repeated failures (``N more attempts failed the
        same way in Ss``, counted at the second they were logged), per second, overall and per
        fault kind; and the proxy's counters."""
        assert self.daemon is not None
        offset = time.time() - now()  # harness time = epoch - offset
        per_sec: Counter = Counter()
        summarised = 0
        for p in sorted(self.daemon.log_file.parent.glob(self.daemon.log_file.name + "*")):
            with contextlib.suppress(OSError):
                for line in p.read_text(errors="replace").splitlines():
                    if f"{ALIAS}: " not in line:
                        continue
                    m = re.search(r": (\d+) more attempts failed", line)
                    n = 1 if " -> connecting" in line else int(m.group(1)) if m else 0
                    summarised += int(m.group(1)) if m else 0
                    if n:
                        with contextlib.suppress(ValueError):
                            per_sec[int(time.mktime(time.strptime(line[:19],
                                                                  "%Y-%m-%dT%H:%M:%S")))] += n
        by_kind: Counter = Counter()
        for sec, n in per_sec.items():
            by_kind[self.fault_window_of(sec + 0.5 - offset) or "outside fault windows"] += n
        busiest = per_sec.most_common(1)
        out: dict[str, Any] = {
            "total": sum(per_sec.values()),
            "max_per_second": busiest[0][1] if busiest else 0,
            "busiest_second": wall(busiest[0][0] - offset) if busiest else None,
            "of_them_from_summaries": summarised,
            "by_fault": dict(by_kind)}
        if self.proxy is not None and self.proxy.proc.poll() is None:
            with contextlib.suppress(Exception):
                out["proxy"] = json.loads(self.proxy.cmd("stats")[3:])
        return out

    def resource_trend(self) -> dict:
        lives = []
        for i, life in enumerate(self.daemon_lives):
            every = [s for s in self.samples if s["life"] == i]
            ss = [s for s in every if s["age"] >= WARMUP]
            entry: dict[str, Any] = {"life": i, "pid": life["pid"], "how": life["how"],
                                     "samples": len(ss)}
            if len(every) >= 2 and every[-1]["t"] > every[0]["t"]:
                entry["cpu_percent"] = round(100 * (every[-1]["cpu_s"] - every[0]["cpu_s"])
                                             / (every[-1]["t"] - every[0]["t"]), 1)
            if ss:
                entry["span"] = r3(ss[-1]["t"] - ss[0]["t"])
            if len(ss) < 6 or ss[-1]["t"] - ss[0]["t"] < TREND_MIN_SPAN:
                entry["judged"] = False
                lives.append(entry)
                continue
            third = len(ss) // 3
            first, last = ss[:third], ss[-third:]
            entry["judged"] = True
            growth_ok = True
            for key in ("fds", "threads", "rss_kib"):
                a = statistics.median(s[key] for s in first)
                b = statistics.median(s[key] for s in last)
                entry[key] = {"first_third": a, "last_third": b, "growth": b - a,
                              "min": min(s[key] for s in ss), "max": max(s[key] for s in ss)}
            if entry["fds"]["growth"] > FD_GROWTH_MAX:
                growth_ok = False
            if entry["threads"]["growth"] > THREAD_GROWTH_MAX:
                growth_ok = False
            r = entry["rss_kib"]
            if r["growth"] > RSS_GROWTH_MAX_KIB and r["growth"] > RSS_GROWTH_MAX_FRACTION * \
                    r["first_third"]:
                growth_ok = False
            entry["ok"] = growth_ok
            lives.append(entry)
        return {"lives": lives,
                "thresholds": {"fds": FD_GROWTH_MAX, "threads": THREAD_GROWTH_MAX,
                               "rss": f"{RSS_GROWTH_MAX_FRACTION:.0%} and "
                                      f"{RSS_GROWTH_MAX_KIB // 1024} MiB",
                               "warmup_s": WARMUP, "min_span_s": TREND_MIN_SPAN}}

    def fault_window_of(self, t: float) -> str | None:
        """The kind of the last fault started before ``t`` if ``t`` is within its window
        (start - 0.5 s to recovery + CUT_ATTRIBUTION_SLACK), else None."""
        last = None
        for f in self.faults:
            if f.get("start") is not None and f["start"] - 0.5 <= t:
                last = f
        if last is None:
            return None
        end = last.get("recovered_at") or last.get("end") or last["start"]
        return last["kind"] if t <= end + CUT_ATTRIBUTION_SLACK else None

    def figures(self) -> dict:
        st = self.stats
        in_down = lambda t: any(a <= t <= (b if b is not None else now())  # noqa: E731
                                for a, b in self.down_windows)
        refused_down = [r for r in st.refused if in_down(r["t"])]
        refused_up = [r for r in st.refused if not in_down(r["t"])]
        cuts_by_fault: Counter = Counter()
        outside = []
        for c in st.cuts:
            k = self.fault_window_of(c["t"])
            cuts_by_fault[k or "outside any fault window"] += 1
            if k is None:
                outside.append(c)
        recovery: dict[str, Any] = {}
        for kind in FAULT_KINDS:
            fs = [f for f in self.faults if f["kind"] == kind]
            vals = [f["recovery"] for f in fs if f.get("recovery") is not None]
            recovery[kind] = {"count": len(fs), "not_recovered": sum(1 for f in fs
                                                                     if not f.get("recovered")),
                              "median": r3(statistics.median(vals)) if vals else None,
                              "max": r3(max(vals)) if vals else None,
                              "all": vals}
        down = [f["daemon_down_secs"] for f in self.faults if "daemon_down_secs" in f]
        return {
            "bytes_checked": st.bytes_checked,
            "transfers_ok": dict(st.ok),
            "connections": st.connections,
            "corrupted_transfers": len(st.corrupted),
            "corrupted_bytes": st.corrupted_bytes,
            "corruptions": st.corrupted[:50],
            "refused": {"while_daemon_ran": len(refused_up), "daemon_down": len(refused_down),
                        "while_daemon_ran_events": refused_up[:50],
                        "daemon_down_windows": [[r3(a), r3(b)] for a, b in self.down_windows]},
            "cut": {"total": len(st.cuts),
                    "by_workload": dict(Counter(c["workload"] for c in st.cuts)),
                    "by_reason": dict(Counter(re.sub(r"\(\d+ of \d+ bytes", "(n of N bytes",
                                                     c["reason"]) for c in st.cuts)),
                    "by_fault": dict(cuts_by_fault),
                    # a cut that ends in a clean EOF looks complete to a protocol delimited
                    # by EOF; only the length the harness knows tells it apart
                    "ended_by_clean_eof": sum(1 for c in st.cuts if "EOF" in c["reason"]),
                    "outside_fault_windows": outside[:50]},
            "stalled": st.stalls,
            "connect_errors": {"total": len(st.connect_errors),
                               "by_error": dict(Counter(e["error"] for e in st.connect_errors)),
                               "first": st.connect_errors[:20]},
            "recovery": recovery,
            "daemon_down_secs": down,
            "kill9_restart_to_working": [f["restart_to_working"] for f in self.faults
                                         if "restart_to_working" in f],
            "connect_attempts": self.connect_attempts(),
            "states": {"stuck": [a for a in self.anomalies if a["stuck"]],
                       "transient": [a for a in self.anomalies if not a["stuck"]]},
            "commands": {"total": len(self.commands),
                         "failed": [c for c in self.commands if c["rc"] != 0]},
            "resources": self.resource_trend(),
            "log": self.scan_logs(),
            "daemon_lives": self.daemon_lives,
            "crashes": self.crashes,
            "harness_errors": self.harness_errors + self.stats.harness_errors,
        }

    def criteria(self, fig: dict) -> list[dict]:
        host_rec = [v for k in HOST_FAULTS for v in fig["recovery"][k]["all"]]
        host_max = max(host_rec) if host_rec else None
        not_rec = [f"{f['kind']} #{f['n']}" for f in self.faults if not f.get("recovered")]
        def per_kind(kinds: tuple[str, ...]) -> str:
            return "; ".join(f"{k} n={v['count']} median {v['median']} max {v['max']}"
                             for k, v in fig["recovery"].items() if v["count"] and k in kinds)
        res = fig["resources"]
        judged = [l for l in res["lives"] if l.get("judged")]
        res_text = "; ".join(
            f"life {l['life']} ({l['span']}s, cpu {l.get('cpu_percent')}%): fds "
            f"{l['fds']['first_third']}->"
            f"{l['fds']['last_third']}, threads {l['threads']['first_third']}->"
            f"{l['threads']['last_third']}, rss {l['rss_kib']['first_third'] / 1024:.1f}->"
            f"{l['rss_kib']['last_third'] / 1024:.1f} MiB" for l in judged) or \
            "no daemon life long enough to judge"
        log = fig["log"]
        kinds_run = {f["kind"] for f in self.faults}
        harness_errors = self.harness_errors + self.stats.harness_errors
        missing_kinds = [k for k in FAULT_KINDS if k not in kinds_run]
        c = []

        def crit(name: str, ok: bool, figure: str) -> None:
            c.append({"criterion": name, "pass": bool(ok), "figure": figure})

        crit("corrupted bytes = 0", fig["corrupted_bytes"] == 0 and
             fig["corrupted_transfers"] == 0,
             f"{fig['corrupted_bytes']} bytes in {fig['corrupted_transfers']} transfers "
             f"(of {fig['bytes_checked'] / 1e6:.1f} MB checked)")
        crit("refused connections while the daemon ran = 0",
             fig["refused"]["while_daemon_ran"] == 0,
             f"{fig['refused']['while_daemon_ran']} (while the daemon was down, after kill -9 "
             f"or a crash: {fig['refused']['daemon_down']}, reported)")
        crit(f"recovery after host faults <= {HOST_FAULT_RECOVERY_MAX:g} s",
             host_max is not None and host_max <= HOST_FAULT_RECOVERY_MAX
             and not any(fig["recovery"][k]["not_recovered"] for k in HOST_FAULTS),
             f"max {host_max}s over {len(host_rec)} host faults ({per_kind(HOST_FAULTS)})")
        others = tuple(k for k in FAULT_KINDS if k not in HOST_FAULTS)
        crit(f"every fault recovered within {RECOVERY_LIMIT:g} s", not not_rec,
             f"not recovered: {', '.join(not_rec) or 'none'} (other kinds: "
             f"{per_kind(others)})")
        crit("no transfer stalled", not fig["stalled"],
             f"{len(fig['stalled'])} stalled (no progress for {STALL_LIMIT:g}s)")
        crit("no forward or host stuck in a wrong state", not fig["states"]["stuck"],
             f"{len(fig['states']['stuck'])} stuck, {len(fig['states']['transient'])} transient"
             + (f"; first: {fig['states']['stuck'][0]['problems']}" if fig["states"]["stuck"]
                else ""))
        crit("the daemon never died on its own", not self.crashes,
             f"{len(self.crashes)} deaths" + (f"; first at {self.crashes[0]['t']}s, log tail: "
                                              f"{self.crashes[0]['log_tail'][-3:]}"
                                              if self.crashes else ""))
        crit("every tunnelctl command succeeded", not fig["commands"]["failed"],
             f"{len(fig['commands']['failed'])} of {fig['commands']['total']} failed")
        crit("no clear growth of fds/threads/RSS", all(l["ok"] for l in judged), res_text)
        crit("no traceback or ERROR line in the daemon log",
             log["log"]["tracebacks"] + log["stderr"]["tracebacks"] == 0
             and log["log"]["errors"] + log["stderr"]["errors"] == 0,
             f"log: {log['log']['errors']} ERROR, {log['log']['tracebacks']} tracebacks, "
             f"{log['log']['warnings']} WARNING lines; stderr: {log['stderr']['errors']} ERROR,"
             f" {log['stderr']['tracebacks']} tracebacks")
        crit("the harness did its work", not missing_kinds and not harness_errors
             and fig["bytes_checked"] > 0 and fig["transfers_ok"].get("upload", 0) > 0
             and fig["transfers_ok"].get("download", 0) > 0,
             f"{len(self.faults)} faults, kinds missing: {missing_kinds or 'none'}; "
             f"harness errors: {harness_errors or 'none'}")
        return c

    def report(self) -> tuple[dict, list[dict]]:
        fig = self.figures()
        crits = self.criteria(fig)
        return fig, crits


def print_report(soak: Soak, fig: dict, crits: list[dict], json_path: Path) -> None:
    kinds = Counter(f["kind"] for f in soak.faults)
    ok = fig["transfers_ok"]
    lines = [
        f"tunneld soak: {soak.minutes:g} min, seed {soak.seed}, {len(soak.faults)} faults ("
        + ", ".join(f"{k} {kinds[k]}" for k in FAULT_KINDS if kinds[k]) + ")",
        f"load: {fig['bytes_checked'] / 1e6:.1f} MB checked; {fig['connections']} connections; "
        f"ok: " + ", ".join(f"{k} {v}" for k, v in sorted(ok.items())),
        f"cut by faults (expected): {fig['cut']['total']} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(fig['cut']['by_workload'].items()))}); "
        f"by fault: {', '.join(f'{k} {v}' for k, v in sorted(fig['cut']['by_fault'].items()))};"
        f" {fig['cut']['ended_by_clean_eof']} of them ended in a clean EOF (FIN), not a reset",
        "recovery (s) per kind: " + "; ".join(
            f"{k} {v['median']}/{v['max']}" for k, v in fig["recovery"].items() if v["count"])
        + "  (median/max)",
    ]
    if fig["daemon_down_secs"]:
        lines.append(f"daemon down after kill -9 (s): {fig['daemon_down_secs']}; from the "
                     f"restart command to every forward working: "
                     f"{fig['kill9_restart_to_working']}")
    ca = fig["connect_attempts"]
    lines.append(f"daemon's connection attempts to the server: {ca['total']} (max "
                 f"{ca['max_per_second']} in one second); by fault: "
                 + ", ".join(f"{k} {v}" for k, v in sorted(ca["by_fault"].items())))
    if fig["connect_errors"]["total"]:
        lines.append(f"other connect errors: {fig['connect_errors']['by_error']}")
    for c in crits:
        lines.append(f"{'PASS' if c['pass'] else 'FAIL'}  {c['criterion']}: {c['figure']}")
    log = fig["log"]
    for e in (log["log"]["first_errors"] + log["stderr"]["first_errors"])[:5]:
        lines.append(f"   log: {e}")
    for tb in (log["log"]["first_tracebacks"] + log["stderr"]["first_tracebacks"])[:2]:
        lines.append("   traceback:\n      " + tb.replace("\n", "\n      "))
    overall = all(c["pass"] for c in crits)
    lines.append(f"{'PASS' if overall else 'FAIL'} overall; figures and timeline in {json_path}")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_targets"]:
        return targets_main()
    if argv[:1] == ["_proxy"]:
        return proxy_main(argv[1], argv[2])
    ap = argparse.ArgumentParser(description="chaos soak of tunneld (see the module docstring)")
    ap.add_argument("--minutes", type=float, default=15.0, help="length of the run (default 15)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the fault schedule and "
                    "payloads (default: random, printed)")
    ap.add_argument("--json", type=Path, default=BENCH / "soak-results.json",
                    help="where to write all figures (default bench/soak-results.json)")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    soak = Soak(args)
    say(f"seed {args.seed}, {args.minutes:g} min")
    status = 0
    setup_ok = False
    interrupted = None
    try:
        try:
            soak.setup()
            setup_ok = True
            soak.run()
        except KeyboardInterrupt as exc:
            interrupted = str(exc) or "^C"
            say(f"interrupted ({interrupted})")
        except Exception as exc:  # noqa: BLE001 - reported, then torn down
            soak.harness_errors.append(f"{'run' if setup_ok else 'set-up'}: {exc!r}")
            say(f"{'RUN' if setup_ok else 'SET-UP'} FAILED: {exc!r}")
        finally:
            fig, crits = {}, []
            try:
                if soak.load is not None:
                    soak.load.close()
                soak.stop_daemon()
                if setup_ok:
                    fig, crits = soak.report()
            except Exception as exc:  # noqa: BLE001 - a harness bug: reported, torn down
                soak.harness_errors.append(f"report: {exc!r}")
                say(f"REPORT FAILED: {exc!r}")
            finally:
                soak.teardown()
    except KeyboardInterrupt:
        say("interrupted during tear-down; running it again")
        soak.teardown()
        return 130
    doc = {"seed": args.seed, "minutes": args.minutes, "started": wall(0.0),
           "interrupted": interrupted, "setup_ok": setup_ok,
           "settings": {"keepalive_interval": KEEPALIVE_INTERVAL,
                        "keepalive_count_max": KEEPALIVE_COUNT_MAX,
                        "connect_timeout": CONNECT_TIMEOUT, "hold_timeout": HOLD_TIMEOUT,
                        "stall_limit": STALL_LIMIT, "recovery_limit": RECOVERY_LIMIT},
           "forwards": {n: {"port": f.port, "target": f.target, "origin": f.origin}
                        for n, f in soak.forwards.items()},
           "criteria": crits, "figures": fig, "faults": soak.faults,
           "commands": soak.commands, "samples": soak.samples,
           "harness_errors": soak.harness_errors + soak.stats.harness_errors,
           "teardown_errors": soak.teardown_errors}
    try:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    except OSError as exc:
        say(f"cannot write {args.json}: {exc}")
    if fig:
        print_report(soak, fig, crits, args.json)
    if interrupted:
        status = 130
    elif not setup_ok:
        status = 2
    elif not crits or not all(c["pass"] for c in crits) or soak.teardown_errors:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
