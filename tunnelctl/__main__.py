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
#: verbs that run in the client itself → the wire command they send (house rule 8)
LOCAL_VERBS = {"watch": "open", "ssh": "open"}


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


def _write_output(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def call(cmd: str, autostart: bool = True, **args: Any) -> Any:
    """Send one request, print progress lines (messages to stderr, session output to stdout),
    return the result or raise."""
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
                if "output" in msg:
                    _write_output(msg["output"])
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


def _table(rows: list[tuple[str, ...]], indent: str = "") -> None:
    """Columns padded to their widest cell; the last column is not padded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


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
        _table(rows, indent="  ")
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


def _session_line(r: dict[str, Any]) -> str:
    if r.get("exit_status") is not None:
        return f"exit status {r['exit_status']}"
    if r.get("exit_signal"):
        return f"killed by signal {r['exit_signal']}"
    return r.get("error") or r.get("state", "?")


def _session_exit(r: dict[str, Any]) -> int:
    """A followed session's end as an exit status, as ssh would give it."""
    if r.get("exit_status") is not None:
        return int(r["exit_status"])
    return 255 if r.get("state") in ("failed", "lost") else 128 + 15


def cmd_run(a: argparse.Namespace) -> int:
    command = a.command
    if not command:
        print("tunnelctl run: give the command after --, e.g. "
              "`tunnelctl run barhal -- jupyter lab --no-browser`", file=sys.stderr)
        return EXIT_USAGE
    port: Any = None
    if a.port is not None:
        if a.port == "auto":
            port = "auto"
        elif a.port.isdigit() and 1 <= int(a.port) <= 65535:
            port = int(a.port)
        else:
            print(f"tunnelctl run: --port takes 'auto' or a port number, not {a.port!r}",
                  file=sys.stderr)
            return EXIT_USAGE
    r = call("run", host=a.host, command=command, name=a.name, port=port)
    if a.follow:
        print(f"tunnelctl: session {r['name']} started on {a.host}", file=sys.stderr)
        if r.get("url"):
            print(f"tunnelctl: port {r['port']} is forwarded: {r['url']}", file=sys.stderr)
        end = call("logs", name=r["name"], follow=True)
        print(f"tunnelctl: session {r['name']}: {_session_line(end)}", file=sys.stderr)
        return _session_exit(end)
    print(r["name"])
    if r.get("url"):
        print(f"tunnelctl: port {r['port']} is forwarded: {r['url']}", file=sys.stderr)
    return EXIT_OK


def cmd_sessions(a: argparse.Namespace) -> int:
    r = call("sessions")
    if a.json:
        print(json.dumps(r, indent=1))
        return EXIT_OK
    if not r["sessions"]:
        print("no sessions; start one with `tunnelctl run HOST -- COMMAND`")
        return EXIT_OK
    rows = [("NAME", "HOST", "STATE", "EXIT", "PORT", "STARTED", "COMMAND")]
    for x in r["sessions"]:
        ex = "" if x["state"] in ("starting", "running") else _session_line(x)
        rows.append((x["name"], x["host"], x["state"], ex, str(x["port"] or ""),
                     _ago(x["started"]) + " ago", x["command"]))
    _table(rows)
    return EXIT_OK


def cmd_logs(a: argparse.Namespace) -> int:
    call("logs", name=a.session, follow=a.follow, all=a.all)
    return EXIT_OK


def cmd_kill(a: argparse.Namespace) -> int:
    r = call("kill", name=a.session)
    print(f"{r['name']}: {r['state']}")
    return EXIT_OK


def cmd_open(a: argparse.Namespace) -> int:
    r = call("open", host=a.host, url=a.url)
    if r.get("opened"):
        print(f"opened {r['url']}")
    else:
        print(f"not opened again ({r.get('reason')}): {r['url']}")
    return EXIT_OK


def cmd_watch(a: argparse.Namespace) -> int:
    from tunnelctl import watch
    return watch.watch(a.host, open_url)


def cmd_ssh(a: argparse.Namespace) -> int:
    from tunnelctl import watch
    return watch.ssh(a.host, a.ssh_args, open_url)


def open_url(host: str, url: str, node: str | None) -> None:
    """Ask the daemon to open a marker's URL; report on stderr, never raise."""
    try:
        r = call("open", host=host, url=url, node=node)
        if r.get("opened"):
            print(f"\r\ntunnelctl: opened {r['url']}\r", file=sys.stderr)
    except (Failed, Unreachable) as exc:
        print(f"\r\ntunnelctl: {exc}\r", file=sys.stderr)


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

    p = sub.add_parser("run", help="run a remote command as a session, output watched",
                       usage="tunnelctl run HOST [--name N] [--port auto|N] [--follow] "
                             "-- COMMAND...")
    p.add_argument("host")
    p.add_argument("--name", help="session name (default: the command's name and a number)")
    p.add_argument("--port", metavar="auto|N",
                   help="a port for the command: 'auto' picks one free on the server; "
                        "replaces {port} in COMMAND, exported as PORT, and forwarded")
    p.add_argument("--follow", "-f", action="store_true",
                   help="stream the output until the session ends")
    p.set_defaults(func=cmd_run, command=[])

    p = sub.add_parser("sessions", help="sessions with state and exit status")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sessions)

    p = sub.add_parser("logs", help="a session's output")
    p.add_argument("session")
    p.add_argument("-f", "--follow", action="store_true", help="keep streaming until it ends")
    p.add_argument("--all", action="store_true", help="the whole log, not only its tail")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("kill", help="stop a session's remote process and all its children")
    p.add_argument("session")
    p.set_defaults(func=cmd_kill)

    p = sub.add_parser("open", help="open a remote URL locally through the tunnel")
    p.add_argument("host")
    p.add_argument("url")
    p.set_defaults(func=cmd_open)

    p = sub.add_parser("watch", help="copy stdin to stdout, opening browser-open markers")
    p.add_argument("host", help="the host whose output this is")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("ssh", help="your own ssh in a terminal, output watched for markers",
                       usage="tunnelctl ssh HOST [ssh args...]")
    p.add_argument("host")
    p.add_argument("ssh_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_ssh)
    return ap


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``run HOST [opts] -- CMD...``: everything after the first ``--`` is the command,
    untouched by option parsing."""
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if first is not None and argv[first] == "run" and "--" in argv[first:]:
        i = argv.index("--", first)
        return argv[:i], argv[i + 1:]
    return argv, None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    argv, command = _split_command(argv)
    args = build_parser().parse_args(argv)
    if command is not None:
        args.command = command
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
