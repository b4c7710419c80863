"""Fixtures for end-to-end tests against a real OpenSSH ``sshd`` on loopback.

See design.md section 8.  Fixtures provided here:

``sshd``
    A started :class:`SSHServer` (function scope): a throw-away sshd on a free
    127.0.0.1 port, with its own host key and ``AuthorizedKeysFile``, plus a
    temporary ``HOME`` whose ``~/.ssh/config`` names it as ``testhost``.
    Teardown kills every session process and the listener.

``netns_sshd``
    Like ``sshd`` but the sshd runs inside a network namespace made for the test
    (``ip netns``, needs root), so the server has its *own* loopback: the
    server's 127.0.0.1 is not the client's.  It listens on port 22 of the
    namespace side of a veth pair (``sshd.listen_host``, 10.251.x.y/30) and the
    alias is ``netnshost``.  ``sshd.exec_in_ns(argv)`` prefixes ``argv`` with
    ``ip netns exec NS`` to start targets that only the server side can reach.
    Teardown kills every process left in the namespace, then deletes the veth
    pair and the namespace (also when the test failed).

``netns_daemon``
    Like ``daemon``, but on ``netns_sshd``.

``free_port``
    A callable ``free_port(host="127.0.0.1") -> int``.

``echo_server``
    A factory ``echo_server(host="127.0.0.2", port=0, greeting=None) -> (host, port)``
    starting a thread-based TCP echo server (closed at teardown).

Notes for users of ``sshd``:

* The OpenSSH *client* reads ``~/.ssh/config`` from the passwd home directory,
  not from ``$HOME``, so run it as ``ssh -F <home>/.ssh/config testhost ...``
  with ``env=sshd.env``.  All paths in the generated config are absolute.
* asyncssh expands ``~`` through ``$HOME``: set it in ``os.environ`` (e.g.
  ``monkeypatch.setenv("HOME", str(sshd.home))``) before ``asyncssh.connect``.
* ``stop()`` only stops the listener; sessions that are already established
  keep running in their own sshd processes (as with a real sshd restart).
  ``kill_connections()`` kills those, also after ``stop()``.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
KILL_TIMEOUT = 10.0


# --------------------------------------------------------------------------
# helpers


def _free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _find_sshd() -> str:
    found = shutil.which("sshd")
    candidates = ([found] if found else []) + list(SSHD_CANDIDATES)
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            # sshd refuses to re-exec unless started with an absolute path
            return os.path.abspath(path)
    pytest.fail(
        "OpenSSH sshd not found (looked on PATH and in "
        f"{', '.join(SSHD_CANDIDATES)}); the e2e tests need a real sshd: "
        "run `apt-get install -y openssh-server`",
        pytrace=False,
    )


def _find_tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"{name} not found; run `apt-get install -y openssh-client openssh-server`",
            pytrace=False,
        )
    return path


def _known_host_name(host: str, port: int) -> str:
    """How ssh writes ``host``:``port`` in known_hosts."""
    return host if port == 22 else f"[{host}]:{port}"


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        [_find_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", comment,
         "-f", str(path)],
        check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
    )


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, starttime, state) for every process in /proc."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read().decode("ascii", "replace")
        except OSError:
            continue
        # "pid (comm) state ppid ..." -- comm may contain spaces and parens
        rest = data[data.rfind(")") + 2:].split()
        try:
            table[int(entry)] = (int(rest[1]), int(rest[19]), rest[0])
        except (IndexError, ValueError):
            continue
    return table


def _descendants(table: dict[int, tuple[int, int, str]], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _start, _state) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def _alive(table: dict[int, tuple[int, int, str]], pid: int, start: int) -> bool:
    info = table.get(pid)
    return info is not None and info[1] == start and info[2] not in ("Z", "X")


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


# --------------------------------------------------------------------------
# SSHServer


@dataclass
class SSHServer:
    """A throw-away OpenSSH sshd plus a temp HOME naming it.

    By default it listens on 127.0.0.1.  With ``netns`` set it is started as
    ``ip netns exec NETNS sshd ...`` (the namespace must exist and reach
    ``listen_host`` from the root namespace; see the ``netns_sshd`` fixture).
    """

    home: Path
    host: str
    port: int
    workdir: Path
    env: dict[str, str]
    sshd_log: Path
    sshd_path: str = "/usr/sbin/sshd"
    user: str = field(default_factory=lambda: pwd.getpwuid(os.getuid()).pw_name)
    # network namespace sshd runs in (None: the caller's), and the address it
    # listens on (reachable from the root namespace)
    netns: str | None = None
    listen_host: str = "127.0.0.1"
    # the NetNS made for this server by netns_ssh_server() (None otherwise)
    ns: NetNS | None = field(default=None, repr=False)
    # extra environment of the commands this sshd runs (sshd_config ``SetEnv``, after HOME)
    server_env: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    # (pid, starttime) of session processes seen under the listener; kept so
    # that kill_connections() still finds them after stop() orphaned them
    _sessions: set[tuple[int, int]] = field(default_factory=set, init=False, repr=False)

    # ---- paths ---------------------------------------------------------
    @property
    def ssh_config(self) -> Path:
        return self.home / ".ssh" / "config"

    @property
    def identity(self) -> Path:
        return self.home / ".ssh" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.home / ".ssh" / "known_hosts"

    @property
    def sshd_config(self) -> Path:
        return self.workdir / "sshd_config"

    @property
    def server_home(self) -> Path:
        """``HOME`` of the commands this sshd runs (sshd_config ``SetEnv``)."""
        return self.workdir / "server-home"

    @property
    def host_key(self) -> Path:
        return self.workdir / "ssh_host_ed25519_key"

    @property
    def authorized_keys(self) -> Path:
        return self.workdir / "authorized_keys"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "sshd.pid"

    @property
    def stderr_log(self) -> Path:
        """sshd's stdout/stderr (errors before -E takes effect end up here)."""
        return self.workdir / "sshd.stderr"

    @property
    def pid(self) -> int | None:
        """pid of the running listener, or None."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def address(self) -> tuple[str, int]:
        """(listen_host, port): where sshd accepts connections from the root namespace."""
        return (self.listen_host, self.port)

    def exec_in_ns(self, argv: list[str]) -> list[str]:
        """``argv`` prefixed to run inside the server's network namespace (if it has one)."""
        if self.netns is None:
            return list(argv)
        return ["ip", "netns", "exec", self.netns, *argv]

    # ---- setup ---------------------------------------------------------
    @classmethod
    def create(cls, base: Path, *, port: int | None = None, host: str = "testhost",
               netns: str | None = None, listen_host: str = "127.0.0.1",
               server_env: dict[str, str] | None = None) -> SSHServer:
        """Generate keys and config files under ``base`` (does not start sshd).

        ``port`` defaults to a free port on ``listen_host``, or to 22 with ``netns``
        (a fresh namespace has nothing listening).  ``server_env`` is extra environment
        for the commands sshd runs (e.g. ``{"SLURM_CONF": ...}``; no spaces or quotes).
        """
        for key, value in (server_env or {}).items():
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), key
            assert not re.search(r"[\s\"'\\]", value), f"SetEnv cannot carry {value!r}"
        if port is None:
            port = 22 if netns is not None else _free_port(listen_host)
        workdir = base / "sshd"
        home = base / "home"
        workdir.mkdir(parents=True)
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        runtime = tempfile.mkdtemp(prefix="td-", dir="/tmp")  # mode 0700, short path
        env = dict(os.environ)
        env.pop("SSH_AUTH_SOCK", None)
        env.update(
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / ".config"),
            XDG_STATE_HOME=str(home / ".local" / "state"),
            XDG_DATA_HOME=str(home / ".local" / "share"),
            XDG_CACHE_HOME=str(home / ".cache"),
            XDG_RUNTIME_DIR=runtime,
        )
        server = cls(
            home=home,
            host=host,
            port=port,
            workdir=workdir,
            env=env,
            sshd_log=workdir / "sshd.log",
            sshd_path=_find_sshd(),
            netns=netns,
            listen_host=listen_host,
            server_env=dict(server_env or {}),
        )
        server._write_files()
        return server

    def _write_files(self) -> None:
        _keygen(self.host_key, "tunneld-test-hostkey")
        _keygen(self.identity, f"{self.user}@tunneld-test")
        shutil.copyfile(self.identity.with_suffix(".pub"), self.authorized_keys)
        self.authorized_keys.chmod(0o600)

        host_pub = self.host_key.with_suffix(".pub").read_text().split()
        self.known_hosts.write_text(
            f"{_known_host_name(self.listen_host, self.port)} {host_pub[0]} {host_pub[1]}\n")
        self.known_hosts.chmod(0o600)

        self.sshd_config.write_text(
            "\n".join([
                f"ListenAddress {self.listen_host}:{self.port}",
                f"HostKey {self.host_key}",
                f"PidFile {self.pid_file}",
                f"AuthorizedKeysFile {self.authorized_keys}",
                "StrictModes no",
                "UsePAM no",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "PermitRootLogin prohibit-password",
                "AllowTcpForwarding yes",
                "GatewayPorts no",
                "PermitOpen any",
                "AllowStreamLocalForwarding yes",
                "ClientAliveInterval 0",
                "MaxSessions 100",
                "MaxStartups 100:30:200",
                "LogLevel VERBOSE",
                "Subsystem sftp internal-sftp",
                "PermitUserEnvironment no",
                "PrintMotd no",
                # remote commands get a throw-away HOME (detached sessions keep their
                # directories under it), not the real one of the user the tests run as
                " ".join([f"SetEnv HOME={self.server_home}",
                          *(f"{k}={v}" for k, v in self.server_env.items())]),
                "",
            ])
        )
        self.server_home.mkdir(mode=0o700, exist_ok=True)
        self.ssh_config.write_text("")
        self.ssh_config.chmod(0o600)  # ssh rejects group/world-writable configs
        self.add_host_alias(self.host)

    def add_sshd_options(self, **options: str) -> None:
        """Append sshd_config keywords (e.g. ``RekeyLimit="1M"``); they apply from the next
        ``start()``.  sshd keeps the first value of a keyword, so only new ones are taken."""
        text = self.sshd_config.read_text()
        have = {line.split(None, 1)[0].lower() for line in text.splitlines() if line.strip()}
        for key, value in options.items():
            assert key.lower() not in have, f"{key} is set already; sshd keeps the first"
            text += f"{key} {value}\n"
        self.sshd_config.write_text(text)

    def add_host_alias(self, alias: str, **options: str) -> None:
        """Append ``Host alias`` to home/.ssh/config, pointing at this sshd.

        ``options`` are extra ssh_config keywords (e.g. ``ProxyJump="testhost"``);
        they take precedence over the defaults (keywords are case-insensitive).
        """
        defaults = {
            "HostName": self.listen_host,
            "Port": str(self.port),
            "User": self.user,
            "IdentityFile": str(self.identity),
            "IdentitiesOnly": "yes",
            "UserKnownHostsFile": str(self.known_hosts),
            "StrictHostKeyChecking": "yes",
            "BatchMode": "yes",
            "UpdateHostKeys": "no",
        }
        overridden = {k.lower() for k in options}
        merged = {k: v for k, v in defaults.items() if k.lower() not in overridden}
        merged.update(options)
        lines = [f"Host {alias}"] + [f"    {k} {v}" for k, v in merged.items()]
        with self.ssh_config.open("a") as f:
            f.write("\n".join(lines) + "\n\n")

    # ---- process control -----------------------------------------------
    def start(self) -> None:
        """(Re)start sshd on the same port with the same host key; wait until it accepts.

        With ``netns``, ``ip netns exec`` execs sshd in place (no fork), so the
        Popen pid is sshd's; pids are global across network namespaces.
        """
        if self._proc is not None:
            self.stop()
        if os.geteuid() == 0:
            # privilege separation directory; sshd refuses to start without it
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        with self.stderr_log.open("ab") as err:
            self._proc = subprocess.Popen(
                self.exec_in_ns([self.sshd_path, "-D", "-e", "-f", str(self.sshd_config),
                                 "-E", str(self.sshd_log)]),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,  # keep terminal ^C away; teardown stops it
                close_fds=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._proc = None
                raise RuntimeError(
                    f"sshd exited with status {rc} during startup"
                    f"{f' (in netns {self.netns})' if self.netns else ''}\n"
                    f"--- {self.sshd_log}:\n{_tail(self.sshd_log)}\n"
                    f"--- {self.stderr_log}:\n{_tail(self.stderr_log)}"
                )
            try:
                with socket.create_connection(self.address, timeout=1.0) as s:
                    s.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
                    banner = s.recv(256)
                if banner.startswith(b"SSH-") and self._proc.poll() is None:
                    return
                last_error = RuntimeError(f"unexpected banner {banner!r}")
            except OSError as e:
                last_error = e
            time.sleep(0.05)
        self._terminate_listener()
        raise RuntimeError(
            f"sshd did not accept connections on {self.listen_host}:{self.port} within "
            f"{START_TIMEOUT}s (last error: {last_error!r})\n"
            f"--- {self.sshd_log}:\n{_tail(self.sshd_log)}"
        )

    def stop(self) -> None:
        """Stop the sshd listener (SIGTERM, wait).  Established sessions survive."""
        if self._proc is None:
            return
        self._remember_sessions()
        self._terminate_listener()

    def _terminate_listener(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)

    def _remember_sessions(self) -> set[tuple[int, int]]:
        """Record and return (pid, starttime) of all live session processes."""
        table = _proc_table()
        self._sessions = {(p, s) for p, s in self._sessions if _alive(table, p, s)}
        roots = [p for p, _ in self._sessions]
        if self.pid is not None:
            roots.append(self.pid)
        for root in roots:
            for pid in _descendants(table, root):
                if _alive(table, pid, table[pid][1]):  # zombies are not sessions
                    self._sessions.add((pid, table[pid][1]))
        return set(self._sessions)

    def session_pids(self) -> set[int]:
        """pids of the processes serving established connections (not the listener)."""
        return {pid for pid, _ in self._remember_sessions()}

    def kill_connections(self) -> None:
        """SIGKILL every process serving an existing connection (not the listener).

        Covers the per-connection sshd processes and everything they spawned,
        including sessions orphaned by an earlier stop().  Waits until they are gone.
        """
        victims = self._remember_sessions()
        for pid, _start in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + KILL_TIMEOUT
        while True:
            table = _proc_table()
            left = {(p, s) for p, s in victims if _alive(table, p, s)}
            if not left:
                break
            if time.monotonic() >= deadline:
                raise RuntimeError(f"sshd session processes survived SIGKILL: {sorted(left)}")
            time.sleep(0.02)
        self._sessions -= victims

    def close(self) -> None:
        """Teardown: kill sessions, stop the listener, remove the runtime dir."""
        try:
            self.kill_connections()
            self.stop()
            self.kill_connections()  # anything forked between the two steps
        finally:
            runtime = self.env.get("XDG_RUNTIME_DIR")
            if runtime and runtime.startswith("/tmp/td-"):
                shutil.rmtree(runtime, ignore_errors=True)


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture
def free_port() -> Callable[..., int]:
    """``free_port(host="127.0.0.1") -> int``: a port that was free a moment ago."""
    return _free_port


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SSHServer]:
    """A started throw-away sshd on 127.0.0.1 with a temp HOME naming it ``testhost``."""
    server = SSHServer.create(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.close()


# --------------------------------------------------------------------------
# sshd in a network namespace of the test's own making (design.md 8)

NETNS_PREFIX = "td-"
NETNS_NET = (10, 251)  # 10.251.0.0/16, cut into /30 blocks
NETNS_BLOCKS = 16384   # /30 blocks in a /16
NETNS_LOCK = "/run/lock/tunneld-test-netns.lock"
NETNS_TIMEOUT = 10.0
_netns_counter = itertools.count()


def _find_ip() -> str:
    for path in (shutil.which("ip"), "/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"):
        if path and os.access(path, os.X_OK):
            return path
    pytest.fail(
        "`ip` (iproute2) not found; the netns e2e fixtures need it: run "
        "`apt-get install -y iproute2` (and run the tests as root)",
        pytrace=False,
    )


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([_find_ip(), *args], check=False, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=NETNS_TIMEOUT)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
    return r


def _netns_names() -> set[str]:
    # "name (id: N)" or just "name"
    return {line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()}


def _netns_pids(name: str) -> set[int]:
    r = _ip("netns", "pids", name, check=False)
    return {int(x) for x in r.stdout.split() if x.isdigit()}


def _netns_kill_all(name: str) -> None:
    """SIGKILL every process in namespace ``name`` and wait until they are gone."""
    deadline = time.monotonic() + KILL_TIMEOUT
    while True:
        pids = _netns_pids(name) - {os.getpid()}
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() >= deadline:
            raise RuntimeError(f"processes in netns {name} survived SIGKILL: {sorted(pids)}")
        time.sleep(0.02)


@contextlib.contextmanager
def _netns_lock() -> Iterator[None]:
    """An exclusive flock shared by all test processes on this machine."""
    try:
        fd = os.open(NETNS_LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError:
        fd = os.open(tempfile.gettempdir(), os.O_RDONLY)  # no /run/lock: lock /tmp itself
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale_netns() -> None:
    """Remove namespaces ``td-<pid>-<n>`` left behind by test processes that died."""
    for name in _netns_names():
        m = re.fullmatch(rf"{NETNS_PREFIX}(\d+)-(\d+)", name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(Exception):
            _netns_kill_all(name)
            _ip("netns", "del", name, check=False)  # takes its veth end (and pair) along


@dataclass
class NetNS:
    """A network namespace plus a veth pair into it, with a /30 from 10.251.0.0/16.

    ``host_ip`` is the root-namespace end (``veth_host``), ``ns_ip`` the
    namespace end (``veth_ns``); ``lo`` is up inside.  Use :meth:`create`
    and :meth:`close` (idempotent; kills everything left in the namespace).
    """

    name: str
    veth_host: str
    veth_ns: str
    host_ip: str
    ns_ip: str
    prefix: int = 30
    _closed: bool = field(default=False, init=False, repr=False)

    @classmethod
    def create(cls) -> NetNS:
        _find_ip()
        pid = os.getpid()
        with _netns_lock():  # allocation is serialized across processes
            _sweep_stale_netns()
            existing = _netns_names()
            while True:
                n = next(_netns_counter)
                name = f"{NETNS_PREFIX}{pid}-{n}"
                if name not in existing:
                    break
            r = _ip("netns", "add", name, check=False)
            if r.returncode != 0:
                pytest.fail(
                    f"cannot create a network namespace (`ip netns add {name}` exited "
                    f"{r.returncode}: {r.stderr.strip()}); the netns e2e fixtures "
                    "need root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2 "
                    "(`ip netns add` must work)",
                    pytrace=False,
                )
            ns = cls._setup(name, pid, n)
        return ns

    @classmethod
    def _setup(cls, name: str, pid: int, n: int) -> NetNS:
        ns: NetNS | None = None
        try:
            _ip("-n", name, "link", "set", "lo", "up")
            used = set(re.findall(r"inet (10\.251\.\d+\.\d+)", _ip("-o", "-4", "addr").stdout))
            start = (pid * 64 + n) % NETNS_BLOCKS
            for i in range(NETNS_BLOCKS):
                block = (start + i) % NETNS_BLOCKS
                base = block * 4
                addrs = [f"{NETNS_NET[0]}.{NETNS_NET[1]}.{(base + k) // 256}.{(base + k) % 256}"
                         for k in range(4)]
                veth_host, veth_ns = f"tdv{block}a", f"tdv{block}b"
                if used.intersection(addrs) or os.path.exists(f"/sys/class/net/{veth_host}"):
                    continue
                break
            else:
                raise RuntimeError("no free /30 left in 10.251.0.0/16")
            ns = cls(name=name, veth_host=veth_host, veth_ns=veth_ns,
                     host_ip=addrs[1], ns_ip=addrs[2])
            _ip("link", "add", veth_host, "type", "veth", "peer", "name", veth_ns,
                "netns", name)
            _ip("addr", "add", f"{ns.host_ip}/{ns.prefix}", "dev", veth_host)
            _ip("-n", name, "addr", "add", f"{ns.ns_ip}/{ns.prefix}", "dev", veth_ns)
            _ip("link", "set", veth_host, "up")
            _ip("-n", name, "link", "set", veth_ns, "up")
            return ns
        except BaseException:
            if ns is not None:
                ns.close()
            else:
                _ip("netns", "del", name, check=False)
            raise

    def exec_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def close(self) -> None:
        """Kill every process in the namespace, delete the veth pair and the namespace."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        try:
            _netns_kill_all(self.name)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:  # delete the rest
            errors.append(str(e))
        r = _ip("link", "del", self.veth_host, check=False)  # takes the peer along
        if r.returncode != 0 and os.path.exists(f"/sys/class/net/{self.veth_host}"):
            errors.append(f"ip link del {self.veth_host}: {r.stderr.strip()}")
        r = _ip("netns", "del", self.name, check=False)
        if r.returncode != 0 and self.name in _netns_names():
            errors.append(f"ip netns del {self.name}: {r.stderr.strip()}")
        if errors:
            raise RuntimeError(f"netns {self.name} teardown: " + "; ".join(errors))


@contextlib.contextmanager
def netns_ssh_server(base: Path, *, host: str = "netnshost",
                     port: int = 22) -> Iterator[SSHServer]:
    """A started :class:`SSHServer` inside a fresh :class:`NetNS` (its ``.ns`` attribute).

    On exit (also on error): sessions and listener are killed, then every
    process left in the namespace, then the veth pair and the namespace go.
    """
    ns = NetNS.create()
    server: SSHServer | None = None
    try:
        server = SSHServer.create(base, port=port, host=host, netns=ns.name,
                                  listen_host=ns.ns_ip)
        server.ns = ns
        server.start()
        yield server
    finally:
        try:
            if server is not None:
                server.close()
        finally:
            ns.close()


@pytest.fixture
def netns_sshd(tmp_path: Path) -> Iterator[SSHServer]:
    """A started throw-away sshd on port 22 inside a network namespace of its own.

    The alias is ``netnshost`` (``sshd.host``); it listens on ``sshd.listen_host``
    (10.251.x.y, reachable from here through a veth pair); ``sshd.netns`` is the
    namespace and ``sshd.exec_in_ns(argv)`` runs ``argv`` in it.  The server's
    127.0.0.1 is the namespace's own loopback.  Needs root and iproute2.
    """
    with netns_ssh_server(tmp_path) as server:
        yield server


@pytest.fixture
def netns_daemon(netns_sshd: SSHServer) -> Iterator[Daemon]:
    """A running tunneld whose HOME is the netns_sshd fixture's (alias ``netnshost``)."""
    d = Daemon(netns_sshd)
    d.start()
    try:
        yield d
    finally:
        d.close()


class _EchoServer:
    def __init__(self, host: str, port: int, greeting: bytes | None) -> None:
        self.greeting = greeting
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.sock.settimeout(0.1)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []
        self.accepted = 0
        t = threading.Thread(target=self._accept_loop, name=f"echo-accept-{self.address[1]}",
                             daemon=True)
        self.threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            conn.settimeout(None)
            with self.lock:
                if self.stopping.is_set():
                    conn.close()
                    break
                self.conns.add(conn)
                self.accepted += 1
                t = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                     name=f"echo-conn-{self.address[1]}")
                self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.greeting:
                conn.sendall(self.greeting)
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)  # pass the half-close on
        except OSError:
            pass
        finally:
            with self.lock:
                self.conns.discard(conn)
            conn.close()

    def close(self) -> None:
        self.stopping.set()
        with self.lock:
            conns = list(self.conns)
            threads = list(self.threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv()
            except OSError:
                pass
        for t in threads:
            t.join(timeout=2.0)
        self.sock.close()


@pytest.fixture
def echo_server() -> Iterator[Callable[..., tuple[str, int]]]:
    """Factory ``echo_server(host="127.0.0.2", port=0, greeting=None) -> (host, port)``.

    Thread-based TCP echo server: echoes everything it reads, after sending
    ``greeting`` (if any) on accept; passes EOF on as a half-close.  The
    default 127.0.0.2 keeps targets apart from sshd's 127.0.0.1 (design.md 8).
    """
    servers: list[_EchoServer] = []

    def factory(host: str = "127.0.0.2", port: int = 0,
                greeting: bytes | None = None) -> tuple[str, int]:
        server = _EchoServer(host, port, greeting)
        servers.append(server)
        return server.address

    try:
        yield factory
    finally:
        for server in servers:
            server.close()


# --------------------------------------------------------------------------
# the daemon under test


DAEMON_START_TIMEOUT = 15.0
CTL_TIMEOUT = 60.0


class Daemon:
    """A `tunneld` process in the sshd fixture's temp HOME, driven through `tunnelctl`."""

    def __init__(self, server: SSHServer, extra_env: dict[str, str] | None = None) -> None:
        self.server = server
        self.env = dict(server.env, TUNNELD_NO_AUTOSTART="1", PYTHONUNBUFFERED="1")
        self.env.update(extra_env or {})
        self.proc: subprocess.Popen | None = None
        self.stderr_path = server.workdir / "tunneld.stderr"
        self.socket = Path(self.env["XDG_RUNTIME_DIR"]) / "tunneld" / "tunneld.sock"
        self.state_file = server.home / ".local" / "state" / "tunneld" / "forwards.json"
        self.config_file = server.home / ".config" / "tunneld" / "config.toml"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *args: str) -> None:
        assert self.proc is None or self.proc.poll() is not None, "daemon already running"
        err = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tunneld", *args], env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        err.close()
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tunneld exited with {self.proc.returncode}:\n"
                                   f"{self.log()}")
            r = self.ctl("status", check=False, timeout=5)
            if r.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"tunneld did not answer within {DAEMON_START_TIMEOUT}s:\n"
                           f"{self.log()}")

    def ctl(self, *args: str, check: bool = True, timeout: float = CTL_TIMEOUT,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "tunnelctl", *args], env=self.env,
                           capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"tunnelctl {' '.join(args)} exited {r.returncode}:\n"
                                 f"stdout: {r.stdout}\nstderr: {r.stderr}\nlog:\n{self.log()}")
        return r

    def list(self) -> dict:
        import json
        return json.loads(self.ctl("list", "--json").stdout)

    def host(self, name: str | None = None) -> dict:
        name = name or self.server.host
        for h in self.list()["hosts"]:
            if h["name"] == name:
                return h
        raise AssertionError(f"{name} not in tunnelctl list")

    def forward(self, listen_port: int, host: str | None = None) -> dict:
        for f in self.host(host)["forwards"]:
            if f["listen"].endswith(f":{listen_port}"):
                return f
        raise AssertionError(f"no forward listening on {listen_port}")

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0,
                 what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.log()}")

    def log(self, tail: int | None = 6000) -> str:
        """The daemon's stderr (its last ``tail`` characters; None: all of it)."""
        try:
            text = self.stderr_path.read_text(errors="replace")
            return text[-tail:] if tail else text
        except FileNotFoundError:
            return ""

    def stop(self) -> int:
        """`tunnelctl stop`, and wait for the process; returns its exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.ctl("stop", check=False, timeout=30)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"tunneld did not stop within 30s:\n{self.log()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def daemon(sshd: SSHServer) -> Iterator[Daemon]:
    """A running tunneld whose HOME is the sshd fixture's (its ~/.ssh/config names it)."""
    d = Daemon(sshd)
    d.start()
    try:
        yield d
    finally:
        d.close()


