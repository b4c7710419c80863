"""`tunnelctl`: the thin client.  Imports the standard library, tunneld.wire and tunneld.paths
only (no asyncio, asyncssh or pydantic), so it starts fast.

Exit status: 0 success, 1 the command failed, 2 usage error, 3 the daemon could not be reached
or started.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from tunneld import __version__, paths, wire

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
#: seconds to wait for an auto-started daemon's socket
START_TIMEOUT = 15.0
#: seconds to wait for a stopped daemon to exit
STOP_TIMEOUT = 20.0
#: commands that must not start a daemon that is not running
NO_AUTOSTART = {"stop", "status"}


class Unreachable(Exception):
    pass


class Failed(Exception):
    pass


# -- talking to the daemon ---------------------------------------------------------------------

def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        s.close()
        raise
    return s


def _start_daemon(path: str) -> socket.socket:
    if os.environ.get("TUNNELD_NO_AUTOSTART") == "1":
        raise Unreachable(f"tunneld is not running (no socket at {path}) and "
                          "TUNNELD_NO_AUTOSTART=1; start it with `tunneld` or "
                          "`tunnelctl service install`")
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "tunneld", "--detach-stderr"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True, close_fds=True)
        deadline = time.monotonic() + START_TIMEOUT
        exited_at: float | None = None
        while time.monotonic() < deadline:
            try:
                sock = _connect(path)
            except OSError:
                pass
            else:
                _drop_straggler(proc, sock)
                return sock
            if proc.poll() is not None:
                # it may have lost a start race to another daemon: give that one a moment
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > 1.0:
                    break
            time.sleep(0.02)
        err.seek(0)
        detail = err.read().decode(errors="replace").strip()
    if proc.poll() is None:
        raise Unreachable(f"tunneld was started but its socket {path} did not appear within "
                          f"{START_TIMEOUT:g}s; see {paths.log_file()}")
    raise Unreachable("could not start tunneld" + (f":\n{detail}" if detail else
                                                   f"; see {paths.log_file()}"))


def _drop_straggler(proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
    """If another daemon won a start race and answered, end ours: left alone it could take
    over later (say, after that one is stopped) and serve nobody's request."""
    if proc.poll() is not None:
        return
    try:
        with _connect(str(paths.socket_path())) as s:
            s.sendall(wire.encode(wire.request("status")))
            msg = wire.decode(s.makefile("rb").readline(wire.MAX_LINE + 1))
        pid = (msg.get("result") or {}).get("pid")
    except (OSError, wire.ProtocolError):
        return
    if pid is not None and pid != proc.pid:
        proc.terminate()


def open_socket(autostart: bool) -> socket.socket:
    path = str(paths.socket_path())
    try:
        return _connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        if not autostart:
            raise Unreachable(f"tunneld is not running (no daemon at {path})") from None
        return _start_daemon(path)
    except OSError as exc:
        raise Unreachable(f"cannot reach tunneld at {path}: {exc.strerror or exc}") from None


def call(cmd: str, autostart: bool = True, **args: Any) -> Any:
    """Send one request, print progress lines to stderr, return the result or raise."""
    with open_socket(autostart) as s:
        s.sendall(wire.encode(wire.request(cmd, **args)))
        f = s.makefile("rb")
        while True:
            line = f.readline(wire.MAX_LINE + 1)
            if not line:
                raise Unreachable("tunneld closed the connection without answering; see "
                                  f"{paths.log_file()}")
            try:
                msg = wire.decode(line)
            except wire.ProtocolError as exc:
                raise Unreachable(f"tunneld sent a reply tunnelctl cannot read ({exc})") \
                    from None
            if not wire.is_final(msg):
                if "message" in msg:
                    print(msg["message"], file=sys.stderr)
                continue
            version = msg.get("version")
            if version and version != __version__:
                print(f"tunnelctl: warning: this tunnelctl is {__version__} but the daemon is "
                      f"{version}; restart it (`tunnelctl stop`) to run the same version",
                      file=sys.stderr)
            if msg.get("ok"):
                return msg.get("result")
            err = msg.get("error") or {}
            raise Failed(err.get("message") or "the daemon reported an error")


# -- presentation ------------------------------------------------------------------------------

