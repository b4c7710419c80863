"""Remote forwards (-R) and SOCKS proxies (-D) end to end: a real sshd, a real tunneld.

The plain ``sshd`` runs on this machine, so a remote forward's server-side listener is on this
machine's 127.0.0.1:RPORT: connecting there goes client → sshd → SSH channel → tunneld → the
local target.  SOCKS tests that need a name only the server resolves use ``netns_sshd``: inside
its namespace ``localhost`` is the namespace's own loopback.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from netutil import roundtrip

pytestmark = pytest.mark.timeout(120)


# -- helpers -----------------------------------------------------------------------------------

def fwd(daemon, spec: str, host: str | None = None) -> dict:
    for f in daemon.host(host)["forwards"]:
        if f["spec"] == spec:
            return f
    raise AssertionError(f"no forward {spec!r} in {daemon.host(host)['forwards']}")


def wait_state(daemon, spec: str, state: str, host: str | None = None,
               timeout: float = 30.0) -> dict:
    daemon.wait_for(lambda: fwd(daemon, spec, host)["state"] == state, timeout=timeout,
                    what=f"{spec} to be {state}")
    return fwd(daemon, spec, host)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_run(n: int, free_port) -> int:
    """A first port of ``n`` consecutive ports free on 127.0.0.1."""
    for _ in range(100):
        base = free_port()
        if base + n < 65536 and all(port_is_free(base + i) for i in range(n)):
            return base
    pytest.fail(f"no {n} consecutive free ports")


def refused(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {data!r}, wanted {n} bytes")
        data += chunk
    return data


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        data = s.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def socks5(port: int, host: str, dport: int) -> tuple[socket.socket, int]:
    """A SOCKS5 CONNECT through 127.0.0.1:port; (socket, reply code)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    s.sendall(b"\x05\x01\x00")
    assert recv_exactly(s, 2) == b"\x05\x00"
    try:
        addr = b"\x01" + socket.inet_aton(host)
    except OSError:
        addr = b"\x03" + bytes((len(host),)) + host.encode()
    s.sendall(b"\x05\x01\x00" + addr + struct.pack(">H", dport))
    head = recv_exactly(s, 4)
    assert head[0] == 5 and head[3] == 1, head
    recv_exactly(s, 6)
    return s, head[1]


def socks4a(port: int, host: str, dport: int) -> tuple[socket.socket, int]:
    """A SOCKS4a CONNECT (host name sent unresolved); (socket, reply code)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    s.sendall(b"\x04\x01" + struct.pack(">H", dport) + b"\x00\x00\x00\x01" + b"me\x00"
              + host.encode() + b"\x00")
    reply = recv_exactly(s, 8)
    assert reply[0] == 0, reply
    return s, reply[1]


# a tiny HTTP server: binds 127.0.0.1:argv[1], prints "ready", answers every request with
# argv[2] as the body
HTTP_SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
body = sys.argv[2].encode()
while True:
    c, _ = s.accept()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = c.recv(4096)
        if not chunk:
            break
        data += chunk
    c.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
              % len(body) + body)
    c.close()
"""


