"""The shell text of remote.py, run for real under dash and bash (real processes and files in a
temporary HOME, no SSH): detached start, BROWSER helper, follower, catch-up, kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunneld import remote
from tunneld.markers import BROWSER_ENV, Scanner

pytestmark = pytest.mark.timeout(60)

SHELLS = [s for s in ("dash", "bash") if shutil.which(s)]


@pytest.fixture(params=SHELLS)
def sh(request, tmp_path):
    """Runs remote text as sshd would (``SHELL -c TEXT``) in a temp HOME; kills what the
    sessions left behind at the end."""
    home = tmp_path / "home"
    home.mkdir()
    shell = shutil.which(request.param)
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "SHELL": shell}

    def run(text: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess[str]:
        return subprocess.run([shell, "-c", text], env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, **kw)

    run.home = home  # type: ignore[attr-defined]
    run.env = env  # type: ignore[attr-defined]
    yield run
    for pid_file in home.glob(".tunneld/sessions/*/pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ValueError, OSError):
            pass


def start(sh, sid: str, command: str, env: dict[str, str] | None = None) -> remote.Started:
    r = sh(remote.detached_start_command(sid, command, env))
    assert r.returncode == 0, r.stderr
    started = remote.parse_start_line(r.stdout)
    assert started is not None, r.stdout
    return started


def wait_file(path: Path, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"no {path}"
        time.sleep(0.02)
    return path.read_text()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_detached_start_runs_in_its_own_session_with_private_files(sh):
    s = start(sh, "job-1", "echo out; echo err >&2; echo $PORT; exit 7", {"PORT": "8123"})
    d = sh.home / ".tunneld" / "sessions" / "job-1"
    assert s.dir == str(d)
    assert s.server == "".join(c for c in os.uname().nodename
                               if c.isalnum() or c in "_.-")
    assert wait_file(d / "status") == "7\n"
    assert (d / "log").read_text() == "out\nerr\n8123\n"
    assert (d / "pid").read_text().strip() == str(s.pid)
    for p in (sh.home / ".tunneld", sh.home / ".tunneld" / "sessions", d):
        assert p.stat().st_mode & 0o777 == 0o700, p
    assert (d / "log").stat().st_mode & 0o777 == 0o600
    # a second session with the same id is refused (its directory exists)
    r = sh(remote.detached_start_command("job-1", "true"))
    assert r.returncode == 125 and "cannot create" in r.stderr


def test_the_command_keeps_the_users_umask_while_tunnelds_files_are_private(sh):
    text = remote.detached_start_command("um-1", "umask; echo x > made")
    r = sh('umask 022; cd "$HOME"\n' + text)
    s = remote.parse_start_line(r.stdout)
    assert s is not None, r.stderr
    assert wait_file(Path(s.dir) / "status") == "0\n"
    assert (Path(s.dir) / "log").read_text() == "0022\n"
    assert (sh.home / "made").stat().st_mode & 0o777 == 0o644
    for name in ("log", "pid", "status"):
        assert (Path(s.dir) / name).stat().st_mode & 0o777 == 0o600, name


def test_a_lost_start_answer_is_asked_again(sh):
    s = start(sh, "probe-1", "sleep 30")
    r = sh(remote.probe_start_command("probe-1"))
    assert remote.parse_start_line(r.stdout) == s
    r = sh(remote.probe_start_command("never-1"))
    assert r.returncode == 125 and "did not start" in r.stderr
    assert remote.parse_start_line(r.stdout) is None


def test_the_runner_is_a_session_leader_outside_the_callers_session(sh):
    s = start(sh, "lead-1", "sleep 30")
    assert os.getsid(s.pid) == s.pid and os.getpgid(s.pid) == s.pid
    assert os.getsid(s.pid) != os.getsid(0)
    # the caller (as sshd's session would be) is long gone; the command still runs
    assert alive(s.pid)


def test_browser_helper_names_the_host_and_python_webbrowser_uses_it(sh):
    s = start(sh, "web-1", shlex_join([sys.executable, "-c",
              "import os, webbrowser; print(os.environ['BROWSER'], flush=True);"
              "webbrowser.open('http://127.0.0.1:8888/lab?token=abc')"]))
    d = Path(s.dir)
    assert wait_file(d / "status") == "0\n"
    helper = sh.home / ".tunneld" / "bin" / "open-on-local"
    assert helper.stat().st_mode & 0o777 == 0o700
    out = (d / "log").read_bytes()
    assert out.splitlines()[0].decode() == str(helper)
    scanner = Scanner()
    (ev,) = scanner.feed(out) + scanner.close()
    assert ev.url == "http://127.0.0.1:8888/lab?token=abc"
    assert ev.node == s.server and ev.node


def test_an_attached_session_uses_the_same_browser_helper(sh):
    """``run --no-detach``: a marker printed by webbrowser names the host it ran on, as in a
    detached session, so a URL printed on a compute node is routed to that node."""
    r = sh(remote.session_command(shlex_join([
        sys.executable, "-c", "import webbrowser; webbrowser.open_new('http://0.0.0.0:8200/')"]),
        {"PORT": "8200"}))
    assert r.returncode == 0, r.stderr
    pid_line, _, out = r.stdout.partition("\n")
    assert remote.parse_pid_line(pid_line.encode()) is not None
    helper = sh.home / ".tunneld" / "bin" / "open-on-local"
    assert helper.stat().st_mode & 0o777 == 0o700
    scanner = Scanner()
    (ev,) = scanner.feed(out.encode()) + scanner.close()
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    assert ev.url == "http://0.0.0.0:8200/" and ev.node == host, ev


def test_an_attached_session_keeps_the_users_umask_and_env(sh):
    r = sh(remote.session_command('umask; printf "%s\\n" "$PORT"', {"PORT": "8200"}))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[1:-1] == [subprocess.run(
        [sh.env["SHELL"], "-c", "umask"], capture_output=True, text=True).stdout.strip(),
        "8200"]


def test_a_home_with_a_colon_falls_back_to_the_echo_browser(sh, tmp_path):
    home = tmp_path / "odd:home"
    home.mkdir()
    sh.env["HOME"] = str(home)
    s = start(sh, "odd-1", 'printf "%s\\n" "$BROWSER"')
    assert wait_file(Path(s.dir) / "status") == "0\n"
    assert (Path(s.dir) / "log").read_text() == BROWSER_ENV + "\n"


def test_follow_from_an_offset_then_catch_up_gives_the_whole_log_once(sh):
    prog = "i=0; while [ $i -lt 30 ]; do echo line$i; i=$((i+1)); sleep 0.02; done; exit 3"
    s = start(sh, "f-1", prog)
    time.sleep(0.2)
    first = sh(remote.tail_command("f-1", 0)).stdout.encode()   # what a first attach got
    r = subprocess.run(["sh", "-c", remote.follow_command("f-1", len(first))], env=sh.env,
                       capture_output=True, timeout=30)
    end = remote.parse_end_line(r.stderr.decode())
    assert isinstance(end, tuple), r.stderr
    size, status = end
    assert status == 3
    got = first + r.stdout
    assert len(got) <= size
    got += sh(remote.tail_command("f-1", len(got))).stdout.encode()[:size - len(got)]
    assert got == b"".join(b"line%d\n" % i for i in range(30))
    assert os.path.getsize(Path(s.dir) / "log") == size


def test_follow_of_a_finished_session_and_of_a_missing_one(sh):
    s = start(sh, "done-1", "echo hi")
    wait_file(Path(s.dir) / "status")
    r = sh(remote.follow_command("done-1", 0))
    assert remote.parse_end_line(r.stderr) == (3, 0)
    assert r.stdout in ("hi\n", "")        # the rest comes from tail_command
    r = sh(remote.follow_command("nosuch-1", 0))
    assert remote.parse_end_line(r.stderr) == "gone"


def test_kill_stops_the_tree_and_the_status_is_recorded(sh):
    s = start(sh, "k-1", "sleep 300 & sleep 300; wait")
    deadline = time.monotonic() + 10
    kids: set[int] = set()
    while len(kids) < 3 and time.monotonic() < deadline:
        kids = group(s.pid)
        time.sleep(0.05)
    assert len(kids) >= 3, kids   # the user's shell and two sleeps
    r = sh(remote.detached_kill_command("k-1", s.pid, grace=2))
    assert "signalled" in r.stdout
    status = wait_file(Path(s.dir) / "status")
    assert int(status) > 128  # the command died of SIGTERM; the runner recorded it
    deadline = time.monotonic() + 10
    while any(alive(p) for p in kids | {s.pid}) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in kids | {s.pid} if alive(p)] == []
    # killing an ended session signals nothing (its pid may belong to someone else now)
    r = sh(remote.detached_kill_command("k-1", s.pid))
    assert r.stdout.strip() == "already ended"


def test_parse_lines_and_bad_input():
    tag, end = remote.START_TAG, remote.END_TAG
    assert remote.parse_start_line(f"noise\n{tag}42\tlogin1\t/h/.tunneld/sessions/x\n") == \
        remote.Started(42, "login1", "/h/.tunneld/sessions/x")
    assert remote.parse_start_line(f"{tag}1\tx\t/d\n") is None      # never pid 1
    assert remote.parse_start_line(f"{tag}abc\tx\t/d\n") is None
    assert remote.parse_end_line(f"{end}10 0\n") == (10, 0)
    assert remote.parse_end_line(f"{end}10 -\n") == (10, None)
    assert remote.parse_end_line(f"{end}gone\n") == "gone"
    assert remote.parse_end_line("") is None
    for bad in ("", "../x", "a/b", "a b", "-x", "a;b", "x" * 200):
        with pytest.raises(ValueError):
            remote.follow_command(bad, 0)
    with pytest.raises(ValueError):
        remote.detached_start_command("ok-1", "true", {"BAD NAME": "x"})
    with pytest.raises(ValueError):
        remote.follow_command("ok-1", -1)
    assert remote.forget_command([]) == "true"
    assert remote.forget_command(["a-1", "b-2"]) == \
        'rm -rf -- "$HOME"/.tunneld/sessions/a-1 "$HOME"/.tunneld/sessions/b-2'


def group(pgid: int) -> set[int]:
    """The processes of process group ``pgid``, but its leader."""
    r = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True)
    return {int(p) for p in r.stdout.split()} - {pgid}


def shlex_join(argv: list[str]) -> str:
    import shlex
    return shlex.join(argv)


@pytest.mark.parametrize("without", [("setsid",), ("setsid", "perl"),
                                     ("setsid", "perl", "python3")],
                         ids=["perl", "python3", "job-control"])
def test_detached_without_setsid(sh, tmp_path, without):
    """macOS has no setsid(1): perl's or python3's setsid, else a job-control process group
    (bash; dash has none: the killer still finds the tree through parent pids)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if os.path.isdir(d):
            for name in os.listdir(d):
                if name not in without and not (bin_dir / name).exists():
                    (bin_dir / name).symlink_to(os.path.join(d, name))
    sh.env["PATH"] = str(bin_dir)
    s = start(sh, "port-1", "echo $$; sleep 30")
    log = Path(s.dir) / "log"
    deadline = time.monotonic() + 10
    while not log.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    if "python3" not in without:
        assert os.getsid(s.pid) == s.pid == os.getpgid(s.pid)   # a session of its own
        assert os.getsid(s.pid) != os.getsid(0)
    elif os.path.basename(sh.env["SHELL"]) == "bash":
        assert os.getpgid(s.pid) == s.pid             # a process group of its own
    r = sh(remote.detached_kill_command("port-1", s.pid, grace=2))
    assert "signalled" in r.stdout
    assert int(wait_file(Path(s.dir) / "status")) > 128


