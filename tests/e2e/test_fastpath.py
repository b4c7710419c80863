"""tunneld.fastpath: fewer packets on AEAD ciphers, same bytes, rekeying still works, only the
connections tunneld attaches are changed, one owner per nonce, and the version gate."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from typing import Any, AsyncIterator, Iterator

import asyncssh
import pytest
from asyncssh.connection import SSHConnection
from asyncssh.crypto.cipher import GCMCipher
from asyncssh.logging import SSHLogger
from test_channel import _exchange, _Host

from tunneld import fastpath
from tunneld.fastpath import batch, gate
from tunneld.fastpath.connection import FastConnection
from tunneld.fastpath.sealing import Opener, Sender
from tunneld.forward import LocalForward
from tunneld.spec import ForwardSpec

pytestmark = pytest.mark.timeout(60)

GCM = "aes128-gcm@openssh.com"
#: the attributes ``FastConnection.attach`` sets on a connection
PATCHED = ("send_packet", "_recv_pkthdr", "_recv_data", "_reset_keepalive_timer",
           "_keepalive_timer_callback", "add_channel", "_log_packet")

fast_only = pytest.mark.skipif(not gate.current.active,
                               reason=f"the fast path is off here ({gate.current.reason})")


@pytest.fixture
def home(sshd, monkeypatch):
    monkeypatch.setenv("HOME", str(sshd.home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    yield sshd


async def _echo_packets(host: str, echo: tuple[str, int], cipher: str, chunks: int,
                        attach: bool = True, **kw) -> tuple[int, bytes, bytes]:
    """Send ``chunks`` writes through a direct-tcpip channel; return the packets the client
    sent for them, what was sent and what came back."""
    async with asyncssh.connect(host, encryption_algs=[cipher], **kw) as conn:
        if attach:
            assert fastpath.attach(conn)
        reader, writer = await conn.open_connection(*echo)
        payload = os.urandom(1000)
        start = conn._send_seq
        for _ in range(chunks):
            writer.write(payload)
            await writer.drain()
            await reader.readexactly(len(payload))
        used = (conn._send_seq - start) & 0xffffffff
        sent = payload * 2
        writer.write(sent)
        writer.write_eof()
        got = await reader.read()
        return used, sent, got


@fast_only
@pytest.mark.parametrize("cipher", [GCM, "chacha20-poly1305@openssh.com"])
async def test_aead_ciphers_send_half_the_packets(home, echo_server, cipher):
    echo = echo_server()
    stock, _, _ = await _echo_packets(home.host, echo, cipher, 50, attach=False)
    fast, sent, got = await _echo_packets(home.host, echo, cipher, 50)
    assert got == sent
    # stock asyncssh: an ignore packet before each data packet (and window adjusts)
    assert stock >= 2 * 50
    assert fast <= stock // 2 + 5, (fast, stock)


@fast_only
async def test_other_ciphers_keep_the_ignore_packets(home, echo_server):
    used, sent, got = await _echo_packets(home.host, echo_server(), "aes128-ctr", 50)
    assert got == sent
    assert used >= 2 * 50


@contextlib.contextmanager
def _counting(cls: type, name: str) -> Iterator[list[Any]]:
    """Record the ``self`` of each call of ``cls.name`` while in the block."""
    calls: list[Any] = []
    orig = getattr(cls, name)

    def counting(self, *args, **kwargs):
        calls.append(self)
        return orig(self, *args, **kwargs)

    setattr(cls, name, counting)
    try:
        yield calls
    finally:
        setattr(cls, name, orig)


@fast_only
async def test_rekeying_under_the_fast_path(home, echo_server):
    echo = echo_server()
    with _counting(SSHConnection, "_send_kexinit") as kexinits:
        async with asyncssh.connect(home.host, encryption_algs=[GCM],
                                    rekey_bytes=200_000) as conn:
            assert fastpath.attach(conn)
            reader, writer = await conn.open_connection(*echo)
            data = os.urandom(4_000_000)
            writer.write(data)
            writer.write_eof()
            got = await reader.read()
            assert got == data
            # and the connection is still good after many key exchanges
            result = await conn.run("echo still here", check=True)
            assert result.stdout.strip() == "still here"
    assert len(kexinits) >= 5, len(kexinits)


@fast_only
async def test_asyncssh_logging_unchanged_when_enabled(home, echo_server, caplog):
    """The logging shortcuts only skip what asyncssh would not log anyway."""
    echo = echo_server()
    asyncssh.set_debug_level(3)
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncssh"):
            await _echo_packets(home.host, echo, GCM, 2)
    finally:
        asyncssh.set_debug_level(1)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("asyncssh")]
    assert any("Sent MSG_CHANNEL_DATA" in m for m in messages), messages[-20:]
    assert any("Received MSG_CHANNEL_DATA" in m for m in messages), messages[-20:]
    assert any("Opening direct TCP connection" in m for m in messages), messages[-20:]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asyncssh"):
        await _echo_packets(home.host, echo, GCM, 2)
    assert not [r for r in caplog.records
                if r.name.startswith("asyncssh") and r.levelno < logging.WARNING]


def test_batches_flush_at_the_outermost_end_and_survive_a_failing_flush(caplog):
    done: list[str] = []

    def boom() -> None:
        raise RuntimeError("transport gone")

    with caplog.at_level(logging.ERROR, logger="tunneld"):
        with batch:
            with batch:
                batch.later(done.append, "a")
            assert done == [] and batch.depth   # an inner end flushes nothing
            batch.later(boom)
            batch.later(lambda: (done.append("b"), batch.later(done.append, "late")))
    assert done == ["a", "b", "late"] and not batch.depth
    assert "a batched write failed" in caplog.text


# -- an in-process asyncssh server: the peer the fast path must not change -----------------------

class _Server(asyncssh.SSHServer):
    """No login, direct-tcpip to anywhere (asyncssh connects it), and a record of its
    connections."""

    conns: list[asyncssh.SSHServerConnection] = []

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conns.append(conn)

    def begin_auth(self, username: str) -> bool:
        return False

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> bool:
        return True


@contextlib.asynccontextmanager
async def _inprocess_server(**options: Any) -> AsyncIterator[tuple[int, list[Any]]]:
    """(port, its connections) of a stock asyncssh server on 127.0.0.1, in this process."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    conns: list[asyncssh.SSHServerConnection] = []
    server_class = type("Server", (_Server,), {"conns": conns})

    async def echo(process: asyncssh.SSHServerProcess) -> None:
        process.stdout.write(await process.stdin.read())
        process.exit(0)

    server = await asyncssh.create_server(server_class, "127.0.0.1", 0,
                                          server_host_keys=[key], process_factory=echo,
                                          encryption_algs=[GCM], **options)
    try:
        yield server.sockets[0].getsockname()[1], conns
    finally:
        server.close()
        await server.wait_closed()


