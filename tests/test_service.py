"""`tunnelctl service`, the unit and plist files, shell completion, `logs --daemon` and the
event formatting of tunnelctl: no daemon, no real service manager (fake systemctl on PATH)."""

from __future__ import annotations

import io
import json
import os
import plistlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tunnelctl import completion, daemonlog, service

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
UNIT_FILE = ROOT / "systemd" / "tunneld.service"
PLIST_FILE = ROOT / "launchd" / f"{service.LABEL}.plist"
HEAVY = ("asyncio", "asyncssh", "pydantic", "uvloop")


@pytest.fixture
def env(tmp_path):
    """A temp HOME, a socket nothing listens on, autostart off, a PATH whose systemctl /
    launchctl are the fakes in ``tmp_path/bin`` (none until a test writes one)."""
    sockdir = Path(tempfile.mkdtemp(prefix="tsvc-", dir="/tmp"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    e = dict(os.environ)
    for k in ("TUNNELD_CONFIG", "DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY"):
        e.pop(k, None)
    e.update(TUNNELD_SOCKET=str(sockdir / "nope.sock"), TUNNELD_NO_AUTOSTART="1",
             HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "home" / ".config"),
             XDG_STATE_HOME=str(tmp_path / "home" / ".local" / "state"),
             XDG_RUNTIME_DIR=str(sockdir),
             PATH=f"{bindir}:{os.path.dirname(sys.executable)}:/usr/bin:/bin")
    (tmp_path / "home").mkdir()
    try:
        yield e
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def ctl(env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tunnelctl", *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


def fake_tool(env, name: str, script: str) -> Path:
    """Put a fake ``name`` first on PATH; it logs its arguments to ``name.log``."""
    bindir = Path(env["PATH"].split(":")[0])
    log = bindir / f"{name}.log"
    path = bindir / name
    path.write_text("#!/bin/sh\n"
                    f'echo "$*" >> "{log}"\n' + script)
    path.chmod(0o755)
    return log


FAILING_SYSTEMCTL = 'echo "Failed to connect to bus: No medium found" >&2\nexit 1\n'
WORKING_SYSTEMCTL = """case "$*" in
  *is-active*) echo active ;;
  *show-environment*) echo "DISPLAY=:0"; echo "PATH=/usr/bin" ;;
  *status*) echo "tunneld.service - tunneld SSH tunnel daemon"
            echo "   Active: active (running)" ;;
esac
exit 0
"""


# -- the checked-in files ------------------------------------------------------------------------

def test_checked_in_unit_is_the_installers_rendering():
    assert UNIT_FILE.read_text() == service.example_unit(), \
        "systemd/tunneld.service is out of date: regenerate it from service.example_unit()"


def test_checked_in_plist_is_the_installers_rendering():
    assert PLIST_FILE.read_bytes() == service.example_plist(), \
        "the launchd plist is out of date: regenerate it from service.example_plist()"


def _unit_settings(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = v
    return out


def test_unit_contents():
    u = _unit_settings(UNIT_FILE.read_text())
    assert u["Type"] == "notify"
    assert u["Restart"] == "on-failure"
    assert u["ExecStart"] == service.EXAMPLE_UNIT_TUNNELD
    assert u["ExecReload"] == f"{service.EXAMPLE_UNIT_TUNNELCTL} reload"
    assert u["WantedBy"] == "default.target"
    assert "loginctl enable-linger" in UNIT_FILE.read_text()


def _verify(unit: Path, home: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (`apt-get install -y systemd`; .ci/run "
                    "installs it): the unit file could not be verified")
    runtime = Path(tempfile.mkdtemp(prefix="sdv-", dir="/tmp"))
    try:
        env = dict(os.environ, HOME=str(home), XDG_RUNTIME_DIR=str(runtime))
        r = subprocess.run([exe, "verify", "--user", "--man=no", str(unit)], env=env,
                           capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    if "Failed to initialize manager" in r.stderr or "Failed to lookup" in r.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {r.stderr.strip()}")
    return r


def _home_with_scripts(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    bindir = home / ".local" / "bin"
    bindir.mkdir(parents=True)
    for name in ("tunneld", "tunnelctl"):
        (bindir / name).write_text("#!/bin/sh\n")
        (bindir / name).chmod(0o755)
    return home


def test_systemd_analyze_verifies_the_units(tmp_path):
    home = _home_with_scripts(tmp_path)
    unitdir = tmp_path / "units"
    unitdir.mkdir()
    # the checked-in example (its %h paths exist in this HOME)
    example = unitdir / "tunneld.service"
    shutil.copy(UNIT_FILE, example)
    r = _verify(example, home)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    # what the installer writes for this environment's tunneld
    plan = service.install_plan("systemd")
    example.write_bytes(plan.content)
    r = _verify(example, home)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    # and the check is not vacuous: a broken unit is reported (verify exits 0 on warnings)
    example.write_text(UNIT_FILE.read_text().replace("Type=notify", "Type=notfy"))
    r = _verify(example, home)
    assert "notfy" in r.stderr


def test_plist_parses_and_matches_the_installer(env, monkeypatch):
    data = plistlib.loads(PLIST_FILE.read_bytes())
    assert PLIST_FILE.name == f"{data['Label']}.plist"
    assert data["Label"] == service.LABEL
    assert data["RunAtLoad"] is True
    assert data["KeepAlive"] == {"SuccessfulExit": False}
    logs = Path(service.EXAMPLE_MAC_HOME) / "Library" / "Logs" / "tunneld"
    assert Path(data["StandardErrorPath"]).parent == logs
    assert Path(data["StandardOutPath"]).parent == logs
    assert data["ProgramArguments"][0].startswith("/")
    # the installer's rendering: same label, absolute tunneld, the log dir of paths
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    plan = service.install_plan("launchd")
    mine = plistlib.loads(plan.content)
    assert mine["Label"] == data["Label"]
    assert plan.path.name == PLIST_FILE.name
    assert os.path.isabs(mine["ProgramArguments"][0])
    assert Path(mine["StandardErrorPath"]).parent == Path(service.paths.log_dir())
    assert str(Path(env["HOME"])) in mine["StandardErrorPath"]


# -- install / uninstall / status ----------------------------------------------------------------

def test_install_dry_run_prints_files_and_commands(env):
    env["DISPLAY"] = ":0"
    r = ctl(env, "service", "install", "--dry-run", "--manager", "systemd")
    assert r.returncode == 0, r.stderr
    tunneld = service.find_command("tunneld", "tunneld")
    assert os.path.isabs(tunneld[0])
    assert f"ExecStart={service.unit_command(tunneld)}" in r.stdout
    assert f"would write {env['XDG_CONFIG_HOME']}/systemd/user/tunneld.service" in r.stdout
    for cmd in ("systemctl --user daemon-reload",
                "systemctl --user import-environment DISPLAY",
                "systemctl --user enable --now tunneld.service"):
        assert cmd in r.stdout, r.stdout
    assert "enable-linger" in r.stdout
    assert not (Path(env["XDG_CONFIG_HOME"]) / "systemd").exists(), "dry run wrote a file"

    r = ctl(env, "service", "install", "--dry-run", "--manager", "launchd")
    assert r.returncode == 0, r.stderr
    assert f"launchctl bootstrap gui/{os.getuid()}" in r.stdout
    assert f"<string>{tunneld[0]}</string>" in r.stdout
    assert not (Path(env["HOME"]) / "Library").exists()

    r = ctl(env, "service", "uninstall", "--dry-run", "--manager", "systemd")
    assert r.returncode == 0 and "disable --now tunneld.service" in r.stdout


def test_install_without_a_service_manager_says_what_to_run(env):
    log = fake_tool(env, "systemctl", FAILING_SYSTEMCTL)
    r = ctl(env, "service", "install", "--manager", "systemd")
    assert r.returncode == 1, (r.stdout, r.stderr)
    unit = Path(env["XDG_CONFIG_HOME"]) / "systemd" / "user" / "tunneld.service"
    assert unit.exists()
    assert f"wrote {unit}" in r.stdout
    assert "systemctl --user enable --now tunneld.service" in r.stdout
    assert "not reachable" in r.stderr and "Failed to connect to bus" in r.stderr
    assert "Traceback" not in r.stderr
    assert "enable" not in log.read_text()  # only the probe ran
    r = ctl(env, "service", "uninstall", "--manager", "systemd")
    assert r.returncode == 1 and not unit.exists()


def test_install_status_uninstall_with_systemd(env):
    log = fake_tool(env, "systemctl", WORKING_SYSTEMCTL)
    env["WAYLAND_DISPLAY"] = "wayland-0"
    r = ctl(env, "service", "install")
    assert r.returncode == 0, (r.stdout, r.stderr)
    unit = Path(env["XDG_CONFIG_HOME"]) / "systemd" / "user" / "tunneld.service"
    assert "ExecStart=/" in unit.read_text()
    calls = log.read_text().splitlines()
    assert calls[1:] == ["--user daemon-reload", "--user import-environment WAYLAND_DISPLAY",
                         "--user enable --now tunneld.service", "--user is-active tunneld.service",
                         "--user show-environment"], calls
    assert "tunneld.service is active" in r.stdout

    r = ctl(env, "service", "status")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert f"installed: {unit}" in r.stdout
    assert "Active: active (running)" in r.stdout
    assert "daemon: not running" in r.stdout

    r = ctl(env, "service", "uninstall")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert not unit.exists()
    calls = log.read_text().splitlines()
    assert "--user disable --now tunneld.service" in calls
    assert calls[-1] == "--user daemon-reload"
    r = ctl(env, "service", "uninstall")
    assert r.returncode == 0 and "not installed" in r.stdout


def test_install_failure_of_a_command_is_reported(env):
    fake_tool(env, "systemctl", 'case "$*" in *enable*) echo "Unit file is masked." >&2; '
                                'exit 1 ;; esac\nexit 0\n')
    r = ctl(env, "service", "install", "--manager", "systemd")
    assert r.returncode == 1
    assert "enable --now tunneld.service` failed" in r.stderr and "masked" in r.stderr


@pytest.mark.parametrize("argv", [["service", "install", "--dry-run"], ["completion", "bash"],
                                  ["logs", "--daemon"], ["reload"], ["events"],
                                  ["completion", "--names", "hosts"]])
def test_new_verbs_import_nothing_heavy(env, argv):
    probe = ("import json, sys\nimport tunnelctl.__main__ as m\nrc = m.main(sys.argv[1:])\n"
             f"print(json.dumps({{'rc': rc, 'loaded': [n for n in {HEAVY!r} "
             "if n in sys.modules]}))")
    r = subprocess.run([sys.executable, "-c", probe, *argv], env=env, capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [], f"tunnelctl {' '.join(argv)} imported {out['loaded']}"


def test_reload_and_events_without_daemon_exit_3(env):
    for verb in ("reload", "events"):
        r = ctl(env, verb)
        assert r.returncode == 3 and "not running" in r.stderr, (verb, r.stderr)


# -- completion ----------------------------------------------------------------------------------

SSH_CONFIG = """\
Host alpha beta *.wild
    HostName a.example.org
Host=gamma
Host !neg delta?
Include conf.d/*
"""


def _ssh_home(env) -> None:
    ssh = Path(env["HOME"]) / ".ssh"
    (ssh / "conf.d").mkdir(parents=True)
    (ssh / "config").write_text(SSH_CONFIG)
    (ssh / "conf.d" / "work").write_text("Host epsilon\n  User me\nInclude ~/.ssh/config\n")


def test_ssh_config_hosts(env, monkeypatch):
    _ssh_home(env)
    monkeypatch.setenv("HOME", env["HOME"])
    assert completion.ssh_config_hosts() == ["alpha", "beta", "gamma", "epsilon"]


def _complete(env, line: str) -> list[str]:
    """What bash completes for ``line`` (the cursor at its end)."""
    script = ctl(env, "completion", "bash").stdout
    words = line.split(" ")
    py = sys.executable
    prog = f"""
tunnelctl() {{ "{py}" -m tunnelctl "$@"; }}
{script}
COMP_WORDS=({" ".join(repr(w) for w in words)})
COMP_CWORD={len(words) - 1}
_tunnelctl
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    r = subprocess.run(["bash", "-c", prog], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    return [x for x in r.stdout.splitlines() if x]


def test_bash_completion(env):
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    _ssh_home(env)
    script = ctl(env, "completion", "bash").stdout
    for cmd in ("add", "remove", "list", "reload", "events", "service", "completion", "logs"):
        assert cmd in script
    assert "complete -F _tunnelctl tunnelctl" in script
    assert set(_complete(env, "tunnelctl re")) == {"remove", "reconnect", "reload"}
    assert _complete(env, "tunnelctl add ") == ["alpha", "beta", "gamma", "epsilon"]
    assert _complete(env, "tunnelctl add al") == ["alpha"]
    assert _complete(env, "tunnelctl add alpha ") == []  # a spec, not a host
    assert _complete(env, "tunnelctl service ") == ["install", "uninstall", "status"]
    assert "--daemon" in _complete(env, "tunnelctl logs --")
    assert _complete(env, "tunnelctl kill ") == []  # no daemon, no sessions


def test_zsh_completion(env):
    script = ctl(env, "completion", "zsh").stdout
    assert script.startswith("#compdef tunnelctl")
    for cmd in ("'add:", "'reload:", "'events:", "'service:", "'completion:"):
        assert cmd in script
    assert "compdef _tunnelctl tunnelctl" in script
    assert "completion --names hosts" in script and "completion --names sessions" in script
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip("zsh is not installed: the script's syntax was not checked")
    r = subprocess.run([zsh, "-n", "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    # drive it with the completion system's builtins stubbed out
    _ssh_home(env)
    prog = f"""
tunnelctl() {{ "{sys.executable}" -m tunnelctl "$@"; }}
compdef() {{ :; }}
_describe() {{ print -r -- "DESCRIBE ${{(j: :)${{(P)${{@[-1]}}}}}}"; }}
compadd() {{ print -r -- "COMPADD $*"; }}
{script}
words=(tunnelctl ""); CURRENT=2; PREFIX=""; _tunnelctl
words=(tunnelctl add ""); CURRENT=3; PREFIX=""; _tunnelctl
words=(tunnelctl add alpha ""); CURRENT=4; PREFIX=""; _tunnelctl
words=(tunnelctl logs --); CURRENT=3; PREFIX="--"; _tunnelctl
words=(tunnelctl service ""); CURRENT=3; PREFIX=""; _tunnelctl
"""
    r = subprocess.run([zsh, "-f", "-c", prog], env=env, capture_output=True, text=True,
                       timeout=30)
    out = r.stdout.splitlines()
    assert out[0].startswith("DESCRIBE ") and "reload:re-read" in out[0], r.stdout + r.stderr
    assert out[1:] == ["COMPADD -- alpha beta gamma epsilon",
                       "COMPADD -- --all --daemon --follow --help --lines -f -h -n",
                       "COMPADD -- install uninstall status"], r.stdout + r.stderr


def test_completion_usage(env):
    assert ctl(env, "completion").returncode == 2
    assert ctl(env, "completion", "fish").returncode == 2


# -- logs --daemon -------------------------------------------------------------------------------

def test_daemon_log_tail(tmp_path):
    log = tmp_path / "tunneld.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    with open(log, "rb") as f:
        assert daemonlog.tail(f, 3) == b"line 97\nline 98\nline 99\n"
    with open(log, "rb") as f:
        assert daemonlog.tail(f, None).count(b"\n") == 100
    with open(log, "rb") as f:
        assert daemonlog.tail(f, 0) == b""


def test_daemon_log_follow_survives_rotation(tmp_path):
    log = tmp_path / "tunneld.log"
    log.write_bytes(b"old\n")
    out = io.BytesIO()
    stop = threading.Event()
    f = open(log, "rb")
    f.seek(0, io.SEEK_END)
    t = threading.Thread(target=daemonlog.follow, args=(log, out, f),
                         kwargs={"keep_going": lambda: not stop.is_set(), "poll": 0.01})
    t.start()
    try:
        with open(log, "ab") as w:
            w.write(b"one\n")
        time.sleep(0.1)
        with open(log, "ab") as w:
            w.write(b"two\n")  # written just before the rotation
        log.rename(log.with_name("tunneld.log.1"))  # what RotatingFileHandler does
        log.write_bytes(b"three\n")
        deadline = time.monotonic() + 5
        while b"three" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        t.join(5)
    assert out.getvalue() == b"one\ntwo\nthree\n"


def test_logs_daemon_without_a_log_file(env):
    r = ctl(env, "logs", "--daemon")
    assert r.returncode == 1 and "no daemon log" in r.stderr
    r = ctl(env, "logs", "--daemon", "somesession")
    assert r.returncode == 2


# -- events, as printed ---------------------------------------------------------------------------

def test_format_event():
    from tunnelctl.render import format_event
    t = "2026-11-21T21:00:03.120Z"
    assert format_event({"time": t, "kind": "host", "host": "barhal", "old": "connecting",
                         "new": "connected", "error": None}).endswith(
        " barhal: connecting -> connected")
    line = format_event({"time": t, "kind": "host", "host": "barhal", "old": "connected",
                         "new": "backoff", "error": "connection lost"})
    assert line.endswith("barhal: connected -> backoff (connection lost)")
    assert line[:8].count(":") == 2  # HH:MM:SS first
    assert format_event({"time": t, "kind": "forward", "host": "barhal", "spec": "8090",
                         "event": "added", "origin": "config"}).endswith(
        "barhal: forward 8090 added (config)")
    assert format_event({"time": t, "kind": "forward", "host": "barhal", "spec": "8090",
                         "event": "state", "old": "waiting", "new": "listening"}).endswith(
        "barhal: forward 8090: waiting -> listening")
    assert format_event({"time": t, "kind": "session", "host": "barhal", "name": "jl-1",
                         "event": "ended", "state": "exited", "exit_status": 0}).endswith(
        "barhal: session jl-1 ended (exited, exit status 0)")
    assert format_event({"time": t, "kind": "open", "host": "barhal",
                         "url": "http://127.0.0.1:8888/", "source": "session jl-1"}).endswith(
        "barhal: opened http://127.0.0.1:8888/ (session jl-1)")
    assert format_event({"time": t, "kind": "daemon", "event": "stopping"}).endswith(
        "tunneld: stopping")
    assert "future" in format_event({"time": t, "kind": "future", "x": 1})