# -- a command's words (tmux's rule: one word is a shell line, several arrive as typed) ----------

#: every shell metacharacter, blanks, a newline, quotes of both kinds and a backslash
METAS = "$HOME ${X:-y} $(id) `id` * ? [a] ; | & && > < >> ( ) { } ! # ~ ' \" \\ \t\nend"
WORDS_CASES = [
    [sys.executable, "-c", "import webbrowser; print('open', 'http://0.0.0.0:8090/')"],
    ["file with spaces.txt", "$PORT", "*", "a;b"],
    [METAS],
    ["", "after-empty", ""],
    ["données", "漢字", "é\u0301"],
    ["-n", "--", "-e", "-"],
]


@pytest.mark.parametrize("words", WORDS_CASES[1:], ids=["spaces", "metas", "empty", "utf8", "dash"])
def test_several_words_arrive_exactly_as_typed(sh, words):
    """``run HOST -- WORD…`` with two words or more: the server's program gets each word as
    typed, under dash and bash, also in a detached session's runner and the attached wrapper."""
    argv = [sys.executable, "-c", "import sys, json; print(json.dumps(sys.argv[1:]))", *words]
    r = sh(remote.shell_text(argv))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == words
    r = sh(remote.session_command(remote.shell_text(argv)))
    assert json.loads(r.stdout.split("\n", 1)[1]) == words