def _client(port: int, **kw: Any) -> Any:
    return asyncssh.connect("127.0.0.1", port, known_hosts=None, username="nobody",
                            config=None, client_keys=None, agent_path=None,
                            encryption_algs=[GCM], **kw)


def _methods(cls: type) -> dict[str, Any]:
    return {k: v for k, v in vars(cls).items() if callable(v)}


@fast_only
async def test_only_the_attached_connection_is_changed(echo_server):
    """asyncssh's classes stay as they are: the in-process server's connection and a second,
    unattached client connection run stock asyncssh, in the same process."""
    classes = {cls: _methods(cls) for cls in (SSHConnection, GCMCipher, SSHLogger)}
    async with _inprocess_server() as (port, server_conns):
        async with _client(port) as attached, _client(port) as other:
            assert fastpath.attach(attached)
            echo = echo_server()
            fwd = LocalForward(ForwardSpec("127.0.0.1", 0, *echo), _Host(attached))
            await fwd.bind()
            try:
                assert await _exchange(fwd.spec.bind_port, b"x" * 100_000) == b"x" * 100_000
            finally:
                await fwd.close()
            reader, writer = await other.open_connection(*echo)
            writer.write(b"stock")
            assert await reader.readexactly(5) == b"stock"
            writer.close()
            for name in PATCHED:
                assert name in vars(attached), name
            assert type(attached.logger) is not SSHLogger
            for conn in (other, *server_conns):
                assert not set(PATCHED) & set(vars(conn)), vars(conn).keys()
                for name in PATCHED:
                    assert getattr(conn, name).__func__ is getattr(type(conn), name)
                assert type(conn.logger) is SSHLogger
                assert "decrypt_packet" not in vars(conn._recv_encryption)
                assert "encrypt_and_sign" not in vars(conn._send_encryption._cipher)
                assert FastConnection.of(conn) is None
    assert {cls: _methods(cls) for cls in classes} == classes