@pytest.fixture
def ns_http(netns_sshd):
    """Start an HTTP server on the namespace's own 127.0.0.1 (unreachable from here)."""
    procs: list[subprocess.Popen] = []

    def start(port: int, body: str) -> None:
        proc = subprocess.Popen(netns_sshd.exec_in_ns([sys.executable, "-c", HTTP_SERVER,
                                                        str(port), body]),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        ready = threading.Event()
        threading.Thread(target=lambda: proc.stdout.readline().strip() == "ready"
                         and ready.set(), daemon=True).start()
        if not ready.wait(10):
            proc.kill()
            raise AssertionError(f"HTTP server in the namespace did not start: "
                                 f"{proc.communicate(timeout=10)[1]}")

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate(timeout=10)


# -- remote forwards ---------------------------------------------------------------------------

def test_remote_forward_reaches_a_local_server_and_counts(daemon, sshd, echo_server,
                                                          free_port):
    _, eport = echo_server()
    rport = free_port()
    spec = f"-R {rport}:127.0.0.2:{eport}"
    r = daemon.ctl("add", sshd.host, "-R", f"{rport}:127.0.0.2:{eport}")
    assert spec in r.stdout
    f = wait_state(daemon, spec, "listening")
    assert f["kind"] == "remote"
    assert f["listen"] == f"127.0.0.1:{rport}"
    assert f["target"] == f"127.0.0.2:{eport}"
    # the server's side: sshd listens on (this machine's) 127.0.0.1:rport
    payload = os.urandom(300_000)
    assert roundtrip(rport, payload) == payload
    assert roundtrip(rport, b"again") == b"again"
    daemon.wait_for(lambda: fwd(daemon, spec)["active"] == 0, what="connections to close")
    f = fwd(daemon, spec)
    assert f["total"] == 2
    assert f["bytes_in"] == len(payload) + 5    # arrived from the server side
    assert f["bytes_out"] == len(payload) + 5   # the local target's replies, sent back
    assert f["last_error"] is None
    text = daemon.ctl("list").stdout
    assert spec in text and f"{sshd.host}:127.0.0.1:{rport}" in text
    saved = json.loads(daemon.state_file.read_text())
    assert spec in saved["hosts"][sshd.host]
    # a second add of the same forward is a no-op
    r = daemon.ctl("add", sshd.host, "-R", f"{rport}:127.0.0.2:{eport}")
    assert "already forwarded" in r.stdout


def test_remote_forward_bulk_both_ways(daemon, sshd, echo_server, free_port):
    """20 MB through the echo server, sending and receiving at once: the back-pressure of
    both directions of the remote data path works (nothing stalls, nothing is lost)."""
    _, eport = echo_server()
    rport = free_port()
    spec = f"-R {rport}:127.0.0.2:{eport}"
    daemon.ctl("add", sshd.host, "-R", spec[3:])
    wait_state(daemon, spec, "listening")
    payload = os.urandom(20 * 1024 * 1024)
    got = bytearray()
    with socket.create_connection(("127.0.0.1", rport), timeout=60) as s:
        def send() -> None:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            got += data
        sender.join(10)
    assert len(got) == len(payload) and bytes(got) == payload
    daemon.wait_for(lambda: fwd(daemon, spec)["active"] == 0, what="the connection to close")
    f = fwd(daemon, spec)
    assert f["bytes_in"] == f["bytes_out"] == len(payload)


def test_remote_forward_whose_local_target_is_down(daemon, sshd, free_port):
    rport, dead = free_port(), free_port("127.0.0.2")
    spec = f"-R {rport}:127.0.0.2:{dead}"
    daemon.ctl("add", sshd.host, "-R", spec[3:])
    wait_state(daemon, spec, "listening")
    # the server accepts, tunneld cannot reach its target: sshd closes (resets) the client
    try:
        assert roundtrip(rport, b"x", timeout=20) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass
    except OSError as exc:  # reset before shutdown(): "not connected"
        assert exc.errno == errno.ENOTCONN, exc
    daemon.wait_for(lambda: fwd(daemon, spec)["last_error"] is not None, what="last_error")
    f = fwd(daemon, spec)
    assert f"127.0.0.2:{dead}" in f["last_error"] and "refused" in f["last_error"].lower()
    assert f["state"] == "listening"  # the forward stays


def test_remote_port_in_use_on_the_server_adds_nothing(daemon, sshd, echo_server, free_port):
    _, eport = echo_server()
    # connect the host first with a good remote forward, so the range is asked for at once
    good = free_port()
    daemon.ctl("add", sshd.host, "-R", f"{good}:127.0.0.2:{eport}")
    wait_state(daemon, f"-R {good}:127.0.0.2:{eport}", "listening")
    base = free_run(3, free_port)
    local = free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", base + 1))   # "the port is in use on the server"
    holder.listen(1)
    try:
        r = daemon.ctl("add", sshd.host, f"{local}:127.0.0.2:{eport}", "-R",
                       f"{base}-{base + 2}:127.0.0.2:{eport}-{eport + 2}", check=False)
    finally:
        holder.close()
    assert r.returncode == 1, (r.stdout, r.stderr)
    specs = [f["spec"] for f in daemon.host()["forwards"]]
    assert specs == [f"-R {good}:127.0.0.2:{eport}"], specs
    assert port_is_free(local)  # the local listener of the same add was taken back
    # nothing of the range is left on the server: both neighbours are free again
    assert port_is_free(base) and port_is_free(base + 2)
    saved = json.loads(daemon.state_file.read_text())
    assert saved["hosts"][sshd.host] == [f"-R {good}:127.0.0.2:{eport}"]


def test_remote_port_in_use_message_names_port_and_server(daemon, sshd, free_port):
    local = free_port()
    daemon.ctl("add", sshd.host, f"{local}:127.0.0.2:9")  # connects the host
    daemon.wait_for(lambda: daemon.host()["state"] == "connected", what="connected")
    base = free_run(2, free_port)
    holder = socket.socket()
    holder.bind(("127.0.0.1", base + 1))
    holder.listen(1)
    try:
        r = daemon.ctl("add", sshd.host, f"{free_port()}:127.0.0.2:9",
                       "-R", f"{base}-{base + 1}:localhost:80-81", check=False)
    finally:
        holder.close()
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"127.0.0.1:{base + 1}" in r.stderr and sshd.host in r.stderr, r.stderr
    assert "nothing was added" in r.stderr
    assert "Traceback" not in r.stderr
    h = daemon.host()
    assert [f["spec"] for f in h["forwards"]] == [f"{local}:127.0.0.2:9"]  # the local one too
    assert port_is_free(base)


def test_remote_forward_comes_back_after_the_connection_is_cut(daemon, sshd, fault_proxy,
                                                               echo_server, free_port):
    _, eport = echo_server()
    rport = free_port()
    spec = f"-R {rport}:127.0.0.2:{eport}"
    daemon.ctl("add", "flaky", "-R", spec[3:])
    wait_state(daemon, spec, "listening", host="flaky")
    assert roundtrip(rport, b"before") == b"before"
    fault_proxy.reset()
    daemon.wait_for(lambda: daemon.host("flaky")["state"] != "connected" or
                    fwd(daemon, spec, "flaky")["state"] != "listening",
                    what="the cut to be noticed", timeout=30)
    wait_state(daemon, spec, "listening", host="flaky", timeout=40)
    assert daemon.host("flaky")["state"] == "connected"
    assert roundtrip(rport, b"after") == b"after"


def test_remote_forward_retries_while_the_old_port_is_still_held(daemon, sshd, fault_proxy,
                                                                 echo_server, free_port):
    """After a reconnect the port may still be held on the server (the sshd of the old
    connection): tunneld retries within a bounded time instead of giving up."""
    _, eport = echo_server()
    rport = free_port()
    spec = f"-R {rport}:127.0.0.2:{eport}"
    daemon.ctl("add", "flaky", "-R", spec[3:])
    wait_state(daemon, spec, "listening", host="flaky")
    fault_proxy.close_listener()
    fault_proxy.reset()
    daemon.wait_for(lambda: daemon.host("flaky")["state"] != "connected",
                    what="the cut to be noticed", timeout=30)
    # a stand-in for the stale sshd child: something holds the port on the server
    daemon.wait_for(lambda: port_is_free(rport), what="the old listener to go", timeout=20)
    holder = socket.socket()
    holder.bind(("127.0.0.1", rport))
    holder.listen(1)
    try:
        fault_proxy.open_listener()
        daemon.wait_for(lambda: "retrying" in (fwd(daemon, spec, "flaky")["last_error"] or ""),
                        what="a refused request being retried", timeout=40)
        assert fwd(daemon, spec, "flaky")["state"] == "waiting"
        assert daemon.host("flaky")["state"] == "connected"
    finally:
        holder.close()
    f = wait_state(daemon, spec, "listening", host="flaky", timeout=20)
    assert f["last_error"] is None
    assert roundtrip(rport, b"back") == b"back"


def test_remote_forward_added_while_disconnected_waits(daemon, sshd, fault_proxy, echo_server,
                                                       free_port):
    _, eport = echo_server()
    fault_proxy.close_listener()
    rport = free_port()
    spec = f"-R {rport}:127.0.0.2:{eport}"
    r = daemon.ctl("add", "flaky", "-R", spec[3:])
    assert r.returncode == 0 and "warning" in r.stderr
    assert fwd(daemon, spec, "flaky")["state"] == "waiting"
    fault_proxy.open_listener()
    daemon.ctl("reconnect", "flaky", check=False)
    wait_state(daemon, spec, "listening", host="flaky", timeout=40)
    assert roundtrip(rport, b"late") == b"late"


def test_remove_remote_forward_frees_the_server_port(daemon, sshd, echo_server, free_port):
    _, eport = echo_server()
    rport, other = free_port(), free_port()
    daemon.ctl("add", sshd.host, "-R", f"{rport}:127.0.0.2:{eport}",
               "-R", f"{other}:127.0.0.2:{eport}")
    wait_state(daemon, f"-R {rport}:127.0.0.2:{eport}", "listening")
    wait_state(daemon, f"-R {other}:127.0.0.2:{eport}", "listening")
    r = daemon.ctl("remove", sshd.host, "-R", str(rport))  # by its remote port
    assert f"-R {rport}:127.0.0.2:{eport}" in r.stdout
    daemon.wait_for(lambda: refused(rport), what="the server to stop listening")
    assert roundtrip(other, b"still") == b"still"
    daemon.ctl("remove", sshd.host, f"-R {other}:127.0.0.2:{eport}")  # as `list` shows it
    daemon.wait_for(lambda: refused(other), what="the server to stop listening")
    assert json.loads(daemon.state_file.read_text())["hosts"] == {}


def test_public_remote_and_socks_need_the_flag(daemon, sshd, free_port):
    r = daemon.ctl("add", sshd.host, "-R", f"0.0.0.0:{free_port()}:localhost:80", check=False)
    assert r.returncode == 1 and "--public" in r.stderr and "this machine" in r.stderr
    r = daemon.ctl("add", sshd.host, "-D", f"*:{free_port()}", check=False)
    assert r.returncode == 1 and "--public" in r.stderr and "proxy" in r.stderr
    assert daemon.list()["hosts"] == []


# -- SOCKS -------------------------------------------------------------------------------------

def test_socks5_and_socks4a_resolve_names_on_the_server(netns_daemon, netns_sshd, ns_http,
                                                        free_port):
    host = netns_sshd.host
    nsport = free_port()
    assert refused(nsport)  # nothing here: only the server's own localhost serves it
    ns_http(nsport, "hello from the server's localhost")
    sport = free_port()
    r = netns_daemon.ctl("add", host, "-D", str(sport))
    assert f"-D {sport}" in r.stdout
    f = wait_state(netns_daemon, f"-D {sport}", "listening", host=host)
    assert f["kind"] == "socks" and f["listen"] == f"127.0.0.1:{sport}" and f["target"] == "*"
    # a real client: curl lets the proxy resolve the name
    c = subprocess.run(["curl", "-sS", "--max-time", "20", "--socks5-hostname",
                        f"127.0.0.1:{sport}", f"http://localhost:{nsport}/x"],
                       capture_output=True, text=True, timeout=30)
    assert c.returncode == 0, c.stderr
    assert c.stdout == "hello from the server's localhost"
    # SOCKS4a from Python, by raw socket
    s, code = socks4a(sport, "localhost", nsport)
    with s:
        assert code == 0x5A
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert read_all(s).endswith(b"hello from the server's localhost")
    # SOCKS5 with an IPv4 address (the server's 127.0.0.1)
    s, code = socks5(sport, "127.0.0.1", nsport)
    with s:
        assert code == 0
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert b"200 OK" in read_all(s)
    netns_daemon.wait_for(lambda: fwd(netns_daemon, f"-D {sport}", host)["active"] == 0,
                          what="connections to close")
    f = fwd(netns_daemon, f"-D {sport}", host)
    assert f["total"] == 3
    assert f["bytes_out"] > 0 and f["bytes_in"] >= 3 * len("hello from the server's localhost")


def test_socks_failures_get_their_reply_codes(daemon, sshd, free_port):
    sport = free_port()
    daemon.ctl("add", sshd.host, "-D", str(sport))
    wait_state(daemon, f"-D {sport}", "listening")
    dead = free_port("127.0.0.2")
    s, code = socks5(sport, "127.0.0.2", dead)
    with s:
        assert code == 0x05          # connection refused
        assert read_all(s) == b""    # then closed
    s, code = socks4a(sport, "127.0.0.2", dead)
    with s:
        assert code == 0x5B
    s, code = socks5(sport, "no-such-host.invalid", 80)
    with s:
        assert code == 0x04          # host unreachable (the server could not resolve it)
    # not SOCKS at all: closed without a reply, the daemon is fine
    with socket.create_connection(("127.0.0.1", sport), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_all(raw) == b""
    f = fwd(daemon, f"-D {sport}")
    assert "no-such-host.invalid" in f["last_error"]
    assert f["state"] == "listening" and f["total"] == 4
    assert f["bytes_in"] == 0 and f["bytes_out"] == 0   # handshakes are not counted


def test_socks_handshake_is_time_bounded(daemon, sshd, free_port):
    from tunneld import socks
    sport = free_port()
    daemon.ctl("add", sshd.host, "-D", str(sport))
    wait_state(daemon, f"-D {sport}", "listening")
    with socket.create_connection(("127.0.0.1", sport), timeout=socks.HANDSHAKE_TIMEOUT + 10) \
            as s:
        s.sendall(b"\x05\x01")  # half a greeting, then silence
        start = time.monotonic()
        assert read_all(s) == b""
        took = time.monotonic() - start
    assert socks.HANDSHAKE_TIMEOUT - 1 <= took <= socks.HANDSHAKE_TIMEOUT + 5


def test_socks_removal(daemon, sshd, echo_server, free_port):
    _, eport = echo_server()
    sport = free_port()
    daemon.ctl("add", sshd.host, "-D", str(sport))
    wait_state(daemon, f"-D {sport}", "listening")
    s, code = socks5(sport, "127.0.0.2", eport)
    with s:
        assert code == 0
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"
    r = daemon.ctl("remove", sshd.host, "-D", str(sport))
    assert f"-D {sport}" in r.stdout
    assert refused(sport)
    assert json.loads(daemon.state_file.read_text())["hosts"] == {}


# -- persistence -------------------------------------------------------------------------------

def test_restart_restores_remote_and_socks(daemon, sshd, echo_server, free_port):
    _, eport = echo_server()
    rport, sport, lport = free_port(), free_port(), free_port()
    rspec, sspec = f"-R {rport}:127.0.0.2:{eport}", f"-D {sport}"
    # one local, one remote and one SOCKS forward, in one add
    daemon.ctl("add", sshd.host, f"{lport}:127.0.0.2:{eport}", "-R", rspec[3:], "-D",
               str(sport))
    wait_state(daemon, rspec, "listening")
    saved = json.loads(daemon.state_file.read_text())["hosts"][sshd.host]
    assert set(saved) == {f"{lport}:127.0.0.2:{eport}", rspec, sspec}
    assert daemon.stop() == 0
    daemon.wait_for(lambda: refused(rport), what="the server to drop the listener")
    daemon.start()
    wait_state(daemon, rspec, "listening", timeout=40)
    wait_state(daemon, sspec, "listening")
    kinds = sorted(f["kind"] for f in daemon.host()["forwards"])
    assert kinds == ["local", "remote", "socks"]
    assert roundtrip(rport, b"remote") == b"remote"
    assert roundtrip(lport, b"local") == b"local"
    s, code = socks5(sport, "127.0.0.2", eport)
    with s:
        assert code == 0
        s.sendall(b"socks")
        assert recv_exactly(s, 5) == b"socks"


def test_restart_after_kill_retries_the_held_remote_port(daemon, sshd, echo_server, free_port):
    """A killed daemon's remote forward comes back with the next daemon (should the sshd of
    the old connection still hold the port for a moment, the request is retried)."""
    _, eport = echo_server()
    rport = free_port()
    rspec = f"-R {rport}:127.0.0.2:{eport}"
    daemon.ctl("add", sshd.host, "-R", rspec[3:])
    wait_state(daemon, rspec, "listening")
    daemon.kill9()
    daemon.start()
    wait_state(daemon, rspec, "listening", timeout=45)
    assert roundtrip(rport, b"again") == b"again"
