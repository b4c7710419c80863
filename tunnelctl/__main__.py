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
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

from tunneld import __version__, paths, wire

if TYPE_CHECKING:
    import subprocess

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
#: the status of a Unix tool whose output pipe closed (killed by SIGPIPE: 128 + 13)
EXIT_PIPE = 141
#: seconds to wait for an auto-started daemon's socket
START_TIMEOUT = 15.0
#: seconds to wait for a stopped daemon to exit
STOP_TIMEOUT = 20.0
#: a limit: a column cut to fit the terminal keeps at least this many characters
MIN_SQUEEZED = 12
#: verbs that run in the client itself → the wire command they send (house rule 8)
LOCAL_VERBS = {"watch": "open", "ssh": "open", "service": "status", "completion": "list"}


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
    import subprocess   # here, not at the top: every other command starts faster without it
    import tempfile
    with tempfile.TemporaryFile() as err:
        # -P: the current directory is not put on sys.path, so a `tunneld/` folder there (a
        # clone of this project, say) cannot shadow the installed package
        proc = subprocess.Popen([sys.executable, "-P", "-m", "tunneld", "--detach-stderr"],
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


def call(cmd: str, autostart: bool = True,
         on_progress: Callable[[dict[str, Any]], None] | None = None, **args: Any) -> Any:
    """Send one request, print progress lines (messages to stderr, session output to stdout;
    ``on_progress`` gets every progress line too), return the result or raise."""
    with open_socket(autostart) as s:
        try:
            s.sendall(wire.encode(wire.request(cmd, **args)))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon already closed (it refused us): its reply is still readable
        f = s.makefile("rb")
        while True:
            try:
                line = f.readline(wire.MAX_LINE + 1)
            except OSError as exc:
                raise Unreachable(f"lost the connection to tunneld ({exc.strerror or exc}); "
                                  f"see {paths.log_file()}") from None
            if not line:
                raise Unreachable("tunneld closed the connection without answering; see "
                                  f"{paths.log_file()}")
            try:
                msg = wire.decode(line)
            except wire.ProtocolError as exc:
                raise Unreachable(f"tunneld sent a reply tunnelctl cannot read ({exc})") \
                    from None
            if wire.is_prompt(msg):
                _answer(s, msg)
                continue
            if not wire.is_final(msg):
                if on_progress is not None:
                    on_progress(msg)
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


# -- login prompts -----------------------------------------------------------------------------

def can_prompt(a: argparse.Namespace) -> bool:
    """True if a person can answer login prompts here: a controlling terminal, no --no-prompt."""
    if getattr(a, "no_prompt", False):
        return False
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        return False
    return True


def _answer(s: socket.socket, msg: dict[str, Any]) -> None:
    """Ask the terminal's person the daemon's login questions and send the answer back (a
    cancel on ^C or a closed terminal).  The answers are not kept."""
    try:
        p = wire.parse_prompt(msg)
    except wire.ProtocolError as exc:
        raise Unreachable(f"tunneld sent a prompt tunnelctl cannot read ({exc})") from None
    try:
        reply = wire.answer(p["id"], _ask_tty(p))
    except KeyboardInterrupt:
        _send_quietly(s, wire.cancel(p["id"]))
        raise
    except (OSError, EOFError):
        reply = wire.cancel(p["id"])  # the terminal is gone
    _send_quietly(s, reply)


def _send_quietly(s: socket.socket, msg: dict[str, Any]) -> None:
    try:
        s.sendall(wire.encode(msg))
    except OSError:
        pass  # the daemon went away: the final read reports it


def _ask_tty(p: dict[str, Any]) -> list[str]:
    """Ask ``p``'s prompts on /dev/tty (no echo unless the server allows it)."""
    import getpass
    import io
    # as getpass does: a tty is not seekable, so no open(..., "r+")
    with io.TextIOWrapper(io.FileIO(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY), "w+")) as tty:
        if p["attempt"] > 1:
            tty.write("Bad passphrase, try again.\n" if p["kind"] == "passphrase" else
                      "Permission denied, please try again.\n")
        for text in (p["name"], p["instructions"]):
            if text:
                tty.write(text.rstrip("\n") + "\n")
        tty.flush()
        answers: list[str] = []
        for text, echo in p["prompts"]:
            shown = text if p["kind"] == "passphrase" else f"({p['host']}) {text}"
            if echo:
                tty.write(shown)
                tty.flush()
                line = tty.readline()
                if not line:
                    raise EOFError
                answers.append(line.rstrip("\n"))
            else:
                answers.append(getpass.getpass(shown, stream=tty))
        return answers


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