def test_the_issues_example_runs(sh):
    r = sh(remote.shell_text(WORDS_CASES[0]))
    assert (r.returncode, r.stdout) == (0, "open http://0.0.0.0:8090/\n"), r.stderr


def test_one_word_is_a_shell_line(sh):
    """One word is for the remote shell: ``~``, ``$VAR``, ``&&``, pipes, globs, redirections."""
    (sh.home / "proj").mkdir()
    (sh.home / "proj" / "a.ipynb").write_text("x")
    line = "cd ~/proj && echo $HOME | tr a-z A-Z; ls *.ipynb > out; cat out"
    r = sh(remote.shell_text([line]))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{str(sh.home).upper()}\na.ipynb\n"


def test_a_detached_session_runs_the_words_too(sh):
    words = [sys.executable, "-c", "import sys; print(repr(sys.argv[1:]))", METAS, ""]
    s = start(sh, "words-1", remote.shell_text(words))
    wait_file(Path(s.dir) / "status")
    assert (Path(s.dir) / "log").read_text() == repr([METAS, ""]) + "\n"


@pytest.mark.parametrize("words", WORDS_CASES + [["cd ~/proj && jupyter lab"], ["jupyter"]])
def test_the_shown_command_pasted_back_gives_the_same_words(words):
    """`tunnelctl sessions` shows ``remote.shown(words)``: a POSIX shell (the user's, pasting it
    after ``tunnelctl run HOST --``) splits it back into the same words."""
    import shlex
    assert shlex.split(remote.shown(words)) == words