def _size(n: int) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _ago(since: str) -> str:
    try:
        t = time.mktime(time.strptime(since, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    except (ValueError, TypeError):
        return "?"
    s = max(0, int(time.time() - t))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def print_list(data: dict[str, Any]) -> None:
    hosts = data.get("hosts", [])
    if not hosts:
        print("no forwards; add one with `tunnelctl add HOST PORT`")
        return
    for h in hosts:
        print(f"{h['name']}  {h['state']} for {_ago(h.get('since', ''))}")
        if h.get("last_error"):
            print(f"  ! {h['last_error']}")
        rows = [("SPEC", "LISTEN", "TARGET", "STATE", "ACTIVE", "TOTAL", "IN", "OUT")]
        for f in h.get("forwards", []):
            rows.append((f["spec"], f["listen"], f["target"], f["state"], str(f["active"]),
                         str(f["total"]), _size(f["bytes_in"]), _size(f["bytes_out"])))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        for f in h.get("forwards", []):
            if f.get("last_error"):
                print(f"  ! {f['spec']}: {f['last_error']}")


# -- commands ----------------------------------------------------------------------------------

def cmd_add(a: argparse.Namespace) -> int:
    r = call("add", host=a.host, specs=a.specs, public=a.public)
    if r["added"]:
        print(f"{a.host}: added {' '.join(r['added'])}")
    for s in r.get("existing", []):
        print(f"{a.host}: {s} is already forwarded (nothing to do)")
    if r.get("state") and r["state"] != "connected":
        print(f"tunnelctl: warning: {a.host} is {r['state']}"
              + (f": {r['last_error']}" if r.get("last_error") else "")
              + f"\n  the forwards stay and are served once {a.host} is connected;"
              f" `tunnelctl remove {a.host}` drops them", file=sys.stderr)
    return EXIT_OK


def cmd_remove(a: argparse.Namespace) -> int:
    r = call("remove", host=a.host, specs=a.specs)
    print(f"{a.host}: removed {' '.join(r['removed'])}")
    if r.get("note"):
        print(f"tunnelctl: note: {r['note']}", file=sys.stderr)
    return EXIT_OK


def cmd_list(a: argparse.Namespace) -> int:
    r = call("list")
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        print_list(r)
    return EXIT_OK


def cmd_status(a: argparse.Namespace) -> int:
    r = call("status", autostart=False)
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"tunneld {r['version']} running, pid {r['pid']}, up {r['uptime']:.0f}s, "
              f"socket {r['socket']}, {r['hosts']} host(s), {r['forwards']} forward(s)")
    return EXIT_OK


def _lock_free() -> bool:
    """True once no daemon holds the lock (a stopped daemon may linger as a zombie until its
    parent reaps it, so its pid is no proof of life)."""
    import fcntl
    try:
        with open(paths.lock_path(), "a") as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
            return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def cmd_stop(a: argparse.Namespace) -> int:
    try:
        r = call("stop", autostart=False)
    except Unreachable:
        print("tunneld is not running")
        return EXIT_OK
    pid = int(r["pid"])
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if _lock_free():
            print(f"tunneld stopped (pid {pid})")
            return EXIT_OK
        time.sleep(0.02)
    raise Failed(f"tunneld (pid {pid}) did not exit within {STOP_TIMEOUT:g}s")


def cmd_reconnect(a: argparse.Namespace) -> int:
    r = call("reconnect", host=a.host)
    failed = False
    for h in r["hosts"]:
        line = f"{h['name']}: {h['state']}"
        if h.get("last_error") and h["state"] != "connected":
            line += f": {h['last_error']}"
            failed = True
        print(line)
    return EXIT_FAILED if failed else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tunnelctl", description="control the tunneld daemon")
    ap.add_argument("--version", action="version", version=f"tunnelctl {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("add", help="add local forwards to a host")
    p.add_argument("host", help="host alias from ~/.ssh/config, or a host name")
    p.add_argument("specs", nargs="+", metavar="SPEC",
                   help="PORT, A-B, LPORT:RPORT, LPORT:RHOST:RPORT, BIND:LPORT:RHOST:RPORT")
    p.add_argument("--public", action="store_true",
                   help="allow binding a non-loopback address (reachable from other machines)")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("remove", help="remove forwards (all of HOST's with no SPEC)")
    p.add_argument("host")
    p.add_argument("specs", nargs="*", metavar="SPEC")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("list", help="hosts and forwards with state and counters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("status", help="daemon version, pid, uptime; exit 0 if healthy")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("stop", help="stop the daemon (forwards stay saved)")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("reconnect", help="drop and re-establish connections now")
    p.add_argument("host", nargs="?")
    p.set_defaults(func=cmd_reconnect)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Unreachable as exc:
        print(f"tunnelctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except Failed as exc:
        print(f"tunnelctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
