"""Local forwards end to end: a real sshd, a real tunneld, real sockets."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time

import pytest
from conftest import Daemon
from netutil import roundtrip, rss_kib

from tunneld.fastpath import gate

pytestmark = pytest.mark.timeout(90)

#: the data paths a daemon here can run: its own (the fast path) and stock asyncssh (what it
#: falls back to with another asyncssh version); only stock when the fast path is off for the
#: whole run (the tests' stock pass, TUNNELD_STOCK_ASYNCSSH=1)
PATHS = ["fastpath", "stock"] if gate.current.active else ["stock"]


def _path_env(path: str) -> dict[str, str]:
    return {"TUNNELD_STOCK_ASYNCSSH": "1"} if path == "stock" else {}


@pytest.fixture(params=PATHS)
def data_daemon(request, sshd):
    """The daemon on each data path, for the same tests."""
    d = Daemon(sshd, extra_env=_path_env(request.param))
    d.start()
    try:
        yield d
    finally:
        d.close()




def test_range_carries_data_both_ways_and_counts_it(data_daemon, sshd, echo_server, free_port):
    targets = [echo_server()[1] for _ in range(3)]
    locals_ = [free_port() for _ in range(3)]
    # a range on both sides needs consecutive ports: use one spec per pair plus one range
    data_daemon.ctl("add", sshd.host,
                    *[f"{lp}:127.0.0.2:{t}" for lp, t in zip(locals_, targets)])
    for i, port in enumerate(locals_):
        payload = os.urandom(100_000 + i)
        assert roundtrip(port, payload) == payload
    data_daemon.wait_for(lambda: all(data_daemon.forward(p)["active"] == 0 for p in locals_),
                    what="connections to close")
    for i, port in enumerate(locals_):
        f = data_daemon.forward(port)
        assert f["total"] == 1
        assert f["bytes_out"] == 100_000 + i
        assert f["bytes_in"] == 100_000 + i
        assert f["state"] == "listening"
        assert f["kind"] == "local"
        assert f["target"] == f"127.0.0.2:{targets[i]}"
        assert f["listen"] == f"127.0.0.1:{port}"
    h = data_daemon.host()
    assert h["state"] == "connected" and h["last_error"] is None
    assert set(h) >= {"name", "state", "since", "last_error", "forwards"}


def test_port_range_spec_remove_and_restore_after_restart(daemon, sshd, echo_server, free_port):
    # find three consecutive free local ports and serve the same three on 127.0.0.2
    def free_run(host: str, base: int) -> bool:
        socks = []
        try:
            for i in range(3):
                s = socket.socket()
                socks.append(s)
                s.bind((host, base + i))
            return True
        except OSError:
            return False
        finally:
            for s in socks:
                s.close()

    for _ in range(50):
        base = free_port()
        if not (free_run("127.0.0.1", base) and free_run("127.0.0.2", base)):
            continue
        try:
            for i in range(3):
                echo_server(port=base + i)
            break
        except OSError:
            continue
    else:
        pytest.fail("no three consecutive free ports on 127.0.0.1 and 127.0.0.2")
    lbase = base
    spec = f"{lbase}-{lbase + 2}:127.0.0.2:{base}-{base + 2}"
    r = daemon.ctl("add", sshd.host, spec)
    assert f"{lbase + 1}:127.0.0.2:{base + 1}" in r.stdout
    for i in range(3):
        assert roundtrip(lbase + i, b"hello %d" % i) == b"hello %d" % i
    daemon.ctl("remove", sshd.host, str(lbase + 1))
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", lbase + 1), timeout=2).close()
    saved = json.loads(daemon.state_file.read_text())
    assert saved["hosts"][sshd.host] == [f"{lbase}:127.0.0.2:{base}",
                                         f"{lbase + 2}:127.0.0.2:{base + 2}"]
    assert (os.stat(daemon.state_file).st_mode & 0o777) == 0o600
    assert daemon.stop() == 0
    daemon.start()
    ports = sorted(int(f["listen"].rsplit(":", 1)[1]) for f in daemon.host()["forwards"])
    assert ports == [lbase, lbase + 2]
    assert roundtrip(lbase + 2, b"back") == b"back"
    daemon.ctl("remove", sshd.host)
    assert daemon.list()["hosts"] == []
    assert json.loads(daemon.state_file.read_text())["hosts"] == {}


def test_port_in_use_leaves_nothing_half_added(daemon, sshd, free_port):
    ports = [free_port() for _ in range(3)]
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", ports[1]))
    blocker.listen()
    try:
        r = daemon.ctl("add", sshd.host, *[f"{p}:127.0.0.2:{p}" for p in ports], check=False)
        assert r.returncode == 1
        assert f"127.0.0.1:{ports[1]}" in r.stderr
        assert "already in use" in r.stderr
        assert f"pid {os.getpid()}" in r.stderr  # the OS told us who holds it
        assert daemon.list()["hosts"] == []
        for p in (ports[0], ports[2]):  # the ones bound before the failure were released
            s = socket.socket()
            s.bind(("127.0.0.1", p))
            s.close()
    finally:
        blocker.close()


def test_duplicate_add_is_a_noop_and_conflicts_are_named(daemon, sshd, echo_server, free_port):
    port = free_port()
    t = echo_server()[1]
    daemon.ctl("add", sshd.host, f"{port}:127.0.0.2:{t}")
    r = daemon.ctl("add", sshd.host, f"{port}:127.0.0.2:{t}")
    assert "already forwarded" in r.stdout
    assert len(daemon.host()["forwards"]) == 1
    r = daemon.ctl("add", sshd.host, f"{port}:127.0.0.2:{t + 1}", check=False)
    assert r.returncode == 1
    assert f"127.0.0.1:{port}" in r.stderr and "tunneld already forwards it" in r.stderr


@pytest.mark.timeout(120)
def test_many_concurrent_connections_through_one_forward(daemon, sshd, echo_server, free_port):
    port = free_port()
    daemon.ctl("add", sshd.host, f"{port}:127.0.0.2:{echo_server()[1]}")
    n = 200
    results: list[bool] = [False] * n
    barrier = threading.Barrier(n, timeout=60)

    def worker(i: int) -> None:
        payload = b"%d:" % i + os.urandom(2000)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            barrier.wait()  # all connections open at the same time
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while True:
                data = s.recv(65536)
                if not data:
                    break
                got += data
        results[i] = got == payload

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert sum(results) == n
    daemon.wait_for(lambda: daemon.forward(port)["active"] == 0, what="all closed")
    f = daemon.forward(port)
    assert f["total"] == n and f["last_error"] is None


def test_destination_that_speaks_first(data_daemon, sshd, echo_server, free_port):
    """design.md §9: under uvloop asyncssh's own forwarder loses a greeting sent before the
    client writes.  Ours must deliver it."""
    port = free_port()
    greeting = b"SSH-2.0-FakeServer greets first\r\n"
    data_daemon.ctl("add", sshd.host, f"{port}:127.0.0.2:{echo_server(greeting=greeting)[1]}")
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            got = b""
            while len(got) < len(greeting):
                data = s.recv(100)
                assert data, "closed before the greeting arrived"
                got += data
            assert got == greeting
            s.sendall(b"then echo")
            assert s.recv(100) == b"then echo"


def test_reply_then_close_arrives_whole_before_the_eof(data_daemon, sshd, free_port):
    """A destination that writes and closes at once: its data, EOF and channel close often
    arrive in one read of the SSH socket, and the data must still reach the client, all of it
    and before the EOF (the local writes of one read leave together)."""
    sizes = [1, 100, 5000, 40_000, 300_000, 3_000_000]
    payloads = {n: os.urandom(n) for n in sizes}
    srv = socket.create_server(("127.0.0.2", 0))
    srv.settimeout(30)
    order: list[int] = [n for n in sizes for _ in range(4)]

    def serve() -> None:
        for n in order:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                c.sendall(payloads[n])
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    port = free_port()
    data_daemon.ctl("add", sshd.host, f"{port}:127.0.0.2:{srv.getsockname()[1]}")
    try:
        for n in order:
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                got = bytearray()
                while True:
                    data = s.recv(1 << 20)
                    if not data:
                        break
                    got += data
            assert bytes(got) == payloads[n], (n, len(got))
    finally:
        srv.close()
        t.join(5)


def test_ipv6_bind(daemon, sshd, echo_server):
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6 loopback; the test needs [::1]")
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    daemon.ctl("add", sshd.host, f"[::1]:{port}:127.0.0.2:{echo_server()[1]}")
    f = daemon.forward(port)
    assert f["listen"] == f"[::1]:{port}"
    assert roundtrip(port, b"six", host="::1") == b"six"


def test_proxyjump_host(daemon, sshd, echo_server, free_port):
    """A host reached through a ProxyJump hop (here the same sshd twice)."""
    sshd.add_host_alias("behind", ProxyJump=sshd.host)
    port = free_port()
    daemon.ctl("add", "behind", f"{port}:127.0.0.2:{echo_server()[1]}")
    assert daemon.host("behind")["state"] == "connected"
    assert roundtrip(port, b"via the jump host") == b"via the jump host"


def _sink_server(host: str = "127.0.0.2"):
    """A server that accepts and never reads."""
    srv = socket.socket()
    srv.bind((host, 0))
    srv.listen()
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()

    def close() -> None:
        stop.set()
        t.join(5)
        for c in conns:
            c.close()
        srv.close()
    return srv.getsockname()[1], close


def _blast_server(host: str = "127.0.0.2"):
    """A server that writes as fast as it can to whoever connects."""
    srv = socket.socket()
    srv.bind((host, 0))
    srv.listen()
    stop = threading.Event()
    chunk = os.urandom(1 << 16)

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c = srv.accept()[0]
            except OSError:
                continue
            c.settimeout(0.5)
            with c:
                while not stop.is_set():
                    try:
                        c.sendall(chunk)
                    except socket.timeout:
                        continue
                    except OSError:
                        break

    t = threading.Thread(target=serve, daemon=True)
    t.start()

    def close() -> None:
        stop.set()
        t.join(5)
        srv.close()
    return srv.getsockname()[1], close


@pytest.mark.timeout(120)
def test_slow_reader_keeps_memory_bounded(data_daemon, sshd, free_port):
    """Fast writer, reader that does not read: buffers stay bounded both ways."""
    # remote writes fast, local client never reads
    bport, bclose = _blast_server()
    sport, sclose = _sink_server()
    down, up = free_port(), free_port()
    try:
        data_daemon.ctl("add", sshd.host, f"{down}:127.0.0.2:{bport}", f"{up}:127.0.0.2:{sport}")
        base = rss_kib(data_daemon.pid)
        c = socket.create_connection(("127.0.0.1", down), timeout=10)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        # the server could push gigabytes in this time if nothing held it back
        data_daemon.wait_for(lambda: data_daemon.forward(down)["bytes_in"] > 0, what="data flowing")
        time.sleep(3)
        grown_down = rss_kib(data_daemon.pid) - base
        delivered = data_daemon.forward(down)["bytes_in"]
        # local client writes fast, remote never reads
        u = socket.create_connection(("127.0.0.1", up), timeout=10)
        u.setblocking(False)
        sent = 0
        chunk = b"x" * 65536
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                sent += u.send(chunk)
            except BlockingIOError:
                time.sleep(0.05)
        grown_up = rss_kib(data_daemon.pid) - base
        # everything queued is bounded by socket buffers + SSH windows, not by the 5 s of
        # writing: a few MiB, not hundreds
        assert delivered < 64 * 1024 * 1024, delivered
        assert sent < 64 * 1024 * 1024, sent
        assert grown_down < 48 * 1024, f"daemon RSS grew {grown_down} KiB reading"
        assert grown_up < 48 * 1024, f"daemon RSS grew {grown_up} KiB writing"
        # and the flows still work: drain a little from the blast
        c.settimeout(10)
        assert len(c.recv(65536)) > 0
        c.close()
        u.close()
    finally:
        bclose()
        sclose()


def test_list_json_schema_matches_the_contract(daemon, sshd, echo_server, free_port):
    port = free_port()
    daemon.ctl("add", sshd.host, f"{port}:127.0.0.2:{echo_server()[1]}")
    data = daemon.list()
    assert set(data) >= {"version", "hosts"}
    (h,) = data["hosts"]
    assert h["state"] in {"connecting", "connected", "backoff", "needs-auth", "failed",
                          "stopped"}
    assert h["since"].endswith("Z")
    (f,) = h["forwards"]
    for key, typ in {"spec": str, "kind": str, "listen": str, "target": str, "state": str,
                     "active": int, "total": int, "bytes_in": int, "bytes_out": int}.items():
        assert isinstance(f[key], typ), key
    assert "last_error" in f
    text = daemon.ctl("list").stdout
    assert sshd.host in text and f"127.0.0.1:{port}" in text and "listening" in text


def test_aes_gcm_preferred_unless_ssh_config_says_otherwise(daemon, sshd, echo_server,
                                                             free_port):
    t = echo_server()[1]
    daemon.ctl("add", sshd.host, f"{free_port()}:127.0.0.2:{t}")
    assert daemon.host()["cipher"] == "aes128-gcm@openssh.com"
    sshd.add_host_alias("chacha", Ciphers="chacha20-poly1305@openssh.com")
    daemon.ctl("add", "chacha", f"{free_port()}:127.0.0.2:{t}")
    assert daemon.host("chacha")["cipher"] == "chacha20-poly1305@openssh.com"


def test_rtt_is_measured_by_the_forwarded_connections(data_daemon, sshd, echo_server,
                                                       free_port):
    """``rtt_ms``: null until a forwarded connection's channel opened, then its open →
    confirmation time (what the receive window grows with); stock asyncssh measures none."""
    port = free_port()
    data_daemon.ctl("add", sshd.host, f"{port}:127.0.0.2:{echo_server()[1]}")
    assert data_daemon.host()["rtt_ms"] is None
    assert roundtrip(port, b"timed") == b"timed"
    rtt = data_daemon.host()["rtt_ms"]
    text = data_daemon.ctl("list").stdout
    if "TUNNELD_STOCK_ASYNCSSH" in data_daemon.env:
        assert rtt is None and "round trip" not in text
    else:
        assert isinstance(rtt, float) and 0 <= rtt < 1000, rtt
        assert f"connected for 0s, round trip {rtt:g} ms" in text or \
            f", round trip {rtt:g} ms" in text, text


class _BothWays:
    """A target that, for each connection, sends ``down`` while it reads everything the client
    sends, then closes; ``got`` is the sha256 of what it read from each connection."""

    def __init__(self, down: bytes, host: str = "127.0.0.2"):
        self.down = down
        self.got: list[str] = []
        self.srv = socket.create_server((host, 0))
        self.srv.settimeout(60)
        self.port = self.srv.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            c, _ = self.srv.accept()
        except OSError:
            return
        with c:
            sender = threading.Thread(target=lambda: (c.sendall(self.down),
                                                      c.shutdown(socket.SHUT_WR)))
            sender.start()
            self.got.append(_read_digest(c))
            sender.join(60)

    def close(self) -> None:
        self.srv.close()
        self.thread.join(10)


def _read_digest(s: socket.socket) -> str:
    h = hashlib.sha256()
    while True:
        data = s.recv(1 << 20)
        if not data:
            return h.hexdigest()
        h.update(data)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", PATHS)
def test_server_initiated_rekeys_under_bulk_traffic_both_ways(sshd, free_port, path):
    """sshd starts a key exchange after every megabyte (``RekeyLimit 1M``; tunneld's own limit
    is asyncssh's 1 GiB, so each key exchange here is the server's) while 24 MB go each way at
    once through a forward: both ends get exactly the bytes sent (sha256), and the one SSH
    connection carries on through every key exchange."""
    size = 24_000_000
    up, down = random.Random(1).randbytes(size), random.Random(2).randbytes(size)
    sshd.add_sshd_options(RekeyLimit="1M")
    sshd.start()
    d = Daemon(sshd, extra_env={**_path_env(path), "TUNNELD_LOG_LEVEL": "DEBUG"})
    d.start()
    fastpath = json.loads(d.ctl("status", "--json").stdout)["fastpath"]
    assert fastpath == ({"active": True, "reason": gate.current.reason} if path == "fastpath"
                        else {"active": False, "reason": "TUNNELD_STOCK_ASYNCSSH=1"})
    target = _BothWays(down)
    try:
        port = free_port()
        d.ctl("add", sshd.host, f"{port}:127.0.0.2:{target.port}")
        with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
            sender = threading.Thread(target=lambda: (c.sendall(up),
                                                      c.shutdown(socket.SHUT_WR)))
            sender.start()
            got_down = _read_digest(c)
            sender.join(60)
        target.thread.join(60)
        assert got_down == hashlib.sha256(down).hexdigest()
        assert target.got == [hashlib.sha256(up).hexdigest()]
        d.wait_for(lambda: d.forward(port)["active"] == 0, what="the connection to end")
        f, h = d.forward(port), d.host()
        assert (f["bytes_out"], f["bytes_in"]) == (size, size)
        assert h["state"] == "connected" and h["attempts"] == 1, h
        rekeys = d.log(tail=None).count("Completed key exchange")
        assert rekeys >= 20, rekeys   # the first key exchange, then about one per megabyte
    finally:
        target.close()
        d.close()
