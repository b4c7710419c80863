"""Commands run on a server over a host's live connection, spelled in one place: no PTY and
no terminal type (a user's ``RequestTTY``/``RemoteCommand`` in ~/.ssh/config are session
defaults in asyncssh and must not apply to tunneld's own commands), output as bytes or text
as asked, every wait bounded by the caller's timeout."""

from __future__ import annotations

import asyncio

import asyncssh


async def run(conn: asyncssh.SSHClientConnection, command: str,
              timeout: float) -> asyncssh.SSHCompletedProcess:
    """Run ``command`` to its end (its exit status is not checked; text output).  Raises
    asyncio.TimeoutError, asyncssh.Error or OSError."""
    return await asyncio.wait_for(
        conn.run(command, check=False, request_pty=False, term_type=None), timeout)


async def start(conn: asyncssh.SSHClientConnection,
                command: str) -> asyncssh.SSHClientProcess[bytes]:
    """Start ``command`` with its output as bytes and its stdin closed (as ``ssh -n``)."""
    proc: asyncssh.SSHClientProcess[bytes] = await conn.create_process(
        command, encoding=None, request_pty=False, term_type=None)
    proc.stdin.write_eof()
    return proc