@fast_only
async def test_one_owner_per_nonce_across_fast_and_asyncssh_packets_and_rekeys(echo_server):
    """Every packet the attached client sealed was sealed once, by ``Sender.seal``, with a
    nonce of its own, and the (stock asyncssh) server opened every one of them; every packet
    the server sealed was opened once, by ``Opener.open`` (the client's stock cipher is used
    only before the client is attached).  Fast-path packets (a lean channel), asyncssh's own
    (a session, global requests, key exchange) and rekeys started by either side, mixed."""
    sealed: list[tuple[bytes, int]] = []      # (key, counter) of each Sender.seal on GCM
    opened: collections.Counter[bytes] = collections.Counter()   # Opener.open per key
    stock_seal: collections.Counter[bytes] = collections.Counter()   # GCMCipher, per key
    stock_open: collections.Counter[bytes] = collections.Counter()
    stock_bad: list[bytes] = []
    orig_seal, orig_open = Sender.seal, Opener.open
    orig_encrypt, orig_decrypt = GCMCipher.encrypt_and_sign, GCMCipher.verify_and_decrypt

    def seal(self, pkttype, head, data=b""):
        seq = orig_seal(self, pkttype, head, data)
        if self.aead is not None:
            sealed.append((self.enc._cipher._key, (self.counter - 1) & (2 ** 64 - 1)))
        return seq

    def open_(self, header, body):
        opened[self.enc._cipher._key] += 1
        return orig_open(self, header, body)

    def encrypt(self, header, data):
        stock_seal[self._key] += 1
        return orig_encrypt(self, header, data)

    def decrypt(self, header, data, mac):
        plain = orig_decrypt(self, header, data, mac)
        stock_open[self._key] += 1
        if plain is None:
            stock_bad.append(self._key)
        return plain

    kexinits: list[bool] = []   # is_server() of each side that started a key exchange
    orig_kexinit = SSHConnection._send_kexinit

    def kexinit(self):
        kexinits.append(self.is_server())
        return orig_kexinit(self)

    patches = ((Sender, "seal", seal), (Opener, "open", open_),
               (GCMCipher, "encrypt_and_sign", encrypt),
               (GCMCipher, "verify_and_decrypt", decrypt),
               (SSHConnection, "_send_kexinit", kexinit))
    for cls, name, fn in patches:
        setattr(cls, name, fn)
    try:
        async with _inprocess_server(rekey_bytes=700_000) as (port, server_conns):
            async with _client(port, rekey_bytes=1_000_000) as conn:
                assert fastpath.attach(conn)
                (server,) = server_conns
                echo = echo_server()
                fwd = LocalForward(ForwardSpec("127.0.0.1", 0, *echo), _Host(conn))
                await fwd.bind()
                try:
                    for n in (3_000_000, 10, 2_000_000):
                        payload = os.urandom(n)
                        assert await _exchange(fwd.spec.bind_port, payload) == payload
                        result = await conn.run(input="asyncssh's own packets", check=True)
                        assert result.stdout == "asyncssh's own packets"
                finally:
                    await fwd.close()
                # quiet: each side has handled every packet the other sent
                await conn._make_global_request(b"nothing@tunneld")
                for _ in range(200):
                    if (conn._send_seq, conn._recv_seq) == (server._recv_seq, server._send_seq):
                        break
                    await asyncio.sleep(0.01)
                assert conn._send_seq == server._recv_seq
                assert conn._recv_seq == server._send_seq
                quiet = (list(sealed), collections.Counter(opened),   # before the close
                         collections.Counter(stock_seal), collections.Counter(stock_open))
    finally:
        for cls, name, fn in patches:
            setattr(cls, name, {"seal": orig_seal, "open": orig_open,
                                "encrypt_and_sign": orig_encrypt,
                                "verify_and_decrypt": orig_decrypt,
                                "_send_kexinit": orig_kexinit}[name])
    assert True in kexinits and False in kexinits, kexinits   # both sides started rekeys
    sealed, opened, stock_seal, stock_open = quiet
    assert len(sealed) > 200 and len(set(sealed)) == len(sealed)   # no nonce used twice
    by_key: dict[bytes, list[int]] = collections.defaultdict(list)
    for key, counter in sealed:
        by_key[key].append(counter)
    assert len(by_key) >= 4, len(by_key)
    for key, counters in by_key.items():   # one step per packet, no gap, no repeat
        assert counters == list(range(counters[0], counters[0] + len(counters)))
        # the server opened each (plus those the client sealed before it was attached)
        assert stock_open[key] == len(counters) + stock_seal[key], key
    assert not stock_bad
    server_keys = set(stock_seal) - set(by_key)
    assert len(server_keys) >= 4 and set(opened) <= server_keys
    for key in server_keys:   # what the server sealed, the client opened, once each
        assert stock_seal[key] == opened[key] + stock_open[key], key


