"""Helpers of the control-socket tests: the real OpenSSH client riding tunneld's connection."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from conftest import Daemon
from ptyproc import PtyProc

#: seconds one ssh/scp/rsync/git command of a test may take
CMD_TIMEOUT = 60.0


def mux_path(d: Daemon, host: str | None = None) -> Path:
    """Where tunneld serves ``host``'s control socket in this daemon's runtime directory."""
    r = subprocess.run(
        [os.sys.executable, "-c",
         f"from tunneld import paths; print(paths.mux_socket({(host or d.server.host)!r}))"],
        env=d.env, capture_output=True, text=True, check=True)
    return Path(r.stdout.strip())


def ssh_opts(d: Daemon, host: str | None = None) -> list[str]:
    """The options every test gives: this sshd's config, tunneld's socket, never a master
    of its own, and never a login of its own (a refused master must show as a failure)."""
    return ["-F", str(d.server.ssh_config), "-o", f"ControlPath={mux_path(d, host)}",
            "-o", "ControlMaster=no", "-o", "BatchMode=yes"]


def mux_ssh(d: Daemon, *args: str, input: bytes | None = None, host: str | None = None,
            timeout: float = CMD_TIMEOUT, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ssh", *ssh_opts(d, host), *args], input=input,
                          capture_output=True, timeout=timeout, env=env or d.env)


def start_socket(d: Daemon, host: str | None = None) -> Path:
    """Make tunneld use ``host`` (a login: its control socket appears) and wait for it."""
    d.ctl("login", host or d.server.host)
    p = mux_path(d, host)
    d.wait_for(p.is_socket, 10, f"the control socket {p}")
    return p


def sessions_logged(d: Daemon) -> int:
    """How many passengers the daemon's log says ended so far (``HOST: ssh client (pid N):
    ended (exit status 0): CMD``)."""
    return sum(1 for line in d.log(None).splitlines()
               if ": ssh client (pid " in line and "): ended (" in line)


def passengers(d: Daemon, host: str | None = None) -> list[dict]:
    return d.host(host)["mux"]


def wait_passengers(d: Daemon, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(passengers(d)) == n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{n} passengers expected: {json.dumps(passengers(d))}")


class PtySsh(PtyProc):
    """``ssh ARGS`` in a pseudo-terminal of ``cols`` x ``rows``, as a person runs it."""

    def __init__(self, env: dict[str, str], args: list[str], cols: int = 100,
                 rows: int = 30) -> None:
        super().__init__(["ssh", *args], env, cols, rows)
