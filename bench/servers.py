"""Processes and fixtures for the benchmark (see run.py).

* ``SSHD``: a throw-away OpenSSH sshd on 127.0.0.1 with its own host key, a temp HOME whose
  ``~/.ssh/config`` names it under several aliases (same approach as tests/e2e/conftest.py,
  copied here so the bench does not depend on pytest or on test code that is being edited).
* ``python bench/servers.py targets HOST``: the target servers, in their own process (own CPU
  time, own file-descriptor budget): an asyncio (uvloop) echo server for the latency and
  concurrency tests, and thread-per-connection blocking sink/source servers for bulk transfer.
  Prints one JSON line ``{"echo": PORT, "sink": PORT, "source": PORT}`` when ready.
* ``python bench/servers.py sshtunnel ...``: forwards with the ``sshtunnel`` package (paramiko),
  in its own process so its threads do not compete with the measuring client for the GIL.

Bulk protocol (needs no half-close, which not every tunnel passes on):
  sink:   client sends an 8-byte big-endian length N, then N bytes; the server answers with
          the 8-byte count it received.
  source: client sends an 8-byte big-endian length N; the server sends N bytes, then closes.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

#: socket buffer size asked for on the bench's own bulk sockets (capped by net.core.*mem_max)
SOCK_BUF = 4 * 1024 * 1024
#: size of one read/write on the bulk path
CHUNK = 1024 * 1024
#: listen backlog asked for by the target servers (capped by net.core.somaxconn)
BACKLOG = 16384


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def set_bufs(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        except OSError:
            pass


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


# ------------------------------------------------------------------------------------------
# processes: /proc helpers


def proc_table() -> dict[int, tuple[int, int, str]]:
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
        rest = data[data.rfind(")") + 2:].split()
        try:
            table[int(entry)] = (int(rest[1]), int(rest[19]), rest[0])
        except (IndexError, ValueError):
            continue
    return table


def descendants(root: int) -> list[tuple[int, int]]:
    """(pid, starttime) of every live descendant of ``root``."""
    table = proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _s, _st) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: list[tuple[int, int]] = []
    todo = list(children.get(root, ()))
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        if table[pid][2] not in ("Z", "X"):
            found.append((pid, table[pid][1]))
        todo.extend(children.get(pid, ()))
    return found


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, wait, SIGKILL: only this process (by pid)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------
# sshd


def _tool(name: str, candidates: tuple[str, ...] = ()) -> str:
    for path in (shutil.which(name), *candidates, f"/usr/bin/{name}", f"/usr/sbin/{name}"):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
    raise RuntimeError(f"{name} not found: apt-get install -y openssh-client openssh-server")


def _keygen(path: Path, comment: str) -> None:
    subprocess.run([_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", comment,
                    "-f", str(path)], check=True, stdin=subprocess.DEVNULL,
                   capture_output=True, timeout=30)


class SSHD:
    """A throw-away sshd on 127.0.0.1:port, and a temp HOME whose ~/.ssh/config names it."""

    def __init__(self, base: Path):
        self.base = base
        self.workdir = base / "sshd"
        self.home = base / "home"
        self.workdir.mkdir(parents=True)
        (self.home / ".ssh").mkdir(parents=True, mode=0o700)
        self.runtime = Path(os.path.realpath(__import__("tempfile").mkdtemp(
            prefix="tdb-", dir="/tmp")))  # short path: Unix socket length limit
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.port = free_port()
        self.sshd_path = _tool("sshd", ("/usr/sbin/sshd", "/usr/local/sbin/sshd"))
        self.ssh_path = _tool("ssh")
        self.config = self.home / ".ssh" / "config"
        self.identity = self.home / ".ssh" / "id_ed25519"
        self.known_hosts = self.home / ".ssh" / "known_hosts"
        self.log = self.workdir / "sshd.log"
        self.proc: subprocess.Popen | None = None
        self._sessions: set[tuple[int, int]] = set()
        env = dict(os.environ)
        env.pop("SSH_AUTH_SOCK", None)
        env.update(HOME=str(self.home), XDG_CONFIG_HOME=str(self.home / ".config"),
                   XDG_STATE_HOME=str(self.home / ".local" / "state"),
                   XDG_DATA_HOME=str(self.home / ".local" / "share"),
                   XDG_CACHE_HOME=str(self.home / ".cache"), XDG_RUNTIME_DIR=str(self.runtime))
        self.env = env
        self._write_files()

    def _write_files(self) -> None:
        host_key = self.workdir / "ssh_host_ed25519_key"
        _keygen(host_key, "tunneld-bench-hostkey")
        _keygen(self.identity, f"{self.user}@tunneld-bench")
        auth = self.workdir / "authorized_keys"
        shutil.copyfile(self.identity.with_suffix(".pub"), auth)
        auth.chmod(0o600)
        pub = host_key.with_suffix(".pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        self.known_hosts.chmod(0o600)
        (self.workdir / "sshd_config").write_text("\n".join([
            f"ListenAddress 127.0.0.1:{self.port}",
            f"HostKey {host_key}",
            f"PidFile {self.workdir / 'sshd.pid'}",
            f"AuthorizedKeysFile {auth}",
            "StrictModes no", "UsePAM no", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password", "AllowTcpForwarding yes", "PermitOpen any",
            "ClientAliveInterval 0", "MaxSessions 100", "MaxStartups 100:30:200",
            "LogLevel INFO", "PrintMotd no", "",
        ]))
        self.config.write_text("")
        self.config.chmod(0o600)

    def add_alias(self, alias: str, **options: str) -> None:
        opts = {"HostName": "127.0.0.1", "Port": str(self.port), "User": self.user,
                "IdentityFile": str(self.identity), "IdentitiesOnly": "yes",
                "UserKnownHostsFile": str(self.known_hosts), "StrictHostKeyChecking": "yes",
                "BatchMode": "yes", "UpdateHostKeys": "no", **options}
        with self.config.open("a") as f:
            f.write("\n".join([f"Host {alias}"] + [f"    {k} {v}" for k, v in opts.items()])
                    + "\n\n")

    def start(self, timeout: float = 10.0) -> None:
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        with (self.workdir / "sshd.stderr").open("ab") as err:
            self.proc = subprocess.Popen(
                [self.sshd_path, "-D", "-e", "-f", str(self.workdir / "sshd_config"),
                 "-E", str(self.log)], stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                start_new_session=True, close_fds=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.settimeout(2)
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not accept on 127.0.0.1:{self.port} within {timeout}s")

    def close(self) -> None:
        """Kill every per-connection sshd process (they setsid, so walk /proc), then the
        listener, then remove the runtime dir."""
        try:
            if self.proc is not None:
                victims = descendants(self.proc.pid)
                for pid, _ in victims:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                stop_process(self.proc)
                self.proc = None
        finally:
            shutil.rmtree(self.runtime, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# target servers (run in their own process)


def _listen(host: str) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    set_bufs(s)  # inherited by accepted sockets
    s.bind((host, 0))
    s.listen(BACKLOG)
    return s


def _serve_threads(listener: socket.socket, handler) -> None:
    def one(conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


def _sink(conn: socket.socket) -> None:
    want = struct.unpack("!Q", recv_exact(conn, 8))[0]
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    got = 0
    while got < want:
        n = conn.recv_into(view, min(CHUNK, want - got))
        if not n:
            break
        got += n
    conn.sendall(struct.pack("!Q", got))


_PAYLOAD = os.urandom(CHUNK)


def _source(conn: socket.socket) -> None:
    want = struct.unpack("!Q", recv_exact(conn, 8))[0]
    view = memoryview(_PAYLOAD)
    while want > 0:
        n = min(CHUNK, want)
        conn.sendall(view[:n])
        want -= n
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(30)
    try:
        conn.recv(1)  # let the client close first (no TIME_WAIT pile-up here)
    except OSError:
        pass


def targets_main(host: str) -> None:
    import asyncio
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run

    sink, source = _listen(host), _listen(host)
    _serve_threads(sink, _sink)
    _serve_threads(source, _source)

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.t = transport
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data):
            self.t.write(data)

        def eof_received(self):
            return False  # close after flushing

    async def main() -> None:
        loop = asyncio.get_running_loop()
        echo = _listen(host)
        server = await loop.create_server(Echo, sock=echo, backlog=BACKLOG)
        print(json.dumps({"echo": echo.getsockname()[1], "sink": sink.getsockname()[1],
                          "source": source.getsockname()[1]}), flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # also stop when the parent goes away (stdin closes)
        loop.add_reader(sys.stdin.fileno(), lambda: (os.read(sys.stdin.fileno(), 1) or
                                                     stop.set()))
        await stop.wait()
        server.close()

    runner(main())


# ------------------------------------------------------------------------------------------
# sshtunnel (run in its own process)


def sshtunnel_main(args: argparse.Namespace) -> None:
    import logging
    logging.basicConfig(level=logging.ERROR)
    import paramiko
    import sshtunnel

    if args.cipher:
        if args.cipher not in paramiko.Transport._preferred_ciphers:
            print(json.dumps({"error": f"paramiko {paramiko.__version__} has no {args.cipher}"}),
                  flush=True)
            return
        paramiko.Transport._preferred_ciphers = (args.cipher,)
    forwarders = []
    try:
        locals_, remotes = [], []
        for spec in args.forward:  # LPORT:RHOST:RPORT
            lport, rhost, rport = spec.split(":")
            locals_.append(("127.0.0.1", int(lport)))
            remotes.append((rhost, int(rport)))
        groups = max(1, args.groups)
        per = len(locals_) // groups
        for g in range(groups):
            f = sshtunnel.SSHTunnelForwarder(
                ("127.0.0.1", args.ssh_port), ssh_username=args.user, ssh_pkey=args.key,
                allow_agent=False, host_pkey_directories=[],
                remote_bind_addresses=remotes[g * per:(g + 1) * per],
                local_bind_addresses=locals_[g * per:(g + 1) * per],
                mute_exceptions=True)
            f.start()
            forwarders.append(f)
        t = forwarders[0]._transport
        cipher = getattr(t, "local_cipher", None)
        print(json.dumps({"ready": True, "cipher": cipher,
                          "versions": {"sshtunnel": sshtunnel.__version__,
                                       "paramiko": paramiko.__version__}}), flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())

        def watch_stdin() -> None:
            while os.read(sys.stdin.fileno(), 1):
                pass
            stop.set()
        threading.Thread(target=watch_stdin, daemon=True).start()
        stop.wait()
    finally:
        for f in forwarders:
            try:
                f.stop(force=True)
            except TypeError:
                f.stop()
            except Exception:
                pass
        os._exit(0)  # do not wait for sshtunnel's handler threads


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("targets")
    t.add_argument("host")
    s = sub.add_parser("sshtunnel")
    s.add_argument("--ssh-port", type=int, required=True)
    s.add_argument("--user", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--cipher")
    s.add_argument("--groups", type=int, default=1,
                   help="split the forwards over this many SSH connections")
    s.add_argument("forward", nargs="+", help="LPORT:RHOST:RPORT")
    args = ap.parse_args()
    if args.cmd == "targets":
        targets_main(args.host)
    else:
        sshtunnel_main(args)


if __name__ == "__main__":
    main()
