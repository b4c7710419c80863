"""A test SSH server (asyncssh, run as its own process) whose logins need a person.

    python authserver.py --host-key KEY --dir DIR --password PW --code CODE
                         [--methods kbdint,password]

It listens on a free 127.0.0.1 port and writes it to DIR/port once it accepts.  Logins:

* ``kbdint``: keyboard-interactive with two prompts, "Password: " and "Verification code: "
  (both without echo); right when they are PW and CODE;
* ``password``: plain password auth, right when it is PW;
* no public keys, no host-based auth.

Every answer checked appends one line ``<method> ok|fail`` to DIR/attempts (the answers
themselves are never written).  Forwarding (direct-tcpip) is allowed to loopback targets.
SIGUSR1 drops every connection (a lost link); SIGTERM stops the server.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import asyncssh

LOOPBACK = ("127.0.0.1", "127.0.0.2", "localhost", "::1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host-key", required=True)
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--password", required=True)
    ap.add_argument("--code", required=True)
    ap.add_argument("--methods", default="kbdint")
    a = ap.parse_args()
    methods = set(a.methods.split(","))
    conns: set[asyncssh.SSHServerConnection] = set()

    def record(method: str, ok: bool) -> None:
        with open(a.dir / "attempts", "a") as f:
            f.write(f"{method} {'ok' if ok else 'fail'}\n")

    class Server(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            self.conn = conn
            conns.add(conn)

        def connection_lost(self, exc: Exception | None) -> None:
            conns.discard(self.conn)

        def begin_auth(self, username: str) -> bool:
            return True

        def public_key_auth_supported(self) -> bool:
            return False

        def password_auth_supported(self) -> bool:
            return "password" in methods

        def validate_password(self, username: str, password: str) -> bool:
            ok = password == a.password
            record("password", ok)
            return ok

        def kbdint_auth_supported(self) -> bool:
            return "kbdint" in methods

        def get_kbdint_challenge(self, username: str, lang: str, submethods: str):
            return "", "", "", [("Password: ", False), ("Verification code: ", False)]

        def validate_kbdint_response(self, username: str, responses: list[str]) -> bool:
            ok = list(responses) == [a.password, a.code]
            record("kbdint", ok)
            return ok

        def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                                 orig_port: int) -> bool:
            return dest_host in LOOPBACK

    async def serve() -> None:
        def process(proc: asyncssh.SSHServerProcess) -> None:
            # a session (an ssh riding tunneld's login): says what it was asked to run
            proc.stdout.write(f"authserver ran: {proc.command}\n")
            proc.exit(0)
        server = await asyncssh.create_server(Server, "127.0.0.1", 0,
                                              server_host_keys=[a.host_key],
                                              process_factory=process)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGUSR1, lambda: [c.abort() for c in list(conns)])
        loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
        tmp = a.dir / "port.tmp"
        tmp.write_text(str(port))
        tmp.rename(a.dir / "port")
        await stop
        server.close()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
