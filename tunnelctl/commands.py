"""One function per verb: it turns the parsed arguments into its request to the daemon
(``client.call``) and the reply into what the person sees (``render``), and returns the exit
status.  A verb that runs mostly here imports its module (``service``, ``watch``…) when it
runs, so that the other verbs start without it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

from tunnelctl import cli, prompt, render
from tunnelctl.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from tunnelctl.client import Failed, Unreachable, call
from tunneld import paths

#: seconds to wait for a stopped daemon to exit
STOP_TIMEOUT = 20.0


def _interactive(a: argparse.Namespace) -> dict[str, Any]:
    """The request's ``interactive`` argument: set when a person can answer login prompts
    here (a controlling terminal, and no --no-prompt)."""
    return {"interactive": True} if not a.no_prompt and prompt.have_tty() else {}


def _forwards(a: argparse.Namespace) -> dict[str, Any]:
    """The forwards named on the command line of `add` / `remove`, as request arguments."""
    args: dict[str, Any] = {"specs": a.specs}
    if a.remote:
        args["remote"] = a.remote
    if a.socks:
        args["socks"] = a.socks
    return args


def cmd_add(a: argparse.Namespace) -> int:
    if not (a.specs or a.remote or a.socks):
        print("usage: tunnelctl add HOST [SPEC...] [-R SPEC]... [-D [BIND:]PORT]... "
              "[--public]\ntunnelctl add: error: name at least one forward: SPEC (e.g. 8090), "
              "-R SPEC (e.g. -R 9000:localhost:8000) or -D [BIND:]PORT (e.g. -D 1080)",
              file=sys.stderr)
        return EXIT_USAGE
    args = _forwards(a) | _interactive(a)
    if a.resume:
        if a.remote or a.socks or not a.specs:
            print("tunnelctl add: error: --resume makes local forwards resumable (e.g. "
                  "`tunnelctl add HOST 8090 --resume`), not -R or -D ones", file=sys.stderr)
            return EXIT_USAGE
        args["specs"] = [f"--resume {s}" for s in a.specs]
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
    r = call("remove", host=a.host, **_forwards(a))
    print(f"{a.host}: removed {', '.join(r['removed'])}")
    if r.get("note"):
        print(f"tunnelctl: note: {r['note']}", file=sys.stderr)
    return EXIT_OK


def cmd_list(a: argparse.Namespace) -> int:
    r = call("list")
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        render.print_list(r)
    return EXIT_OK


def cmd_status(a: argparse.Namespace) -> int:
    r = call("status", autostart=False)
    print(json.dumps(r, indent=1) if a.json else render.status_line(r))
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
    r = call("reconnect", host=a.host, **_interactive(a))
    failed = False
    for h in r["hosts"]:
        line = f"{h['name']}: {h['state']}"
        if h.get("last_error") and h["state"] != "connected":
            line += f": {h['last_error']}"
            failed = True
        print(line)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_login(a: argparse.Namespace) -> int:
    r = call("login", host=a.host, **_interactive(a))
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


def _session_exit(r: dict[str, Any]) -> int:
    """A followed session's end as an exit status, as ssh would give it."""
    if r.get("exit_status") is not None:
        return int(r["exit_status"])
    return 255 if r.get("state") in ("failed", "lost") else 128 + 15


def cmd_run(a: argparse.Namespace) -> int:
    """`run`, and with --follow the session's output (a `logs` request) until it ends."""
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
    if a.sock is not None:
        if a.sock != "auto":
            print(f"tunnelctl run: --sock takes 'auto', not {a.sock!r} (to forward a socket "
                  "that exists: tunnelctl add HOST LPORT:/path/app.sock)", file=sys.stderr)
            return EXIT_USAGE
        extra["sock"] = "auto"
    if a.job is not None:
        extra["job"] = a.job
    if a.scheduler is not None:
        extra["scheduler"] = a.scheduler
    if a.follow:
        extra["follow"] = True   # we see how it ends: no start check in the daemon
    extra |= _interactive(a)
    r = call("run", host=a.host, command=command, name=a.name, port=port, **extra)
    job = r.get("job")
    if job:
        where = f" (port {job['port']} on its node)" if job.get("port") else \
            " (its port is chosen on its node)" if a.port == "auto" else ""
        print(f"tunnelctl: session {r['name']}: {job['scheduler']} job {job['id']} submitted "
              f"on {a.host}, {render.job_phrase(r)}{where}; `tunnelctl sessions` shows it, "
              f"`tunnelctl kill {r['name']}` cancels it", file=sys.stderr)
    if a.follow:
        print(f"tunnelctl: session {r['name']} started on {a.host}", file=sys.stderr)
        if r.get("url"):
            print(f"tunnelctl: port {r['port']} is forwarded: {r['url']}", file=sys.stderr)
        end = call("logs", name=r["name"], follow=True)
        print(f"tunnelctl: session {r['name']}: {render.session_line(end)}", file=sys.stderr)
        return _session_exit(end)
    print(r["name"])
    if r.get("url"):
        print(f"tunnelctl: port {r['port']} is forwarded: {r['url']}", file=sys.stderr)
    if r.get("sock"):
        print(f"tunnelctl: socket {r['sock']}: forwarded once the command listens there "
              f"(`tunnelctl open {r['name']}`)", file=sys.stderr)
    return EXIT_OK


