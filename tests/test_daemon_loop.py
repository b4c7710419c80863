"""The daemon's event-loop exception handler (issue 7, found by fuzzing the control socket).

Under uvloop, cancelling ``asyncssh.connect`` while it resolves the host name (a host removed
or stopped mid-connect) leaves the resolver's future to fail alone: asyncio then logs "Future
exception was never retrieved" as an ERROR with the gaierror.  The daemon's handler turns that
expected network error into a DEBUG line; anything else still goes to the default handler.
"""

from __future__ import annotations

import asyncio
import gc
import logging

import asyncssh
import pytest

from tunneld.daemon import loop_exception_handler

uvloop = pytest.importorskip("uvloop")


def _cancel_connects(handler) -> list[logging.LogRecord]:
    """Start and cancel many connects to an unresolvable name; the log records left."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(keep)
    tunneld_log = logging.getLogger("tunneld")
    old_level = tunneld_log.level
    tunneld_log.setLevel(logging.DEBUG)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if handler is not None:
            loop.set_exception_handler(handler)
        for i in range(25):
            task = asyncio.ensure_future(asyncssh.connect("nosuchhost.invalid",
                                                          known_hosts=None))
            await asyncio.sleep(i * 0.00004)
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001 - cancelled or failed: both fine here
                pass
        await asyncio.sleep(0.5)
        gc.collect()
        await asyncio.sleep(0.05)

    try:
        uvloop.run(main())
    finally:
        root.removeHandler(keep)
        tunneld_log.setLevel(old_level)
    return records


def _never_retrieved(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.levelno >= logging.ERROR
            and "never retrieved" in r.getMessage()]


@pytest.mark.timeout(60)
def test_cancelled_connects_log_no_error():
    records = _cancel_connects(loop_exception_handler)
    assert _never_retrieved(records) == []
    # when the situation arose, it was logged at DEBUG, one line, without a traceback
    for r in records:
        if r.name == "tunneld" and "unawaited network error" in r.getMessage():
            assert r.levelno == logging.DEBUG and r.exc_info is None


@pytest.mark.timeout(60)
def test_without_the_handler_asyncio_logs_errors():
    """The reproduction: with the default handler the same run logs ERRORs (if this uvloop
    still has the behaviour; a fixed one makes the handler unnecessary, not wrong)."""
    if not _never_retrieved(_cancel_connects(None)):
        pytest.skip("this uvloop no longer leaves the resolver's future unretrieved")


def test_other_exceptions_go_to_the_default_handler():
    seen = []

    class Loop:
        def default_exception_handler(self, context):
            seen.append(context)

    ctx = {"message": "Task exception was never retrieved", "exception": ValueError("bug")}
    loop_exception_handler(Loop(), ctx)  # type: ignore[arg-type]
    ctx2 = {"message": "Exception in callback", "exception": OSError("x")}
    loop_exception_handler(Loop(), ctx2)  # type: ignore[arg-type]
    assert seen == [ctx, ctx2]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_tcp_connections_get_nodelay_from_the_loop(loop_kind):
    """forward.py and remote_forward.py rely on this instead of a setsockopt per connection:
    the event loop sets TCP_NODELAY on every TCP connection it accepts or makes, so a small
    write through a tunnel leaves at once."""
    import socket

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[int] = loop.create_future()

        class Server(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        server = await loop.create_server(Server, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        made = transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                             socket.TCP_NODELAY)
        got = await asyncio.wait_for(accepted, 10)
        transport.close()
        server.close()
        return got, made

    run = uvloop.run if loop_kind == "uvloop" else asyncio.run
    assert run(main()) == (1, 1)