# -- the version gate ------------------------------------------------------------------------------

def test_the_gate_allows_tested_versions_only():
    assert gate.decide(asyncssh.__version__, {}).active
    off = gate.decide("2.25.0", {})
    assert not off.active and off.reason == "asyncssh 2.25.0 not tested"
    assert off.snapshot() == {"active": False, "reason": "asyncssh 2.25.0 not tested"}
    assert not gate.decide("2.24.1.post1", {}).active
    stock = gate.decide(asyncssh.__version__, {"TUNNELD_STOCK_ASYNCSSH": "1"})
    assert not stock.active and stock.reason == "TUNNELD_STOCK_ASYNCSSH=1"


async def test_an_untested_version_runs_stock_asyncssh(home, echo_server, monkeypatch,
                                                       caplog):
    """With the gate off nothing is attached, a forward's clients get asyncssh's own
    channels, and the data still flows both ways; the log says so once."""
    monkeypatch.setattr(gate, "current", gate.decide("2.99.0", {}))
    assert fastpath.status() == {"active": False, "reason": "asyncssh 2.99.0 not tested"}
    with caplog.at_level(logging.INFO, logger="tunneld"):
        fastpath.announce()
    assert [r.getMessage() for r in caplog.records] == [
        "asyncssh 2.99.0 is not one fastpath was written for "
        f"({', '.join(gate.TESTED)}); using stock asyncssh"]
    echo = echo_server()
    async with asyncssh.connect(home.host, encryption_algs=[GCM]) as conn:
        assert not fastpath.attach(conn)
        assert not set(PATCHED) & set(vars(conn))
        fwd = LocalForward(ForwardSpec("127.0.0.1", 0, *echo), _Host(conn))
        await fwd.bind()
        try:
            payload = os.urandom(2_000_000)
            assert await _exchange(fwd.spec.bind_port, payload) == payload
            assert fwd.bytes_out == fwd.bytes_in == len(payload)
        finally:
            await fwd.close()