def _table(rows: list[tuple[str, ...]], indent: str = "", squeeze: tuple[int, ...] = (),
           width: int | None = None) -> None:
    """Columns padded to their widest cell; the last column is not padded.  The columns
    ``squeeze`` (indexes; e.g. an error, a command) are cut with "…" so that rows fit the
    terminal's width (``COLUMNS``, else the terminal, else 80); ``--json`` has them whole."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    if width is None:
        import shutil
        width = shutil.get_terminal_size().columns
    over = len(indent) + sum(widths) + 2 * (len(widths) - 1) - width
    for i in sorted(squeeze, key=lambda i: -widths[i]):
        if over <= 0:
            break
        floor = max(len(rows[0][i]), MIN_SQUEEZED)
        cut = min(over, max(0, widths[i] - floor))
        widths[i] -= cut
        over -= cut
    for r in rows:
        print(indent + "  ".join(_fit(c, w).ljust(w) for c, w in zip(r, widths)).rstrip())


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(0, width - 1)] + "…"


def print_list(data: dict[str, Any]) -> None:
    hosts = data.get("hosts", [])
    if not hosts:
        print("no forwards; add one with `tunnelctl add HOST PORT`")
        return
    for h in hosts:
        print(f"{h['name']}  {h['state']} for {_ago(h.get('since', ''))}")
        if h.get("last_error"):
            print(f"  ! {h['last_error']}")
        rows = [("SPEC", "LISTEN", "TARGET", "STATE", "ACTIVE", "TOTAL", "IN", "OUT",
                 "ORIGIN")]
        for f in h.get("forwards", []):
            listen, target = f["listen"], f["target"]
            if f.get("kind") == "remote":  # the server listens; the target is reached from here
                listen, target = f"{h['name']}:{listen}", f"here:{target}"
            elif f.get("kind") == "socks":
                target = f"SOCKS via {h['name']}"
            rows.append((f["spec"], listen, target, f["state"], str(f["active"]),
                         str(f["total"]), _size(f["bytes_in"]), _size(f["bytes_out"]),
                         f.get("origin", "")))
        _table(rows, indent="  ")
        for f in h.get("forwards", []):
            if f.get("last_error"):
                print(f"  ! {f['spec']}: {f['last_error']}")


# -- commands ----------------------------------------------------------------------------------

def cmd_add(a: argparse.Namespace) -> int:
    if not (a.specs or a.remote or a.socks):
        print("usage: tunnelctl add HOST [SPEC...] [-R SPEC]... [-D [BIND:]PORT]... "
              "[--public]\ntunnelctl add: error: name at least one forward: SPEC (e.g. 8090), "
              "-R SPEC (e.g. -R 9000:localhost:8000) or -D [BIND:]PORT (e.g. -D 1080)",
              file=sys.stderr)
        return EXIT_USAGE
    args: dict[str, Any] = {"specs": a.specs}
    if a.remote:
        args["remote"] = a.remote
    if a.socks:
        args["socks"] = a.socks
    if can_prompt(a):
        args["interactive"] = True
    if a.force:
        args["force"] = True
    r = call("add", host=a.host, public=a.public, **args)
    if r["added"]:
        print(f"{a.host}: added {', '.join(r['added'])}")
    for s in r.get("saved", []):
        print(f"{a.host}: {s} was an automatic forward; it is now saved (it stays, and comes "
              "back after a restart)")
    for s in r.get("existing", []):
        print(f"{a.host}: {s} is already forwarded (nothing to do)")
    if r.get("state") == "connected":
        for f in r.get("forwards", []):
            if f.get("last_error"):
                print(f"tunnelctl: warning: {f['spec']}: {f['last_error']}", file=sys.stderr)
    if r.get("state") and r["state"] != "connected":
        print(f"tunnelctl: warning: {a.host} is {r['state']}"
              + (f": {r['last_error']}" if r.get("last_error") else "")
              + f"\n  the forwards stay and are served once {a.host} is connected;"
              f" `tunnelctl remove {a.host}` drops them", file=sys.stderr)
    return EXIT_OK


def cmd_remove(a: argparse.Namespace) -> int:
    args: dict[str, Any] = {"specs": a.specs}
    if a.remote:
        args["remote"] = a.remote
    if a.socks:
        args["socks"] = a.socks
    r = call("remove", host=a.host, **args)
    print(f"{a.host}: removed {', '.join(r['removed'])}")
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


def stop_daemon() -> int | None:
    """Stop a running daemon and wait until it has exited: its pid, or None if none ran."""
    try:
        r = call("stop", autostart=False)
    except Unreachable:
        return None
    pid = int(r["pid"])
    # the daemon lets open connections finish for up to r["drain"] seconds
    limit = STOP_TIMEOUT + float(r.get("drain") or 0)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if _lock_free():
            return pid
        time.sleep(0.02)
    raise Failed(f"tunneld (pid {pid}) did not exit within {limit:g}s")


def cmd_stop(a: argparse.Namespace) -> int:
    pid = stop_daemon()
    if pid is None:
        print("tunneld is not running")
    else:
        print(f"tunneld stopped (pid {pid})")
    return EXIT_OK


def cmd_reconnect(a: argparse.Namespace) -> int:
    r = call("reconnect", host=a.host, **({"interactive": True} if can_prompt(a) else {}))
    failed = False
    for h in r["hosts"]:
        line = f"{h['name']}: {h['state']}"
        if h.get("last_error") and h["state"] != "connected":
            line += f": {h['last_error']}"
            failed = True
        print(line)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_login(a: argparse.Namespace) -> int:
    r = call("login", host=a.host, **({"interactive": True} if can_prompt(a) else {}))
    h = r["hosts"][0]
    if h["state"] != "connected":
        print(f"tunnelctl: {a.host}: {h['state']}"
              + (f": {h['last_error']}" if h.get("last_error") else ""), file=sys.stderr)
        return EXIT_FAILED
    if r.get("already"):
        print(f"{a.host}: connected (already logged in)")
    elif r.get("kept"):
        print(f"{a.host}: connected")
    else:
        print(f"{a.host}: connected; the login works (it has no forwards or sessions, so the "
              "connection is closed again)")
    return EXIT_OK


def _session_line(r: dict[str, Any]) -> str:
    if r.get("state") == "killed":   # by `tunnelctl kill`: its exit status is the signal's
        return "killed"
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
    extra: dict[str, Any] = {} if a.detach else {"detach": False}
    if a.follow:
        extra["follow"] = True   # we see how it ends: no start check in the daemon
    if can_prompt(a):
        extra["interactive"] = True
    r = call("run", host=a.host, command=command, name=a.name, port=port, **extra)
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
    if a.prune:
        return _forget([], ended=True)
    r = call("sessions")
    if a.json:
        print(json.dumps(r, indent=1))
        return EXIT_OK
    if not r["sessions"]:
        print("no sessions; start one with `tunnelctl run HOST -- COMMAND`")
        return EXIT_OK
    rows = [("NAME", "HOST", "STATE", "EXIT", "MODE", "PORT", "STARTED", "COMMAND")]
    for x in r["sessions"]:
        ex = "" if x["state"] in ("starting", "running", "disconnected") else _session_line(x)
        mode = "detached" if x.get("detached", False) else "attached"
        rows.append((x["name"], x["host"], x["state"], ex, mode, str(x["port"] or ""),
                     _ago(x["started"]) + " ago", x["command"]))
    _table(rows, squeeze=(7, 3))
    return EXIT_OK


def _forget(names: list[str], ended: bool = False) -> int:
    r = call("forget", names=names, ended=ended)
    if r["forgotten"]:
        print(f"forgot {' '.join(r['forgotten'])}")
    else:
        print("no ended sessions to forget")
    return EXIT_OK


def cmd_forget(a: argparse.Namespace) -> int:
    return _forget(a.sessions)


def cmd_logs(a: argparse.Namespace) -> int:
    if a.daemon:
        if a.session is not None:
            print("tunnelctl logs: --daemon shows the daemon's own log; give no SESSION",
                  file=sys.stderr)
            return EXIT_USAGE
        from tunnelctl import daemonlog
        return daemonlog.show(paths.log_file(), None if a.all else a.lines, a.follow)
    if a.session is None:
        print("tunnelctl logs: name a SESSION (`tunnelctl sessions` lists them), or pass "
              "--daemon for the daemon's log", file=sys.stderr)
        return EXIT_USAGE
    call("logs", name=a.session, follow=a.follow, all=a.all)
    return EXIT_OK


def cmd_reload(a: argparse.Namespace) -> int:
    r = call("reload", autostart=False)
    print(f"config reloaded: added {' '.join(r['added']) or 'nothing'}; removed "
          f"{' '.join(r['removed']) or 'nothing'}; {r['unchanged']} unchanged")
    for text in r.get("existing", []):
        print(f"tunnelctl: note: {text} was already forwarded (added with `tunnelctl add`); "
              "left as it is", file=sys.stderr)
    for f in r.get("failed", []):
        print(f"tunnelctl: {f['host']} {f['spec']}: {f['error']}", file=sys.stderr)
    return EXIT_FAILED if r.get("failed") else EXIT_OK


def _clock(iso: str) -> str:
    """An event's UTC time as local HH:MM:SS."""
    import calendar
    try:
        t = calendar.timegm(time.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S"))
    except (TypeError, ValueError):
        return "--:--:--"
    return time.strftime("%H:%M:%S", time.localtime(t))


def format_event(ev: dict[str, Any]) -> str:
    """One event as one line for a person: ``21:00:03 barhal: connecting -> connected``."""
    kind, host = ev.get("kind"), ev.get("host")
    head = f"{_clock(ev.get('time', ''))} {host or 'tunneld'}:"
    if kind == "host":
        why = f" ({ev['error']})" if ev.get("error") else ""
        return f"{head} {ev.get('old')} -> {ev.get('new')}{why}"
    if kind == "forward":
        if ev.get("event") == "state":
            return f"{head} forward {ev.get('spec')}: {ev.get('old')} -> {ev.get('new')}"
        return f"{head} forward {ev.get('spec')} {ev.get('event')} ({ev.get('origin')})"
    if kind == "session":
        if ev.get("event") == "ended":
            how = ev.get("state")
            if ev.get("exit_status") is not None:
                how = f"{how}, exit status {ev['exit_status']}"
            return f"{head} session {ev.get('name')} ended ({how})"
        return f"{head} session {ev.get('name')} {ev.get('event')}"
    if kind == "open":
        src = f" ({ev['source']})" if ev.get("source") else ""
        return f"{head} opened {ev.get('url')}{src}"
    if kind == "daemon":
        if ev.get("event") == "reloaded":
            return (f"{head} config reloaded (added {' '.join(ev.get('added') or []) or '-'}"
                    f"; removed {' '.join(ev.get('removed') or []) or '-'})")
        return f"{head} {ev.get('event')}"
    return f"{head} {kind} " + json.dumps({k: v for k, v in ev.items()
                                           if k not in ("time", "kind", "host")})


def cmd_events(a: argparse.Namespace) -> int:
    def show(msg: dict[str, Any]) -> None:
        if msg.get("subscribed"):
            print("tunnelctl: events: watching (^C ends)", file=sys.stderr, flush=True)
        ev = msg.get("event")
        if isinstance(ev, dict):
            print(json.dumps(ev) if a.json else format_event(ev), flush=True)
    try:
        r = call("events", autostart=False, on_progress=show)
    except KeyboardInterrupt:
        return EXIT_OK  # the usual way to end the stream
    print(f"tunnelctl: events: {r.get('ended', 'the stream ended')}", file=sys.stderr)
    return EXIT_OK


def _daemon_status() -> dict[str, Any] | None:
    try:
        return call("status", autostart=False)
    except (Unreachable, Failed):
        return None


def _stop_for_service() -> str | None:
    pid = stop_daemon()
    if pid is None:
        return None
    return (f"stopped the tunneld that was running (pid {pid}) so that the service runs it; "
            "its forwards are saved")


def cmd_service(a: argparse.Namespace) -> int:
    from tunnelctl import service
    manager = a.manager or service.default_manager()
    if a.action == "install":
        return service.install(manager, a.dry_run, _stop_for_service)
    if a.action == "uninstall":
        return service.uninstall(manager, a.dry_run)
    return service.status(manager, _daemon_status)


def cmd_completion(a: argparse.Namespace) -> int:
    from tunnelctl import completion
    if a.names:
        return completion.print_names(a.names)
    if a.shell is None:
        print("tunnelctl completion: name a shell: bash or zsh", file=sys.stderr)
        return EXIT_USAGE
    sub = next(x for x in build_parser()._actions
               if isinstance(x, argparse._SubParsersAction))
    helps = {c.dest: c.help or "" for c in sub._choices_actions}
    commands = {name: (helps.get(name, ""),
                       sorted(o for act in p._actions for o in act.option_strings
                              if act.help != argparse.SUPPRESS))
                for name, p in sub.choices.items()}
    sys.stdout.write(completion.render(a.shell, commands))
    return EXIT_OK


def cmd_kill(a: argparse.Namespace) -> int:
    r = call("kill", name=a.session)
    print(f"{r['name']}: {r['state']}")
    return EXIT_OK


def cmd_open(a: argparse.Namespace) -> int:
    r = call("open", host=a.host, url=a.url, **({"interactive": True} if can_prompt(a) else {}))
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


def _no_prompt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-prompt", action="store_true",
                   help="never ask for a password, code or passphrase (a login that needs one "
                        "leaves the host in needs-auth)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tunnelctl", description="control the tunneld daemon")
    ap.add_argument("--version", action="version", version=f"tunnelctl {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("add", help="add forwards to a host (local, -R remote, -D SOCKS)",
                       usage="tunnelctl add HOST [SPEC...] [-R SPEC]... [-D [BIND:]PORT]... "
                             "[--public]")
    p.add_argument("host", help="host alias from ~/.ssh/config, or a host name")
    p.add_argument("specs", nargs="*", metavar="SPEC",
                   help="PORT, A-B, LPORT:RPORT, LPORT:RHOST:RPORT, BIND:LPORT:RHOST:RPORT")
    p.add_argument("-R", dest="remote", action="append", default=[], metavar="SPEC",
                   help="remote forward: the server listens on [RBIND:]RPORT (default "
                        "127.0.0.1) and connects back to LHOST:LPORT from here; "
                        "[RBIND:]RPORT:LHOST:LPORT, ranges allowed")
    p.add_argument("-D", dest="socks", action="append", default=[], metavar="[BIND:]PORT",
                   help="SOCKS5/4a proxy on a local port; host names are resolved by the "
                        "server")
    p.add_argument("--public", action="store_true",
                   help="allow a non-loopback listen address (reachable from other machines)")
    p.add_argument("--force", "--offline", dest="force", action="store_true",
                   help="add a host that is not in ~/.ssh/config and does not resolve now "
                        "(e.g. one reached only through a VPN that is down)")
    _no_prompt(p)
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("remove", help="remove forwards (all of HOST's with no SPEC)",
                       usage="tunnelctl remove HOST [SPEC...] [-R SPEC|RPORT]... "
                             "[-D [BIND:]PORT]...")
    p.add_argument("host")
    p.add_argument("specs", nargs="*", metavar="SPEC")
    p.add_argument("-R", dest="remote", action="append", default=[], metavar="SPEC",
                   help="a remote forward, by its spec or its remote port")
    p.add_argument("-D", dest="socks", action="append", default=[], metavar="[BIND:]PORT",
                   help="a SOCKS proxy")
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
    _no_prompt(p)
    p.set_defaults(func=cmd_reconnect)

    p = sub.add_parser("login", help="log in to a host now, answering its password / code "
                                     "prompts here")
    p.add_argument("host")
    _no_prompt(p)
    p.set_defaults(func=cmd_login)

    p = sub.add_parser("run", help="run a remote command as a session, output watched",
                       usage="tunnelctl run HOST [--name N] [--port auto|N] [--follow] "
                             "[--no-detach] [--no-prompt] -- COMMAND...")
    p.add_argument("host")
    p.add_argument("--name", help="session name (default: the command's name and a number)")
    p.add_argument("--port", metavar="auto|N",
                   help="a port for the command: 'auto' picks one free on the server; "
                        "replaces {port} in COMMAND, exported as PORT, and forwarded")
    p.add_argument("--follow", "-f", action="store_true",
                   help="stream the output until the session ends")
    p.add_argument("--no-detach", dest="detach", action="store_false",
                   help="run the command in the SSH connection itself: it ends when the "
                        "connection drops or the daemon stops (default: it runs detached on "
                        "the server and survives both)")
    _no_prompt(p)
    p.set_defaults(func=cmd_run, command=[])

    p = sub.add_parser("sessions", help="sessions with state and exit status")
    p.add_argument("--json", action="store_true")
    p.add_argument("--prune", action="store_true",
                   help="forget every ended session (and its logs)")
    p.set_defaults(func=cmd_sessions)

    p = sub.add_parser("forget", help="remove ended sessions from the list (and their logs)")
    p.add_argument("sessions", nargs="+", metavar="SESSION")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("logs", help="a session's output, or the daemon's log (--daemon)",
                       usage="tunnelctl logs SESSION [-f] [--all] | "
                             "tunnelctl logs --daemon [-f] [-n N] [--all]")
    p.add_argument("session", nargs="?")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep streaming (a session: until it ends; --daemon: until ^C)")
    p.add_argument("--all", action="store_true", help="the whole log, not only its tail")
    p.add_argument("--daemon", action="store_true",
                   help=f"the daemon's own log ({paths.log_file()}); works without a daemon")
    p.add_argument("-n", "--lines", type=int, default=50, metavar="N",
                   help="with --daemon: how many lines of its tail (default 50)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("kill", help="stop a session's remote process and all its children")
    p.add_argument("session")
    p.set_defaults(func=cmd_kill)

    p = sub.add_parser("open", help="open a remote URL locally through the tunnel")
    p.add_argument("host")
    p.add_argument("url")
    _no_prompt(p)
    p.set_defaults(func=cmd_open)

    p = sub.add_parser("watch", help="copy stdin to stdout, opening browser-open markers")
    p.add_argument("host", help="the host whose output this is")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("ssh", help="your own ssh in a terminal, output watched for markers",
                       usage="tunnelctl ssh HOST [ssh args...]")
    p.add_argument("host")
    p.add_argument("ssh_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_ssh)

    p = sub.add_parser("reload", help="re-read the config; unchanged forwards are not touched")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("events", help="stream state changes as lines until interrupted")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("service", help="start tunneld at login (systemd user unit / launchd "
                                       "agent)")
    p.add_argument("action", choices=["install", "uninstall", "status"])
    p.add_argument("--dry-run", action="store_true",
                   help="print the file and the commands; change nothing")
    p.add_argument("--manager", choices=["systemd", "launchd"],
                   help="service manager (default: this system's)")
    p.set_defaults(func=cmd_service)

    p = sub.add_parser("completion", help="print a shell completion script (bash or zsh)")
    p.add_argument("shell", nargs="?", choices=["bash", "zsh"])
    p.add_argument("--names", choices=["hosts", "sessions"], help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_completion)
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
    try:
        try:
            return _main(sys.argv[1:] if argv is None else argv)
        finally:
            sys.stdout.flush()   # here (also after --help), where a closed pipe is caught
    except BrokenPipeError:
        # the reader of our output went away (`tunnelctl list | head -1`): end quietly, as a
        # Unix tool does; stdout goes to /dev/null so that the exit's flush cannot fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE


def _main(argv: list[str]) -> int:
    argv, command = _split_command(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `add HOST 8090 -R … 8091`: argparse takes positionals only before the first option
        if getattr(args, "func", None) in (cmd_add, cmd_remove) and \
                not any(x.startswith("-") for x in extra):
            args.specs = list(args.specs) + extra
        elif getattr(args, "func", None) is cmd_run and command is None:
            print(f"tunnelctl run: put the command after --: tunnelctl run {args.host} -- "
                  f"{' '.join(extra)}", file=sys.stderr)
            return EXIT_USAGE
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if command is not None:
        args.command = command
    try:
        return int(args.func(args))
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