# --------------------------------------------------------------------------
# fault injection


class FaultProxy:
    """A TCP proxy between tunneld and sshd that can misbehave on demand.

    ``pause()`` black-holes the link (bytes are neither forwarded nor refused, as when a VPN
    drops), ``resume()`` lets them through again, ``reset()`` sends RST on every open
    connection, ``close_listener()`` refuses new connections (the server is gone) and
    ``open_listener()`` accepts them again.  One thread, selectors, bounded waits.
    """

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1") -> None:
        import selectors
        self.target = target
        self.host = host
        self.port = _free_port(host)
        self.sel = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.paused = False
        self.pairs: dict[socket.socket, socket.socket] = {}
        self.listener: socket.socket | None = None
        self.accepted = 0
        self.stopping = threading.Event()
        self._cmds: list[Callable[[], None]] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.open_listener()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="fault-proxy")
        self.thread.start()

    # commands run on the proxy thread, so the selector is only touched there
    def _run(self, fn: Callable[[], None]) -> None:
        done = threading.Event()

        def wrapped() -> None:
            try:
                fn()
            finally:
                done.set()
        with self.lock:
            self._cmds.append(wrapped)
        self._wake_w.send(b"x")
        if not done.wait(10):
            raise RuntimeError("fault proxy did not run a command within 10 s")

    def open_listener(self) -> None:
        def do() -> None:
            if self.listener is not None:
                return
            import selectors
            ls = socket.socket()
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind((self.host, self.port))
            ls.listen(128)
            ls.setblocking(False)
            self.listener = ls
            self.sel.register(ls, selectors.EVENT_READ, "accept")
        if threading.current_thread() is getattr(self, "thread", None) or \
                not hasattr(self, "thread"):
            do()
        else:
            self._run(do)

    def close_listener(self) -> None:
        def do() -> None:
            if self.listener is not None:
                self.sel.unregister(self.listener)
                self.listener.close()
                self.listener = None
        self._run(do)

    def pause(self) -> None:
        def do() -> None:
            self.paused = True
        self._run(do)

    def resume(self) -> None:
        def do() -> None:
            self.paused = False
        self._run(do)

    def reset(self) -> None:
        """RST every open connection (both sides)."""
        def do() -> None:
            import struct
            for s in list(self.pairs):
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
                self._drop(s)
        self._run(do)

    @property
    def connections(self) -> int:
        return len(self.pairs) // 2

    def _drop(self, s: socket.socket) -> None:
        peer = self.pairs.pop(s, None)
        for x in (s, peer):
            if x is None:
                continue
            self.pairs.pop(x, None)
            try:
                self.sel.unregister(x)
            except (KeyError, ValueError):
                pass
            x.close()

    def _loop(self) -> None:
        import selectors
        while not self.stopping.is_set():
            for key, _ in self.sel.select(timeout=0.2):
                if key.data == "wake":
                    self._wake_r.recv(4096)
                    with self.lock:
                        cmds, self._cmds = self._cmds, []
                    for c in cmds:
                        c()
                elif key.data == "accept":
                    try:
                        c, _ = key.fileobj.accept()
                    except OSError:
                        continue
                    try:
                        u = socket.create_connection(self.target, timeout=5)
                    except OSError:
                        c.close()
                        continue
                    self.accepted += 1
                    for x in (c, u):
                        x.setblocking(False)
                    self.pairs[c], self.pairs[u] = u, c
                    self.sel.register(c, selectors.EVENT_READ, "data")
                    self.sel.register(u, selectors.EVENT_READ, "data")
                else:
                    s = key.fileobj
                    if self.paused:
                        # black hole: leave the bytes unread; keep the sockets open
                        continue
                    try:
                        data = s.recv(65536)
                    except OSError:
                        data = b""
                    peer = self.pairs.get(s)
                    if not data or peer is None:
                        self._drop(s)
                        continue
                    try:
                        peer.setblocking(True)
                        peer.settimeout(5)
                        peer.sendall(data)
                        peer.setblocking(False)
                    except OSError:
                        self._drop(s)
            if self.paused:
                time.sleep(0.05)  # don't spin on readable sockets we ignore

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        for s in list(self.pairs):
            self._drop(s)
        if self.listener is not None:
            self.listener.close()
        self._wake_r.close()
        self._wake_w.close()


@pytest.fixture
def fault_proxy(sshd: SSHServer) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the sshd fixture, and an alias ``flaky`` that goes through it
    (same host key: its known_hosts entry is added)."""
    proxy = FaultProxy(sshd.address)
    pub = sshd.host_key.with_suffix(".pub").read_text().split()
    with sshd.known_hosts.open("a") as f:
        f.write(f"[127.0.0.1]:{proxy.port} {pub[0]} {pub[1]}\n")
    sshd.add_host_alias("flaky", HostName=proxy.host, Port=str(proxy.port))
    try:
        yield proxy
    finally:
        proxy.close()


# --------------------------------------------------------------------------
# a real Slurm cluster in namespaces (tests/e2e/slurm.py; it imports the above)

from slurm import slurm_cluster  # noqa: E402, F401