def cmd_sessions(a: argparse.Namespace) -> int:
    if a.prune:
        return _forget([], ended=True)
    r = call("sessions")
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        render.print_sessions(r["sessions"])
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


def cmd_events(a: argparse.Namespace) -> int:
    def show(msg: dict[str, Any]) -> None:
        if msg.get("subscribed"):
            print("tunnelctl: events: watching (^C ends)", file=sys.stderr, flush=True)
        ev = msg.get("event")
        if isinstance(ev, dict):
            print(json.dumps(ev) if a.json else render.format_event(ev), flush=True)
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
    commands = {name: (help_, sorted(o for act in p._actions for o in act.option_strings
                                     if act.help != argparse.SUPPRESS))
                for name, (help_, p) in cli.verbs(cli.build_parser()).items()}
    sys.stdout.write(completion.render(a.shell, commands))
    return EXIT_OK


def cmd_ssh_config(a: argparse.Namespace) -> int:
    from tunnelctl import sshinstall
    return sshinstall.run(a.install, a.uninstall, a.all_hosts, a.json)


def cmd_kill(a: argparse.Namespace) -> int:
    r = call("kill", name=a.session)
    # a batch job: what the scheduler's cancel said (`scancel 81723: job 81723 cancelled`)
    print(f"{r['name']}: {r['state']}" + (f" ({r['said']})" if r.get("job") else ""))
    return EXIT_OK


def cmd_open(a: argparse.Namespace) -> int:
    if a.request is not None:
        if a.target is not None or a.list:
            print("tunnelctl open: --request N takes no SESSION, HOST, URL or --list",
                  file=sys.stderr)
            return EXIT_USAGE
        r = call("open", request=a.request, **_interactive(a))
        print(f"request {a.request}: " + (f"opened {r['url']}" if r.get("opened") else
                                          f"not opened ({r.get('reason')}): {r['url']}"))
        return EXIT_OK
    if a.target is None:
        print("usage: tunnelctl open SESSION [--list] | tunnelctl open HOST URL | tunnelctl "
              "open --request N\ntunnelctl open: error: name a SESSION, a HOST and a URL, "
              "or --request N (`tunnelctl opens` lists the requests)", file=sys.stderr)
        return EXIT_USAGE
    if a.url is None:
        return _open_session(a.target, a.list)
    if a.list:
        print("tunnelctl open: --list takes a session name, not a host and a URL",
              file=sys.stderr)
        return EXIT_USAGE
    r = call("open", host=a.target, url=a.url, **_interactive(a))
    if r.get("opened"):
        print(f"opened {r['url']}")
    else:
        print(f"not opened again ({r.get('reason')}): {r['url']}")
    return EXIT_OK


def _open_session(name: str, list_only: bool) -> int:
    """`open SESSION`: its newest URL in the browser; `--list`: its URLs, newest last."""
    r = call("open", session=name, list=list_only)
    if list_only:
        if not r["urls"]:
            print(f"session {name} has printed no URL yet", file=sys.stderr)
        for u in r["urls"]:
            print(f"{u['local']}  (remote {u['remote']}, seen {render.ago(u['seen'])} ago)")
        if r.get("state") not in (None, "starting", "running", "disconnected"):
            print(f"session {name} has ended ({r['state']}): these forwards went with it",
                  file=sys.stderr)
        return EXIT_OK
    if r.get("opened"):
        print(f"opened {r['url']}")
    else:
        print(f"not opened ({r.get('reason')}): {r['url']}")
    return EXIT_OK


def cmd_opens(a: argparse.Namespace) -> int:
    r = call("opens")
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        render.print_opens(r)
    return EXIT_OK


def cmd_setup_remote(a: argparse.Namespace) -> int:
    args: dict[str, Any] = {"apply": a.apply} | _interactive(a)
    if a.shell_file is not None:
        args["shell_file"] = a.shell_file
    r = call("setup-remote", host=a.host, **args)
    render.print_setup(r)
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


#: each verb of ``cli.build_parser`` → its function (a test checks that every verb has one)
HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "add": cmd_add, "remove": cmd_remove, "list": cmd_list, "status": cmd_status,
    "stop": cmd_stop, "reconnect": cmd_reconnect, "login": cmd_login, "run": cmd_run,
    "sessions": cmd_sessions, "forget": cmd_forget, "logs": cmd_logs, "kill": cmd_kill,
    "open": cmd_open, "watch": cmd_watch, "ssh": cmd_ssh, "reload": cmd_reload,
    "events": cmd_events, "service": cmd_service, "completion": cmd_completion,
    "opens": cmd_opens, "setup-remote": cmd_setup_remote, "ssh-config": cmd_ssh_config,
}
