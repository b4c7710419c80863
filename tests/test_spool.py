"""The browser-open spool's shell text (helper, reader, setup-remote) run for real under dash
and bash in a temporary HOME, and its parsers and the requests list as tables."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tunneld import openlog, rcfile, spool
from tunneld.errors import UsageError
from tunneld.markers import Scanner

pytestmark = pytest.mark.timeout(60)

SHELLS = [s for s in ("dash", "bash") if shutil.which(s)]


@pytest.fixture(params=SHELLS)
def sh(request, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shell = shutil.which(request.param)
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "SHELL": shell}

    def run(text: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([shell, "-c", text, "sh", *args], env=env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    run.home = home  # type: ignore[attr-defined]
    run.env = env  # type: ignore[attr-defined]
    run.shell = shell  # type: ignore[attr-defined]
    return run


def helper(sh, limit: int = spool.SPOOL_MAX) -> Path:
    path = sh.home / "open-on-local"
    path.write_text(spool.helper_script(limit))
    path.chmod(0o700)
    return path


def call(sh, path: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sh.shell, str(path), url], env=sh.env, capture_output=True,
                          text=True, timeout=30)


def entries(sh) -> list[spool.Entry | str]:
    text = (sh.home / spool.SPOOL_DIR / spool.SPOOL_FILE).read_text()
    return [spool.parse_entry(line) for line in text.split("\n")[:-1]]


def test_the_helper_prints_the_marker_and_spools_the_request_privately(sh):
    h = helper(sh)
    before = int(time.time())
    r = call(sh, h, "http://127.0.0.1:8888/lab?token=abc")
    assert r.returncode == 0 and r.stderr == ""
    (ev,) = Scanner().feed(r.stdout.encode())
    assert ev.url == "http://127.0.0.1:8888/lab?token=abc" and ev.node
    (e,) = entries(sh)
    assert isinstance(e, spool.Entry)
    assert e.url == ev.url and e.node == ev.node and before <= e.time <= time.time() + 1
    d = sh.home / spool.SPOOL_DIR
    assert d.stat().st_mode & 0o777 == 0o700
    assert (d / spool.SPOOL_FILE).stat().st_mode & 0o777 == 0o600
    assert (sh.home / ".tunneld").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("url,said", [
    ("http://x:1/a\tb", "holds a tab or a line break"),
    ("http://x:1/a\nb", "holds a tab or a line break"),
    ("http://x:1/a\rb", "holds a tab or a line break"),
    ("http://x:1/" + "a" * 9000, "longer than 8192 bytes"),
])
def test_a_url_the_spool_cannot_hold_is_said_and_still_marked(sh, url, said):
    r = call(sh, helper(sh), url)
    assert r.returncode == 0 and "OPEN_ON_LOCAL" in r.stdout
    assert said in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert str(sh.home / spool.SPOOL_DIR / spool.SPOOL_FILE) in r.stderr
    assert not (sh.home / spool.SPOOL_DIR / spool.SPOOL_FILE).exists()


def test_a_spool_that_cannot_be_written_is_said_in_one_line_naming_it(sh):
    if os.geteuid() == 0:
        # root writes anywhere: make the directory's place a file instead
        (sh.home / ".tunneld").mkdir(mode=0o700)
        (sh.home / spool.SPOOL_DIR).write_text("not a directory")
    else:
        (sh.home / ".tunneld").mkdir(mode=0o500)
    r = call(sh, helper(sh), "http://127.0.0.1:8888/")
    assert r.returncode == 0 and r.stdout.startswith("OPEN_ON_LOCAL")
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("open-on-local: could not add it to tunneld's spool "
                               f"{sh.home / spool.SPOOL_DIR / spool.SPOOL_FILE} (")
    assert "tunneld sees this request only in this output" in lines[0]


def test_the_helper_rotates_past_its_limit_and_keeps_one_old_file(sh):
    h = helper(sh, limit=200)
    urls = [f"http://127.0.0.1:{8000 + i}/x" for i in range(12)]
    for u in urls:
        assert call(sh, h, u).returncode == 0
    d = sh.home / spool.SPOOL_DIR
    assert set(os.listdir(d)) <= {"opens", "opens.1"} and (d / "opens.1").exists()
    new_file = d / "opens"
    assert not new_file.exists() or new_file.stat().st_size <= 200
    assert (d / "opens.1").stat().st_size > 200
    old = [spool.parse_entry(x).url for x in (d / "opens.1").read_text().splitlines()]
    new = [spool.parse_entry(x).url for x in new_file.read_text().splitlines()] \
        if new_file.exists() else []
    assert old + new == urls[len(urls) - len(old) - len(new):] and len(new) < len(old)


def read_all(sh, pos: spool.Position, wait_for: int, timeout: float = 15
             ) -> tuple[list[spool.Seen | spool.Note], spool.Position]:
    """Run the reader until it reported ``wait_for`` entries; the lines and the position a
    daemon would keep."""
    proc = subprocess.Popen([sh.shell, "-c", spool.reader_command(pos, poll=0.1, wait=0.1)],
                            env=sh.env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    lines = spool.Lines()
    got: list[spool.Seen | spool.Note] = []
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    try:
        while sum(isinstance(x, spool.Seen) for x in got) < wait_for:
            assert time.monotonic() < deadline, got
            data = proc.stdout.read() or b""
            for line in lines.feed(data):
                ev = spool.parse_reader_line(line)
                assert ev is not None, line
                got.append(ev)
                if isinstance(ev, spool.Seen):
                    pos = pos.took(ev.inode, ev.end)
                elif ev.kind == "N":
                    pos = pos.switched(ev.inode)
                elif ev.kind == "T":
                    pos = pos.restarted(ev.inode)
            time.sleep(0.05)
        time.sleep(0.3)   # nothing more comes
        for line in lines.feed(proc.stdout.read() or b""):
            got.append(spool.parse_reader_line(line))
    finally:
        proc.kill()
        proc.wait()
    return got, pos


def urls_of(got) -> list[str]:
    return [x.entry.url for x in got if isinstance(x, spool.Seen)]


def test_the_reader_waits_for_the_spool_then_reports_each_entry_once_across_restarts(sh):
    proc_pos = spool.Position()
    d = sh.home / spool.SPOOL_DIR
    h = helper(sh, limit=300)
    # nothing there yet: it waits (and creates nothing)
    got, _ = read_all(sh, proc_pos, 0, timeout=2)
    assert spool.Note("W") in got and not (sh.home / ".tunneld").exists()
    urls = [f"http://127.0.0.1:{9000 + i}/p" for i in range(4)]
    for u in urls[:2]:
        call(sh, h, u)
    got, pos = read_all(sh, proc_pos, 2)
    assert urls_of(got) == urls[:2] and spool.Note("F") in got
    seen = [x for x in got if isinstance(x, spool.Seen)]
    assert all(0 <= x.age <= 2 for x in seen)
    assert pos.inode == os.stat(d / "opens").st_ino and pos.offset == d.joinpath(
        "opens").stat().st_size
    # resumed from the position: only the new ones
    for u in urls[2:]:
        call(sh, h, u)
    got, pos = read_all(sh, pos, 2)
    assert urls_of(got) == urls[2:]
    # a rotation while nobody read: the rest of the old file, then the new one
    more = [f"http://127.0.0.1:{9100 + i}/q" for i in range(10)]
    for u in more:
        call(sh, h, u)
    assert (d / "opens.1").exists()
    got, pos = read_all(sh, pos, len(more))
    assert urls_of(got) == more
    # a late writer into the rotated file (it had opened it before the mv) is read too
    with open(d / "opens.1", "a") as f:
        f.write(f"{int(time.time())}\tnode7\thttp://127.0.0.1:9999/late\n")
    got, pos = read_all(sh, pos, 1)
    assert urls_of(got) == ["http://127.0.0.1:9999/late"]
    assert [x.entry.node for x in got if isinstance(x, spool.Seen)] == ["node7"]


def test_the_reader_reports_old_times_and_a_partial_line_only_once_complete(sh):
    d = sh.home / spool.SPOOL_DIR
    d.mkdir(parents=True, mode=0o700)
    f = d / "opens"
    f.write_text(f"{int(time.time()) - 3600}\tlogin1\thttp://127.0.0.1:8001/old\n"
                 "garbage line\n"
                 f"{int(time.time())}\tlogin1\thttp://127.0.0.1:8002/par")
    got, pos = read_all(sh, spool.Position(), 2)
    seen = [x for x in got if isinstance(x, spool.Seen)]
    assert seen[0].entry.url.endswith("/old") and 3590 <= seen[0].age <= 3700
    assert seen[1].entry is None and seen[1].bad == "not three tab-separated fields"
    with open(f, "a") as out:
        out.write("tial\n")
    got, pos = read_all(sh, pos, 1)
    assert urls_of(got) == ["http://127.0.0.1:8002/partial"]
    assert pos.offset == f.stat().st_size
    # truncated: read again from its start
    f.write_text(f"{int(time.time())}\t\thttp://127.0.0.1:8003/t\n")
    got, pos = read_all(sh, pos, 1)
    assert spool.Note("T", pos.inode) in got and urls_of(got) == ["http://127.0.0.1:8003/t"]
    assert [x.entry.node for x in got if isinstance(x, spool.Seen)] == [None]


@pytest.mark.parametrize("line,expected", [
    ("1700000000\tnode1\thttp://127.0.0.1:8888/lab", spool.Entry(1700000000, "node1",
                                                                "http://127.0.0.1:8888/lab")),
    ("1700000000\t\thttp://x:1/", spool.Entry(1700000000, None, "http://x:1/")),
    ("17000x\tn\thttp://x:1/", "the time is not a number of seconds"),
    ("1\tn d\thttp://x:1/", "the host name holds other characters than letters, digits, "
                            "'.', '_', '-'"),
    ("1\tn\thttp://x:1/ a", "the URL is empty, too long, or holds a space or a control "
                            "character"),
    ("1\tn\t", "the URL is empty, too long, or holds a space or a control character"),
    ("1\tn\thttp://x/\textra", "not three tab-separated fields"),
    ("1\tn\thttp://x/\x85", "the URL is empty, too long, or holds a space or a control "
                            "character"),
])
def test_spool_lines(line, expected):
    assert spool.parse_entry(line) == expected


T = spool.TAG.encode()


@pytest.mark.parametrize("line,expected", [
    (T + b"W", spool.Note("W")),
    (T + b"F", spool.Note("F")),
    (T + b"N\t42", spool.Note("N", 42)),
    (T + b"L\t42", spool.Note("L", 42)),
    (T + b"T\t42", spool.Note("T", 42)),
    (T + b"S\t42\t70000", spool.Note("S", 42, 70000)),
    (T + b"E\t42\t10\t100\t90\tn\thttp://x:1/", spool.Seen(42, 10, 100,
                                                          spool.Entry(90, "n", "http://x:1/"))),
    (T + b"E\t42\t10\t100\tjunk", spool.Seen(42, 10, 100, None,
                                             "not three tab-separated fields")),
    (T + b"E\t42\tx\t100\t90\tn\thttp://x:1/", None),
    (T + b"N\tx", None),
    (T + b"W\t1", None),
    (b"OPEN_ON_LOCAL[http://x:1/]", None),
])
def test_reader_lines(line, expected):
    assert spool.parse_reader_line(line) == expected


def test_an_age_is_on_the_servers_clock_and_never_negative():
    assert spool.Seen(1, 1, 100, spool.Entry(90, None, "u")).age == 10
    assert spool.Seen(1, 1, 100, spool.Entry(130, None, "u")).age == 0   # a node's skew


def test_positions_follow_rotations():
    p = spool.Position()
    p = p.switched(5).took(5, 100)
    assert p == spool.Position(5, 100, 0, 0)
    p = p.switched(6)
    assert p == spool.Position(6, 0, 5, 100)
    assert p.took(5, 150) == spool.Position(6, 0, 5, 150)
    assert p.took(6, 40) == spool.Position(6, 40, 5, 100)
    assert p.took(7, 10) == spool.Position(7, 10, 6, 0)
    assert p.restarted(6) == spool.Position(6, 0, 5, 100)
    assert spool.Position.from_json(p.to_json()) == p
    for bad in ({}, {"inode": -1, "offset": 0, "prev_inode": 0, "prev_offset": 0},
                {"inode": True, "offset": 0, "prev_inode": 0, "prev_offset": 0}, [1]):
        with pytest.raises(ValueError):
            spool.Position.from_json(bad)


def test_reader_output_is_cut_into_bounded_lines():
    lines = spool.Lines()
    assert lines.feed(b"a\nb") == [b"a"]
    assert lines.feed(b"c\n" + b"x" * (spool.MAX_LINE + 5)) == [b"bc"]
    assert lines.feed(b"yyy\nz\n") == [b"z"] and lines.overflowed == 1


def test_requests_are_numbered_bounded_and_say_the_valid_range():
    reqs = openlog.Requests(kept=3)
    changes = []
    reqs.on_change = lambda: changes.append(1)
    for i in range(5):
        reqs.add(1.0, "h", f"http://x:{i}/", None, "spool", asked=1, age=0)
    assert [r.n for r in reqs] == [3, 4, 5] and len(changes) == 5
    reqs.done(reqs.get(4), "old", "older than open_max_age")
    with pytest.raises(UsageError, match="no request 1: the list holds requests 3 to 5"):
        reqs.get(1)
    with pytest.raises(ValueError):
        reqs.done(reqs.get(4), "maybe")
    again = openlog.Requests()
    data = reqs.to_json()
    data["requests"].append({"n": "bad"})
    assert again.load(data) == 1
    assert [(r.n, r.outcome) for r in again] == [(3, "pending"), (4, "old"), (5, "pending")] \
        or [(r.n, r.outcome) for r in again] == [(3, "failed"), (4, "old"), (5, "failed")]
    assert again.add(1.0, "h", "u", None, "x").n == 6
    with pytest.raises(UsageError, match="seen no browser-open request yet"):
        openlog.Requests().get(1)


@pytest.mark.parametrize("seconds,text", [(5, "5s"), (119, "119s"), (600, "10m"),
                                          (3 * 3600 + 300, "3h 5m"), (2 * 86400 + 7200,
                                                                      "2d 2h")])
def test_ages(seconds, text):
    assert openlog.describe_age(seconds) == text


def setup(sh, shell_file: str = "", apply: bool = False, login: str | None = None
          ) -> rcfile.Setup:
    env = dict(sh.env, SHELL=sh.env["SHELL"] if login is None else login)
    r = subprocess.run([sh.shell, "-c", rcfile.setup_command(shell_file, apply)], env=env,
                       capture_output=True, text=True, timeout=30)
    out = rcfile.parse_setup(r.stdout)
    assert out is not None, (r.stdout, r.stderr)
    return out


@pytest.mark.parametrize("login,file", [("/bin/bash", ".bashrc"), ("/usr/bin/zsh", ".zshrc"),
                                        ("/bin/dash", ".profile"), ("", ".profile")])
def test_setup_remote_picks_the_login_shells_file_and_changes_nothing_unasked(sh, login,
                                                                              file):
    s = setup(sh, login=login)
    assert s.path == str(sh.home / file) and not s.added and not s.already
    assert (login.rsplit("/", 1)[-1] or "unknown") in s.why
    assert list(sh.home.iterdir()) == []


def test_setup_remote_apply_adds_once_after_a_backup(sh):
    rc = sh.home / ".profile"
    rc.write_text("PATH=$PATH:/opt/bin")   # no newline at its end
    rc.chmod(0o640)
    s = setup(sh, ".profile", apply=True)
    assert s.added and s.backup and s.helper == str(sh.home / ".tunneld/bin/open-on-local")
    assert Path(s.backup).read_text() == "PATH=$PATH:/opt/bin"
    assert Path(s.backup).name.startswith(".profile.tunneld-backup-")
    assert rc.read_text() == f"PATH=$PATH:/opt/bin\n{rcfile.COMMENT}\n{rcfile.BROWSER_LINE}\n"
    assert rc.stat().st_mode & 0o777 == 0o640
    helper_text = (sh.home / ".tunneld/bin/open-on-local").read_text()
    assert helper_text == spool.HELPER_SCRIPT
    # the line works: a shell that reads the file gets the helper as BROWSER
    r = subprocess.run([sh.shell, "-c", f". {rc}; echo $BROWSER"], env=sh.env,
                       capture_output=True, text=True)
    assert r.stdout.strip() == str(sh.home / ".tunneld/bin/open-on-local")
    again = setup(sh, "~/.profile", apply=True)
    assert again.already and not again.added and again.backup is None
    assert rc.read_text().count(rcfile.BROWSER_LINE) == 1
    assert len(list(sh.home.glob(".profile.tunneld-backup-*"))) == 1


def test_setup_remote_makes_a_missing_file_and_refuses_a_directory(sh):
    s = setup(sh, "sub/none", apply=True)
    assert s.failed and "could not write" in s.failed
    s = setup(sh, ".newrc", apply=True)
    assert s.added and s.backup is None
    assert (sh.home / ".newrc").read_text() == f"\n{rcfile.COMMENT}\n{rcfile.BROWSER_LINE}\n"
    (sh.home / "adir").mkdir()
    s = setup(sh, str(sh.home / "adir"), apply=True)
    assert s.failed == f"{sh.home / 'adir'} is a directory"


@pytest.mark.parametrize("path,ok", [("", ""), ("~/.bashrc", ".bashrc"), (".zshrc", ".zshrc"),
                                     ("/etc/x", "/etc/x"), ("~other/.bashrc", None),
                                     ("a\nb", None), ("~/", None), ("dir/", None)])
def test_shell_file_arguments(path, ok):
    if ok is None:
        with pytest.raises(ValueError, match="--shell-file"):
            rcfile.check_shell_file(path)
    else:
        assert rcfile.check_shell_file(path) == ok


@pytest.mark.timeout(30)
def test_a_reader_nobody_reads_ends_itself(sh, monkeypatch):
    """Its parent may live on (or be a zombie that init never reaps, as in some containers):
    once its stdout is closed, the next heartbeat ends the reader."""
    monkeypatch.setattr(spool, "HEARTBEAT", 1)
    proc = subprocess.Popen([sh.shell, "-c", spool.reader_command(spool.Position(), poll=0.1,
                                                                  wait=0.1)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=sh.env)
    assert proc.stdout is not None
    proc.stdout.readline()   # it runs
    proc.stdout.close()
    assert proc.wait(timeout=20) is not None