def test_a_command_needs_a_word():
    with pytest.raises(ValueError):
        remote.shell_text([])


# -- private socket directories (`run --sock auto`) ----------------------------------------------

@pytest.mark.parametrize("runtime", [False, True], ids=["home", "xdg-runtime-dir"])
def test_a_socket_directory_is_private_and_removed(sh, tmp_path, runtime):
    import stat
    if runtime:
        xdg = tmp_path / "run-user"
        xdg.mkdir(mode=0o700)
        sh.env["XDG_RUNTIME_DIR"] = str(xdg)
    # an attached session ends with its login: the runtime directory is fine for it
    r = sh("umask 022\n" + remote.sock_dir_command("lab-1", outlives_login=False))
    assert r.returncode == 0, r.stderr
    d = remote.parse_sock_dir(r.stdout)
    assert d is not None, r.stdout
    base = (xdg / "tunneld") if runtime else (sh.home / ".tunneld" / "sock")
    assert Path(d).parent == base and Path(d).name.startswith("lab-1.")
    for p in (Path(d), base):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700
    # two sessions of one name get two directories
    d2 = remote.parse_sock_dir(sh(remote.sock_dir_command("lab-1", False)).stdout)
    assert d2 is not None and d2 != d
    (Path(d) / remote.SOCK_NAME).write_text("x")
    assert sh(remote.sock_remove_command(d)).returncode == 0
    assert not Path(d).exists() and Path(d2).exists()


