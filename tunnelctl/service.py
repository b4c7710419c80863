"""`tunnelctl service install|uninstall|status`: tunneld started at login by systemd (a user
unit, Linux) or launchd (a LaunchAgent, macOS).  Standard library and tunneld.paths only.

The unit and the plist are rendered here for the tunneld next to this tunnelctl (the venv's
absolute path).  ``systemd/tunneld.service`` and ``launchd/org.tunneld.tunneld.plist`` in the
source tree are the same renderings for example paths (``example_unit()``,
``example_plist()``; a test keeps them in sync).
"""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunneld import paths
from tunneld.desktop import GRAPHICAL_ENV

#: the launchd label, and the plist's file name without ".plist"
LABEL = "org.tunneld.tunneld"
UNIT_NAME = "tunneld.service"
#: seconds allowed for one systemctl / launchctl command
COMMAND_TIMEOUT = 30.0
#: PATH of the LaunchAgent (launchd's default is /usr/bin:/bin:/usr/sbin:/sbin): a
#: ProxyCommand may need a tool from Homebrew
LAUNCHD_PATH = "/opt/homebrew/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
#: example paths of the checked-in files: where pipx installs the scripts
EXAMPLE_UNIT_TUNNELD = "%h/.local/bin/tunneld"
EXAMPLE_UNIT_TUNNELCTL = "%h/.local/bin/tunnelctl"
EXAMPLE_MAC_HOME = "/Users/USER"

UNIT_TEMPLATE = """\
# tunneld, the SSH tunnel daemon, as a systemd user service.
#
# `tunnelctl service install` writes this file to ~/.config/systemd/user/{unit_name} with
# the absolute paths of your tunneld and tunnelctl.{example_note}
# By hand: put it there, then `systemctl --user daemon-reload` and
# `systemctl --user enable --now tunneld`.  Logs: `journalctl --user -u tunneld` or
# `tunnelctl logs --daemon`.  On a server with no desktop login, `loginctl enable-linger
# $USER` keeps it running while you are logged out.
[Unit]
Description=tunneld SSH tunnel daemon

[Service]
# the daemon says READY=1 once its control socket listens, STOPPING=1 when it stops, and
# RELOADING=1 ... READY=1 around a reload
Type=notify
ExecStart={exec_start}
# synchronous: a config with errors makes `systemctl --user reload tunneld` fail with the
# error, and the running config stays (SIGHUP does the same, without the answer)
ExecReload={exec_reload} reload
Restart=on-failure
RestartSec=5
# open connections get stop_timeout (10 s) to finish and sessions 15 s to end
TimeoutStopSec=45
# stop the daemon only: a browser it started stays open
KillMode=process

[Install]
WantedBy=default.target
"""

EXAMPLE_NOTE = """
# This copy names {tunneld}, where pipx puts it (%h is your home
# directory): change ExecStart and ExecReload if yours is elsewhere.""".format(
    tunneld=EXAMPLE_UNIT_TUNNELD)

PLIST_COMMENT = """\
<!-- tunneld, the SSH tunnel daemon, as a launchd agent.
     `tunnelctl service install` writes this file to ~/Library/LaunchAgents/{label}.plist
     with the absolute path of your tunneld and runs
     `launchctl bootstrap gui/$UID` on it.{example_note}
     tunneld logs to {log_dir}/tunneld.log (rotated; see `tunnelctl logs`);
     launchd.log gets what it says before it is ready (e.g. a config error). -->
"""

EXAMPLE_PLIST_NOTE = """
     This copy is an example: replace {home} with your home directory and the
     tunneld path with yours (`command -v tunneld`).""".format(home=EXAMPLE_MAC_HOME)


# -- rendering ---------------------------------------------------------------------------------

