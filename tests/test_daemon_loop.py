"""The daemon's event-loop exception handler (issue 7, found by fuzzing the control socket).

Under uvloop, cancelling ``asyncssh.connect`` while it resolves the host name (a host removed
or stopped mid-connect) leaves the resolver's future to fail alone: asyncio then logs "Future
exception was never retrieved" as an ERROR with the gaierror.  The daemon's handler turns that
expected network error into a DEBUG line; anything else still goes to the default handler.
The tests make that situation deterministically (a failed future nobody retrieves), on both
loops, with and without the handler.
"""

from __future__ import annotations

import asyncio
import gc
import logging

import socket

import pytest

from tunneld.daemon import loop_exception_handler

uvloop = pytest.importorskip("uvloop")


def _unretrieved_network_error(run, handler) -> list[logging.LogRecord]:
    """What is logged when a future fails with a resolver error that nobody retrieves (what
    a connect cancelled while resolving leaves behind under uvloop), with ``handler`` set as
    the loop's exception handler (None: asyncio's default)."""
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
        fut = loop.create_future()
        fut.set_exception(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
        del fut          # never retrieved: the loop reports it when the future goes away
        gc.collect()
        await asyncio.sleep(0)

    try:
        run(main())
    finally:
        root.removeHandler(keep)
        tunneld_log.setLevel(old_level)
    return records


def _never_retrieved(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.levelno >= logging.ERROR
            and "never retrieved" in r.getMessage()]


LOOPS = [pytest.param(uvloop.run, id="uvloop"), pytest.param(asyncio.run, id="asyncio")]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("run", LOOPS)
def test_an_unretrieved_network_error_is_one_debug_line(run):
    records = _unretrieved_network_error(run, loop_exception_handler)
    assert _never_retrieved(records) == []
    mine = [r for r in records if r.name == "tunneld"]
    assert len(mine) == 1 and "unawaited network error" in mine[0].getMessage()
    assert mine[0].levelno == logging.DEBUG and mine[0].exc_info is None


@pytest.mark.timeout(30)
@pytest.mark.parametrize("run", LOOPS)
def test_without_the_handler_it_is_an_error_with_a_traceback(run):
    """The reproduction: asyncio's default handler logs the same thing as an ERROR."""
    errors = _never_retrieved(_unretrieved_network_error(run, None))
    assert len(errors) == 1 and errors[0].exc_info is not None


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