def test_a_runtime_dir_of_someone_else_is_not_used(sh, tmp_path):
    sh.env["XDG_RUNTIME_DIR"] = str(tmp_path / "missing")
    d = remote.parse_sock_dir(sh(remote.sock_dir_command("x", False)).stdout)
    assert d is not None and d.startswith(str(sh.home / ".tunneld" / "sock") + "/")


def test_a_detached_session_avoids_a_runtime_dir_that_ends_with_the_login(sh, tmp_path):
    """logind empties $XDG_RUNTIME_DIR when the last login ends (unless the user lingers):
    a detached session outlives its connection, so its socket goes under ~ then."""
    xdg = tmp_path / "run-user"
    xdg.mkdir(mode=0o700)
    sh.env["XDG_RUNTIME_DIR"] = str(xdg)
    linger = Path("/var/lib/systemd/linger") / subprocess.run(
        ["id", "-un"], capture_output=True, text=True).stdout.strip()
    d = remote.parse_sock_dir(sh(remote.sock_dir_command("x", outlives_login=True)).stdout)
    assert d is not None
    expected = xdg / "tunneld" if linger.exists() else sh.home / ".tunneld" / "sock"
    assert Path(d).parent == expected


def test_directories_of_ended_owners_are_swept(sh):
    """A session with a socket directory writes ``HOST PID`` (of tunneld's own sh that runs
    the command) to DIR/owner, attached and detached; the next socket directory made on that
    server removes those whose owner on this host has ended, and those never owned for 10
    minutes; a live owner's, one of another host (a home shared by login nodes) and a
    directory just made stay."""
    make = remote.sock_dir_command("s", False)
    dirs = [remote.parse_sock_dir(sh(make).stdout) for _ in range(6)]
    assert all(dirs)
    ended, detached, alive, elsewhere, fresh, stale = (Path(d) for d in dirs)
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    r = sh(remote.session_command("true", {remote.SOCK_DIR_ENV: str(ended)}))
    assert r.returncode == 0, r.stderr
    h, pid = (ended / "owner").read_text().split()
    assert h == host and pid.isdigit()
    s = start(sh, "owned-1", "true", {remote.SOCK_DIR_ENV: str(detached)})
    wait_file(Path(s.dir) / "status")
    assert (detached / "owner").read_text().split()[0] == host
    (alive / "owner").write_text(f"{host} {os.getpid()}\n")
    (elsewhere / "owner").write_text("another-login-node 999999\n")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    newest = remote.parse_sock_dir(sh(make).stdout)
    assert newest
    assert not ended.exists() and not detached.exists() and not stale.exists()
    assert alive.exists() and elsewhere.exists() and fresh.exists()


def test_sock_and_port_values_fill_both_forms(sh):
    """``{sock}`` and ``{port}``: replaced in each word as typed, and quoted for the shell
    in a one-word shell line (a home directory may hold a space)."""
    values = {"sock": "/h o/me/web.sock", "port": "8123"}
    argv = [sys.executable, "-c", "import sys; print(sys.argv[1:])", "{sock}", "p={port}"]
    r = sh(remote.shell_text(argv, values))
    assert r.stdout == "['/h o/me/web.sock', 'p=8123']\n", r.stderr
    r = sh(remote.shell_text(["printf '%s|' {sock} {port}"], values))
    assert r.stdout == "/h o/me/web.sock|8123|", r.stderr


@pytest.mark.parametrize("bad", ["/", "/home/u", "/home/u/.tunneld/sock",
                                 "relative/tunneld/a.abcdef", "/x/tunneld/../../etc.abcdef",
                                 "/x/tunneld/a.abc", "/x/tunneld/a.abcdef\n"])
def test_only_tunnelds_socket_directories_are_removed(bad):
    with pytest.raises(ValueError):
        remote.sock_remove_command(bad)
    if "\n" not in bad:
        assert remote.parse_sock_dir(remote.SOCK_TAG + bad) is None
