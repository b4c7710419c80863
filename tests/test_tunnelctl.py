"""tunnelctl without a daemon: the thin-client import rule, usage errors, --version.

Every run is a subprocess with its own socket path that nothing listens on and autostart
disabled, so no test here can reach or start a real daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tunneld import __version__, wire

pytestmark = pytest.mark.timeout(60)

HEAVY = ("asyncio", "asyncssh", "pydantic", "uvloop")


@pytest.fixture
def env(tmp_path):
    """An environment whose socket does not exist and where autostart is off."""
    sockdir = Path(tempfile.mkdtemp(prefix="tctl-", dir="/tmp"))
    e = dict(os.environ)
    e.update(TUNNELD_SOCKET=str(sockdir / "nope.sock"), TUNNELD_NO_AUTOSTART="1",
             HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"),
             XDG_STATE_HOME=str(tmp_path / "state"), XDG_RUNTIME_DIR=str(sockdir))
    e.pop("TUNNELD_CONFIG", None)
    try:
        yield e
    finally:
        for p in sockdir.iterdir():
            p.unlink()
        sockdir.rmdir()


def ctl(env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tunnelctl", *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


PROBE = """
import json, sys
import tunnelctl.__main__ as m
rc = m.main(sys.argv[1:])
print(json.dumps({"rc": rc, "loaded": [n for n in %r if n in sys.modules]}))
""" % (HEAVY,)


#: values for the positional arguments of a verb, by their dest (any other: "x"); a choice
#: takes its first value unless named here
SAMPLES = {"host": "barhal", "specs": "8090", "url": "http://127.0.0.1:8090/",
           "action": "status"}


def _verb_argv(verb: str, parser) -> list[str]:
    """A command line that runs ``verb`` (rather than failing on its usage)."""
    argv = [verb]
    for act in parser._actions:
        if act.option_strings or act.nargs == argparse.REMAINDER:
            continue
        argv.append(SAMPLES.get(act.dest) or (act.choices[0] if act.choices else "x"))
    return argv + (["--", "true"] if verb == "run" else [])


def _every_verb() -> list:
    from tunnelctl import cli
    return [pytest.param(_verb_argv(verb, p), id=verb)
            for verb, (_, p) in cli.verbs(cli.build_parser()).items()]


@pytest.mark.parametrize("argv", _every_verb())
def test_thin_client_imports_nothing_heavy(env, tmp_path, argv):
    # no ssh or systemctl on PATH: `ssh` and `service` end at once, touching nothing here
    empty = tmp_path / "empty-path"
    empty.mkdir()
    env["PATH"] = str(empty)
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=30)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [], f"tunnelctl {' '.join(argv)} imported {out['loaded']}"
    assert out["rc"] != 2, f"{argv} is a usage error: {r.stderr}"  # the verb itself ran
    assert "Traceback" not in r.stderr, r.stderr


def test_without_a_daemon_verbs_exit_3_but_stop(env):
    """Those that need the daemon exit 3; stopping a daemon that is not running is fine."""
    for argv, expected in ((["status"], 3), (["list"], 3), (["add", "barhal", "8090"], 3),
                           (["stop"], 0)):
        r = subprocess.run([sys.executable, "-c", PROBE, *argv], env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        assert json.loads(r.stdout.strip().splitlines()[-1])["rc"] == expected, r.stderr


def test_status_without_daemon_exits_3(env):
    r = ctl(env, "status")
    assert r.returncode == 3
    assert env["TUNNELD_SOCKET"] in r.stderr
    assert "not running" in r.stderr
    assert r.stdout == ""


def test_no_autostart_is_explained(env):
    r = ctl(env, "list")
    assert r.returncode == 3
    assert "TUNNELD_NO_AUTOSTART" in r.stderr
    assert env["TUNNELD_SOCKET"] in r.stderr


def test_stop_without_daemon(env):
    r = ctl(env, "stop")
    assert r.returncode == 0
    assert "not running" in r.stdout + r.stderr


def test_socket_path_that_is_not_a_socket(env):
    Path(env["TUNNELD_SOCKET"]).write_text("not a socket")
    r = ctl(env, "status")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("argv", [
    pytest.param([], id="no-command"),
    pytest.param(["add"], id="add-no-host"),
    pytest.param(["add", "barhal"], id="add-no-spec"),
    pytest.param(["frobnicate"], id="unknown-command"),
    pytest.param(["list", "--bogus"], id="unknown-option"),
    pytest.param(["remove"], id="remove-no-host"),
    pytest.param(["status", "extra"], id="extra-argument"),
])
def test_usage_errors_exit_2(env, argv):
    r = ctl(env, *argv)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "usage:" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_command_names_the_known_ones(env):
    r = ctl(env, "frobnicate")
    assert r.returncode == 2
    assert "frobnicate" in r.stderr
    for cmd in ("add", "remove", "list", "status", "stop"):
        assert cmd in r.stderr


def test_version(env):
    r = ctl(env, "--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"tunnelctl {__version__}"


def test_help_lists_commands(env):
    r = ctl(env, "--help")
    assert r.returncode == 0
    for cmd in ("add", "remove", "list", "status", "stop", "reconnect"):
        assert cmd in r.stdout


def test_cli_verbs_are_wire_commands():
    """House rule 8: CLI verbs = wire commands."""
    from tunnelctl import cli, commands

    verbs = set(cli.verbs(cli.build_parser()))
    # verbs that run in the client itself say which wire command they use
    assert verbs - set(cli.LOCAL_VERBS) <= wire.COMMANDS
    assert set(cli.LOCAL_VERBS.values()) <= wire.COMMANDS
    assert set(cli.LOCAL_VERBS) <= verbs
    assert set(commands.HANDLERS) == verbs  # every verb runs a function


def test_session_line_names_how_a_session_ended():
    from tunnelctl.render import session_line
    assert session_line({"state": "exited", "exit_status": 3}) == "exit status 3"
    # `tunnelctl kill`: the shell reports 143 (SIGTERM); the user asked for a kill
    assert session_line({"state": "killed", "exit_status": 143}) == "killed"
    assert session_line({"state": "exited", "exit_signal": "KILL"}) == "killed by signal KILL"
    assert session_line({"state": "failed", "error": "host is needs-auth"}) == \
        "host is needs-auth"


def test_run_without_the_separator_says_where_the_command_goes(env):
    r = ctl(env, "run", "hpc", "jupyter", "lab", "--no-browser")
    assert r.returncode == 2
    assert "put the command after --: tunnelctl run hpc -- jupyter lab --no-browser" in r.stderr


def test_a_table_is_cut_to_the_terminal_width(capsys):
    from tunnelctl.render import table
    rows = [("NAME", "EXIT", "COMMAND"), ("a", "x" * 200, "y" * 200), ("bb", "ok", "short")]
    table(rows, squeeze=(2, 1), width=60)
    out = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 60 for line in out), out
    assert out[1].startswith("a   ") and out[1].endswith("…")
    assert out[2].split() == ["bb", "ok", "short"]
    table(rows[:1] + rows[2:], squeeze=(2, 1), width=60)   # fits: untouched
    assert capsys.readouterr().out.splitlines()[1].split() == ["bb", "ok", "short"]


def test_a_table_into_a_pipe_is_whole_unless_columns_says(capsys, monkeypatch):
    """`tunnelctl sessions | grep …` (stdout is no terminal here): nothing cut, so a
    command can be pasted back; COLUMNS still cuts."""
    from tunnelctl.render import table
    rows = [("NAME", "COMMAND"), ("a", "y" * 300)]
    monkeypatch.delenv("COLUMNS", raising=False)
    table(rows, squeeze=(1,))
    assert capsys.readouterr().out.splitlines()[1].endswith("y" * 300)
    monkeypatch.setenv("COLUMNS", "60")
    table(rows, squeeze=(1,))
    assert capsys.readouterr().out.splitlines()[1].endswith("…")


#: Europe/Berlin's rule spelled out (CET; CEST from the last Sunday of March to the last one of
#: October), so that the test needs no tzdata
BERLIN = "CET-1CEST,M3.5.0,M10.5.0/3"
AGO = """
import calendar, sys, time
from tunnelctl import render
then = calendar.timegm(time.strptime(sys.argv[1], "%Y-%m-%dT%H:%M:%SZ"))
time.time = lambda: then + 600
print(render.ago(sys.argv[1]))
"""


@pytest.mark.parametrize("when", [pytest.param("2026-07-21T21:00:00Z", id="summer"),
                                  pytest.param("2026-11-21T21:00:00Z", id="winter")])
def test_an_age_is_right_under_daylight_saving_time(env, when):
    """A wire time is UTC: ten minutes ago is 10m in any zone, in any season."""
    env["TZ"] = BERLIN
    r = subprocess.run([sys.executable, "-c", AGO, when], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.stdout.strip() == "10m", r.stderr


def test_help_into_a_closed_pipe_is_quiet(env):
    r = subprocess.run(["sh", "-c", f"{sys.executable} -m tunnelctl --help | true"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


# -- the request loop, against a socket pair standing in for the daemon --------------------------

def _daemon_says(*msgs: dict) -> tuple[socket.socket, socket.socket]:
    """(our end, the daemon's end) of a connection on which the daemon has sent ``msgs``."""
    ours, theirs = socket.socketpair()
    theirs.sendall(b"".join(wire.encode(m) for m in msgs))
    theirs.shutdown(socket.SHUT_WR)
    return ours, theirs


def test_the_daemons_error_type_is_kept(capsys):
    from tunnelctl import client
    from tunneld.errors import BindError
    ours, theirs = _daemon_says(wire.progress("barhal: connecting"),
                                wire.error(__version__, BindError("port 8090 is in use")))
    with ours, theirs, pytest.raises(client.Failed) as e:
        client.exchange(ours, "add", {"host": "barhal", "specs": ["8090"]})
    assert (e.value.type, str(e.value)) == ("BindError", "port 8090 is in use")
    assert capsys.readouterr().err == "barhal: connecting\n"


def test_a_quiet_request_shows_nothing(capsys):
    from tunnelctl import client
    seen: list[dict] = []
    ours, theirs = _daemon_says({"output": "some output\n"}, wire.ok("0.0.1", {"pid": 7}))
    with ours, theirs:
        assert client.exchange(ours, "status", {}, on_progress=seen.append, quiet=True) == \
            {"pid": 7}
        assert wire.decode(theirs.makefile("rb").readline()) == wire.request("status")
    assert seen == [{"output": "some output\n"}]
    assert capsys.readouterr() == ("", "")  # not the output, nor the other version's warning


STATUS = {"version": __version__, "pid": 42, "uptime": 12.6, "socket": "/run/t.sock",
          "hosts": 2, "forwards": 3}
STATUS_LINE = (f"tunneld {__version__} running, pid 42, up 13s, socket /run/t.sock, "
               "2 host(s), 3 forward(s)")


@pytest.mark.parametrize("fastpath, part", [
    pytest.param(None, "", id="older-daemon"),
    pytest.param({"active": True, "reason": "asyncssh 2.24.0"}, ", fast path: on", id="on"),
    pytest.param({"active": False, "reason": "asyncssh 2.25.0 not tested"},
                 ", fast path: off (asyncssh 2.25.0 not tested)", id="off"),
    pytest.param({"active": False}, ", fast path: off", id="off-no-reason"),
])
def test_status_line_shows_the_fast_path(fastpath, part):
    from tunnelctl.render import status_line
    r = dict(STATUS) if fastpath is None else dict(STATUS, fastpath=fastpath)
    assert status_line(r) == STATUS_LINE + part


def test_sessions_shows_the_newest_url_only_when_one_was_printed(capsys, monkeypatch):
    from tunnelctl.render import print_sessions
    monkeypatch.setenv("COLUMNS", "200")
    base = {"host": "barhal", "state": "running", "exit_status": None, "exit_signal": None,
            "error": None, "detached": True, "port": None,
            "started": "2026-12-01T10:00:00Z", "command": "jupyter lab"}
    print_sessions([dict(base, name="a", urls=[])])
    out = capsys.readouterr().out
    assert "URL" not in out and "jupyter lab" in out
    urls = [{"remote": "http://gpu1:8888/", "local": "http://127.0.0.1:8888/old",
             "seen": "2026-12-01T10:00:01Z", "forward": "x"},
            {"remote": "http://gpu1:8888/", "local": "http://127.0.0.1:8888/lab?token=t",
             "seen": "2026-12-01T10:00:02Z", "forward": "x"}]
    print_sessions([dict(base, name="a", urls=[]), dict(base, name="b", urls=urls)])
    head, _, b = capsys.readouterr().out.splitlines()
    assert head.split()[-2:] == ["URL", "COMMAND"]
    assert "http://127.0.0.1:8888/lab?token=t" in b and "/old" not in b


def test_open_without_a_target_or_with_request_and_target_is_a_usage_error(env):
    r = ctl(env, "open")
    assert r.returncode == 2 and "--request N" in r.stderr
    r = ctl(env, "open", "jupyter-1", "--request", "3")
    assert r.returncode == 2 and "--request N takes no SESSION" in r.stderr
    r = ctl(env, "open", "--request", "x")
    assert r.returncode == 2 and "invalid int value" in r.stderr


def test_opens_and_setup_remote_are_shown_for_a_person(capsys):
    from tunnelctl.render import print_opens, print_setup
    print_opens({"requests": [
        {"n": 7, "seen": "2026-11-21T21:00:05Z", "host": "hpc", "node": "node42",
         "source": "spool", "outcome": "old", "url": "http://127.0.0.1:8888/lab?token=abc",
         "reason": "older than open_max_age (3h 5m > 2m)"}],
        "spools": [{"host": "hpc", "state": "following ~/.tunneld/spool/opens",
                    "since": "2026-11-21T21:00:00Z"}]})
    out = capsys.readouterr().out
    assert "node42" in out and "old" in out and "older than open_max_age" in out
    assert "token=abc" not in out and "spool of hpc: following" in out
    print_setup({"host": "hpc", "path": "/h/.bashrc", "line": "export BROWSER=X",
                 "why": "bash", "apply": True, "added": True, "backup": "/h/.bashrc.b",
                 "helper": "/h/.tunneld/bin/open-on-local", "lines": ["", "# c", "export B"]})
    out = capsys.readouterr().out
    assert "--- /h/.bashrc  (backup: /h/.bashrc.b)" in out and "+export B" in out
