"""tunneld.fastpath against a real sshd: fewer packets on AEAD ciphers, same bytes, rekeying
still works, stock behaviour elsewhere."""

from __future__ import annotations

import logging
import os

import asyncssh
import pytest

from tunneld import fastpath

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def home(sshd, monkeypatch):
    monkeypatch.setenv("HOME", str(sshd.home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    yield sshd
    fastpath.uninstall()


async def _echo_packets(host: str, echo: tuple[str, int], cipher: str, chunks: int,
                        **kw) -> tuple[int, bytes, bytes, asyncssh.SSHClientConnection]:
    """Send ``chunks`` writes through a direct-tcpip channel; return the packets the client
    sent for them, what was sent and what came back."""
    async with asyncssh.connect(host, encryption_algs=[cipher], **kw) as conn:
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
        return used, sent, got, conn


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"])
async def test_aead_ciphers_send_half_the_packets(home, echo_server, cipher):
    echo = echo_server()
    stock, _, _, _ = await _echo_packets(home.host, echo, cipher, 50)
    assert fastpath.install()
    fast, sent, got, _ = await _echo_packets(home.host, echo, cipher, 50)
    assert got == sent
    # stock asyncssh: an ignore packet before each data packet (and window adjusts)
    assert stock >= 2 * 50
    assert fast <= stock // 2 + 5, (fast, stock)


async def test_other_ciphers_keep_the_ignore_packets(home, echo_server):
    echo = echo_server()
    assert fastpath.install()
    used, sent, got, _ = await _echo_packets(home.host, echo, "aes128-ctr", 50)
    assert got == sent
    assert used >= 2 * 50


async def test_rekeying_under_the_fast_path(home, echo_server):
    assert fastpath.install()
    echo = echo_server()
    kexinits = []
    orig = asyncssh.connection.SSHConnection._send_kexinit

    def counting(self):
        kexinits.append(1)
        return orig(self)

    asyncssh.connection.SSHConnection._send_kexinit = counting
    try:
        async with asyncssh.connect(home.host, encryption_algs=["aes128-gcm@openssh.com"],
                                    rekey_bytes=200_000) as conn:
            reader, writer = await conn.open_connection(*echo)
            data = os.urandom(4_000_000)
            writer.write(data)
            writer.write_eof()
            got = await reader.read()
            assert got == data
            # and the connection is still good after many key exchanges
            result = await conn.run("echo still here", check=True)
            assert result.stdout.strip() == "still here"
    finally:
        asyncssh.connection.SSHConnection._send_kexinit = orig
    assert len(kexinits) >= 5, len(kexinits)


def test_unsupported_version_is_left_alone(monkeypatch):
    fastpath.uninstall()
    assert not fastpath.supported("2.25.0")
    assert fastpath.supported(asyncssh.__version__)
    monkeypatch.setattr(fastpath, "supported", lambda version=None: False)
    before = asyncssh.connection.SSHConnection.send_packet
    assert fastpath.install() is False
    assert asyncssh.connection.SSHConnection.send_packet is before


async def test_asyncssh_logging_unchanged_when_enabled(home, echo_server, caplog):
    """The logging shortcuts only skip what asyncssh would not log anyway."""
    echo = echo_server()
    assert fastpath.install()
    asyncssh.set_debug_level(3)
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncssh"):
            await _echo_packets(home.host, echo, "aes128-gcm@openssh.com", 2)
    finally:
        asyncssh.set_debug_level(1)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("asyncssh")]
    assert any("Sent MSG_CHANNEL_DATA" in m for m in messages), messages[-20:]
    assert any("Received MSG_CHANNEL_DATA" in m for m in messages), messages[-20:]
    assert any("Opening direct TCP connection" in m for m in messages), messages[-20:]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asyncssh"):
        await _echo_packets(home.host, echo, "aes128-gcm@openssh.com", 2)
    assert not [r for r in caplog.records
                if r.name.startswith("asyncssh") and r.levelno < logging.WARNING]


def test_batches_flush_at_the_outermost_end_and_survive_a_failing_flush(caplog):
    done: list[str] = []

    def boom() -> None:
        raise RuntimeError("transport gone")

    fastpath.begin()
    fastpath.begin()
    fastpath.at_end(done.append, "a")
    fastpath.end()
    assert done == [] and fastpath.batching()   # an inner end flushes nothing
    fastpath.at_end(boom)
    fastpath.at_end(lambda: (done.append("b"), fastpath.at_end(done.append, "late")))
    with caplog.at_level(logging.ERROR, logger="tunneld"):
        fastpath.end()
    assert done == ["a", "b", "late"] and not fastpath.batching()
    assert "a batched write failed" in caplog.text


def test_gcm_with_one_context_per_key_seals_as_asyncssh_does():
    from asyncssh.crypto.cipher import GCMCipher
    key, iv = os.urandom(16), os.urandom(12)
    packets = [(os.urandom(4), os.urandom(n)) for n in (16, 100, 32768, 0, 5000)]
    fastpath.uninstall()
    stock = GCMCipher("aes128-gcm", key, iv)
    expected = [stock.encrypt_and_sign(h, d) for h, d in packets]
    assert fastpath.install()
    try:
        sealer = GCMCipher("aes128-gcm", key, iv)
        opener = GCMCipher("aes128-gcm", key, iv)
        for (header, data), want in zip(packets, expected):
            got = sealer.encrypt_and_sign(header, data)
            assert got == want
            assert opener.verify_and_decrypt(header, got[0][len(header):], got[1]) == data
        # a forged tag is refused, and the nonce still moves on as asyncssh's does
        h, d = packets[0]
        sealed = sealer.encrypt_and_sign(h, d)
        assert opener.verify_and_decrypt(h, sealed[0][len(h):], bytes(16)) is None
        assert opener._iv == sealer._iv
    finally:
        fastpath.uninstall()