def _is_exe(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def find_command(name: str, module: str) -> list[str]:
    """argv that runs ``name``: the script next to this Python (the venv's bin directory),
    else the one on PATH, else ``python -m module``.  Always absolute."""
    beside = Path(sys.executable).parent / name
    if _is_exe(beside):
        return [os.path.abspath(beside)]
    found = shutil.which(name)
    if found:
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", module]


def unit_command(argv: list[str]) -> str:
    """argv as a systemd command line: specifiers and variables escaped, quoted if needed."""
    out = []
    for a in argv:
        a = a.replace("%", "%%").replace("$", "$$")
        if any(c in a for c in " \t\"'\\;"):
            a = '"' + a.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(a)
    return " ".join(out)


def render_unit(exec_start: str, exec_reload: str, example: bool = False) -> str:
    """The user unit for the given (systemd-formatted) tunneld and tunnelctl commands."""
    return UNIT_TEMPLATE.format(unit_name=UNIT_NAME, exec_start=exec_start,
                                exec_reload=exec_reload,
                                example_note=EXAMPLE_NOTE if example else "")


def render_plist(tunneld: list[str], log_dir: Path, example: bool = False) -> bytes:
    """The LaunchAgent for the given tunneld argv, logging under ``log_dir``."""
    data: dict[str, Any] = {
        "Label": LABEL,
        # --detach-stderr: once ready, the daemon logs to its rotated file only; launchd's
        # file (never rotated) keeps start-up errors
        "ProgramArguments": [*tunneld, "--detach-stderr"],
        "RunAtLoad": True,
        # restart after a crash or an error exit, not after `tunnelctl stop` (exit 0)
        "KeepAlive": {"SuccessfulExit": False},
        "StandardOutPath": str(log_dir / "launchd.log"),
        "StandardErrorPath": str(log_dir / "launchd.log"),
        "EnvironmentVariables": {"PATH": LAUNCHD_PATH},
        "ProcessType": "Interactive",
    }
    text = plistlib.dumps(data, sort_keys=False).decode()
    head, sep, rest = text.partition("<plist ")
    shown_dir = str(log_dir).replace("--", "-\u2010")  # "--" may not appear in a comment
    comment = PLIST_COMMENT.format(label=LABEL, log_dir=shown_dir,
                                   example_note=EXAMPLE_PLIST_NOTE if example else "")
    return (head + comment + sep + rest).encode()


def example_unit() -> str:
    """What systemd/tunneld.service in the source tree holds."""
    return render_unit(EXAMPLE_UNIT_TUNNELD, EXAMPLE_UNIT_TUNNELCTL, example=True)


def example_plist() -> bytes:
    """What launchd/org.tunneld.tunneld.plist in the source tree holds."""
    home = Path(EXAMPLE_MAC_HOME)
    return render_plist([str(home / ".local/bin/tunneld")], home / "Library/Logs/tunneld",
                        example=True)


# -- plans: what install / uninstall write and run -------------------------------------------

@dataclass
class Plan:
    manager: str                         # "systemd" or "launchd"
    path: Path                           # the unit or plist
    content: bytes = b""                 # what install writes there
    #: commands run in order; (argv, may_fail): a failing may_fail command is reported only
    commands: list[tuple[list[str], bool]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def default_manager() -> str:
    return "launchd" if sys.platform == "darwin" else "systemd"


def unit_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user" / UNIT_NAME


def plist_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def _launchd_domain() -> str:
    return f"gui/{os.getuid()}"


def install_plan(manager: str) -> Plan:
    tunneld = find_command("tunneld", "tunneld")
    if manager == "systemd":
        tunnelctl = find_command("tunnelctl", "tunnelctl")
        plan = Plan("systemd", unit_path(), render_unit(unit_command(tunneld),
                                                        unit_command(tunnelctl)).encode())
        plan.commands.append((["systemctl", "--user", "daemon-reload"], False))
        present = [k for k in GRAPHICAL_ENV if os.environ.get(k)]
        if present:
            plan.commands.append((["systemctl", "--user", "import-environment", *present],
                                  False))
        else:
            plan.notes.append(
                "no DISPLAY or WAYLAND_DISPLAY in this shell, so none was imported: the "
                "daemon finds them in systemd's user manager when it opens a browser, which "
                "most desktops fill at login; if yours does not, run `systemctl --user "
                "import-environment DISPLAY WAYLAND_DISPLAY XAUTHORITY` in the desktop "
                "session")
        plan.commands.append((["systemctl", "--user", "enable", "--now", UNIT_NAME], False))
        plan.notes.append("on a server with no desktop login, `loginctl enable-linger "
                          f"{_user()}` keeps tunneld running while you are logged out")
        return plan
    log_dir = paths.log_dir()
    plan = Plan("launchd", plist_path(), render_plist(tunneld, log_dir))
    target = f"{_launchd_domain()}/{LABEL}"
    plan.commands += [(["launchctl", "bootout", target], True),
                      (["launchctl", "enable", target], False),
                      (["launchctl", "bootstrap", _launchd_domain(), str(plan.path)], False)]
    return plan


def uninstall_plan(manager: str) -> Plan:
    if manager == "systemd":
        plan = Plan("systemd", unit_path())
        plan.commands += [(["systemctl", "--user", "disable", "--now", UNIT_NAME], True),
                          (["systemctl", "--user", "daemon-reload"], False)]
        return plan
    plan = Plan("launchd", plist_path())
    plan.commands.append((["launchctl", "bootout", f"{_launchd_domain()}/{LABEL}"], True))
    return plan


def _user() -> str:
    return os.environ.get("USER") or os.environ.get("LOGNAME") or "$USER"


def _shown(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


# -- running them ------------------------------------------------------------------------------

def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT)
    except FileNotFoundError:
        return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "",
                                           f"no answer within {COMMAND_TIMEOUT:g}s")


def manager_problem(manager: str) -> str | None:
    """Why the service manager cannot be used here (None: it can)."""
    if manager == "launchd":
        if sys.platform != "darwin" or not shutil.which("launchctl"):
            return "launchd is macOS's; this is not macOS"
        return None
    if not shutil.which("systemctl"):
        return "systemctl is not installed (is this a systemd system?)"
    r = _run(["systemctl", "--user", "show-environment"])
    if r.returncode != 0:
        why = (r.stderr or r.stdout).strip().splitlines()
        return ("systemd's user manager is not reachable (`systemctl --user`: "
                f"{why[0] if why else 'exit status %d' % r.returncode}); this happens in "
                "containers and in sessions without a login (try `loginctl enable-linger "
                f"{_user()}` and log in again)")
    return None


def _print_file(plan: Plan, verb: str) -> None:
    print(f"{verb} {plan.path}:")
    text = plan.content.decode()
    print("    " + text.rstrip("\n").replace("\n", "\n    "))


def _print_commands(plan: Plan, intro: str) -> None:
    print(intro)
    for argv, _ in plan.commands:
        print(f"    {_shown(argv)}")


def install(manager: str, dry_run: bool, stop_running: Callable[[], str | None]) -> int:
    plan = install_plan(manager)
    if dry_run:
        _print_file(plan, "would write")
        _print_commands(plan, "would run:")
        for note in plan.notes:
            print(f"note: {note}")
        return 0
    problem = manager_problem(manager)
    plan.path.parent.mkdir(parents=True, exist_ok=True)
    if manager == "launchd":  # launchd does not create the directory of its log file
        paths.ensure_private_dir(paths.log_dir())
    tmp = plan.path.with_name(plan.path.name + ".tmp")
    tmp.write_bytes(plan.content)
    os.replace(tmp, plan.path)
    if problem is not None:
        _print_file(plan, "wrote")
        _print_commands(plan, "run these where the service manager is available:")
        print(f"tunnelctl: {problem}; the {'unit' if manager == 'systemd' else 'agent'} was "
              "written but not enabled", file=sys.stderr)
        return 1
    print(f"wrote {plan.path} (runs {_exec_of(plan)})")
    said = stop_running()
    if said:
        print(said)
    for argv, may_fail in plan.commands:
        print(f"$ {_shown(argv)}")
        r = _run(argv)
        if r.returncode != 0 and not may_fail:
            detail = (r.stderr or r.stdout).strip()
            print(f"tunnelctl: `{_shown(argv)}` failed (exit status {r.returncode})"
                  + (f": {detail}" if detail else ""), file=sys.stderr)
            return 1
    rc = _check_running(manager)
    for note in plan.notes:
        print(f"note: {note}")
    return rc


def _exec_of(plan: Plan) -> str:
    if plan.manager == "systemd":
        for line in plan.content.decode().splitlines():
            if line.startswith("ExecStart="):
                return line.partition("=")[2]
        return "?"
    return _shown(plistlib.loads(plan.content)["ProgramArguments"])


def _check_running(manager: str) -> int:
    if manager == "systemd":
        r = _run(["systemctl", "--user", "is-active", UNIT_NAME])
        state = r.stdout.strip() or "unknown"
        if state != "active":
            print(f"tunnelctl: {UNIT_NAME} is {state}; see `journalctl --user -u tunneld`",
                  file=sys.stderr)
            return 1
        print(f"{UNIT_NAME} is active; it starts at login")
        env = _run(["systemctl", "--user", "show-environment"]).stdout
        if not any(line.split("=", 1)[0] in ("DISPLAY", "WAYLAND_DISPLAY")
                   for line in env.splitlines()):
            print("note: systemd's user manager has no DISPLAY or WAYLAND_DISPLAY yet, so "
                  "tunneld cannot open a browser until the desktop session exports them "
                  "(`systemctl --user import-environment DISPLAY WAYLAND_DISPLAY XAUTHORITY`)")
        return 0
    r = _run(["launchctl", "print", f"{_launchd_domain()}/{LABEL}"])
    if r.returncode != 0:
        print(f"tunnelctl: launchd does not know {LABEL} after bootstrap: "
              f"{(r.stderr or r.stdout).strip()}", file=sys.stderr)
        return 1
    print(f"{LABEL} is loaded; it starts at login")
    return 0


def uninstall(manager: str, dry_run: bool) -> int:
    plan = uninstall_plan(manager)
    if dry_run:
        _print_commands(plan, "would run:")
        print(f"would remove {plan.path}")
        return 0
    if not plan.path.exists():
        print(f"not installed ({plan.path} does not exist)")
        return 0
    problem = manager_problem(manager)
    if problem is not None:
        plan.path.unlink()
        print(f"removed {plan.path}")
        _print_commands(plan, "run these where the service manager is available:")
        print(f"tunnelctl: {problem}", file=sys.stderr)
        return 1
    failed = False
    for i, (argv, may_fail) in enumerate(plan.commands):
        if i == len(plan.commands) - 1 and manager == "systemd":
            plan.path.unlink()  # before daemon-reload, so systemd forgets the unit
            print(f"removed {plan.path}")
        print(f"$ {_shown(argv)}")
        r = _run(argv)
        if r.returncode != 0 and not may_fail:
            print(f"tunnelctl: `{_shown(argv)}` failed (exit status {r.returncode}): "
                  f"{(r.stderr or r.stdout).strip()}", file=sys.stderr)
            failed = True
    if plan.path.exists():
        plan.path.unlink()
        print(f"removed {plan.path}")
    print("tunneld no longer starts at login; your forwards stay saved")
    return 1 if failed else 0


def status(manager: str, daemon_status: Callable[[], dict[str, Any] | None]) -> int:
    path = unit_path() if manager == "systemd" else plist_path()
    if path.exists():
        print(f"installed: {path}")
    else:
        print(f"not installed ({path} does not exist); `tunnelctl service install` installs "
              "it")
    rc = 1
    problem = manager_problem(manager)
    if problem is not None:
        print(f"service manager: {problem}")
    elif manager == "systemd":
        r = _run(["systemctl", "--user", "status", "--no-pager", "--lines=5", UNIT_NAME])
        print((r.stdout or r.stderr).rstrip())
        rc = 0 if _run(["systemctl", "--user", "is-active", UNIT_NAME]).stdout.strip() == \
            "active" else 1
    else:
        r = _run(["launchctl", "print", f"{_launchd_domain()}/{LABEL}"])
        keep = [line for line in r.stdout.splitlines()
                if line.strip().split(" = ")[0] in ("state", "pid", "last exit code",
                                                    "program", "runs")]
        print("\n".join(keep) if r.returncode == 0 else
              f"launchd: {(r.stderr or r.stdout).strip()}")
        rc = 0 if r.returncode == 0 and any("state = running" in x for x in keep) else 1
    st = daemon_status()
    if st is None:
        print("daemon: not running")
    else:
        print(f"daemon: tunneld {st['version']} running, pid {st['pid']}, up "
              f"{st['uptime']:.0f}s")
    return rc
