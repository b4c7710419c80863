"""Detached sessions end to end: they survive a dropped connection and a daemon restart, are
re-attached with their output complete and no marker acted on twice, can be killed after
that, report an end that happened while disconnected; and a program on a compute node behind
the server is forwarded to that node.

Remote programs run on this machine through the real sshd (the server's HOME is the test
sshd's throw-away ``server_home``, so session directories go to ``server_home/.tunneld/
sessions``; ``reap_detached`` kills and removes the ones a test made).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from slurm import compute_node  # a namespace reachable only from the login namespace
from test_e2e_sessions import (_alive, _descendants, reap_detached, script, wait_opened,
                               with_recorder)

pytestmark = pytest.mark.timeout(120)

# serves its pid (the same process before and after a drop), opens its page, optionally
# prints a marker in two halves (argv[2]: the file that releases the second half), then prints
# numbered lines until the file argv[1] exists
PROG = textwrap.dedent("""
    import http.server, os, socketserver, sys, threading, time, webbrowser
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = ("pid %d path %s" % (os.getpid(), self.path)).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    socketserver.ThreadingTCPServer.daemon_threads = True
    srv = socketserver.ThreadingTCPServer(("127.0.0.2", 0), H)
    port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    webbrowser.open("http://127.0.0.2:%d/page" % port)
    if len(sys.argv) > 2:
        sys.stdout.write("half OPEN_ON_LOCAL[http://127.0.0.2:%d/spl" % port)
        sys.stdout.flush()
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.02)
        print("it]", flush=True)
    i = 0
    deadline = time.time() + 90
    while not os.path.exists(sys.argv[1]) and time.time() < deadline:
        print("line %d" % i, flush=True)
        i += 1
        time.sleep(0.05)
    print("done", flush=True)
""")


def sessions(d) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads(d.ctl("sessions", "--json").stdout)["sessions"]}


def wait_state(d, name: str, *states: str, timeout: float = 40) -> dict:
    got: dict = {}

    def check() -> bool:
        nonlocal got
        got = sessions(d).get(name, {})
        return got.get("state") in states
    d.wait_for(check, timeout=timeout, what=f"session {name} to be {'/'.join(states)}")
    return got


def check_log_complete(s: dict, split: bool = False) -> bytes:
    """The local log is the remote one, byte for byte, and holds every line once."""
    local = Path(s["log"]).read_bytes()
    remote_log = Path(s["remote_dir"]) / "log"
    assert local == remote_log.read_bytes()
    lines = local.decode().splitlines()
    assert re.fullmatch(r"OPEN_ON_LOCAL\([A-Za-z0-9_.-]+\)\[http://127\.0\.0\.2:\d+/page\]",
                        lines[0]), lines[:3]
    rest = lines[1:]
    if split:
        assert re.fullmatch(r"half OPEN_ON_LOCAL\[http://127\.0\.0\.2:\d+/split\]", rest[0])
        rest = rest[1:]
    assert rest[-1] == "done"
    numbers = [int(x.split()[1]) for x in rest[:-1]]
    assert numbers == list(range(len(numbers))), "lines missing or repeated"
    return local


def cut_connection(sshd) -> None:
    """The server stops accepting and our connection's sshd process dies (a network drop
    as the server sees it); detached commands are not its descendants and live on."""
    sshd.stop()
    sshd.kill_connections()


def restore_connection(d, sshd) -> None:
    sshd.start()
    d.ctl("reconnect", sshd.host, check=False)


@pytest.fixture
def opened(tmp_path):
    return tmp_path / "opened.txt"


@pytest.fixture
def sdaemon(daemon, opened, tmp_path):
    """The daemon with a recording browser; at the end what its detached sessions left
    running is killed and their directories on the server removed."""
    yield with_recorder(daemon, opened, tmp_path)
    daemon.close()
    reap_detached(daemon)


def start(d, sshd, name: str, *argv: str) -> dict:
    r = d.ctl("run", sshd.host, "--name", name, "--", *argv)
    assert r.stdout.strip() == name
    s = wait_state(d, name, "running")
    assert s["detached"] is True and s["pid"] and s["remote_dir"]
    return s


def test_a_dropped_connection_is_reattached_with_complete_output(sdaemon, sshd, opened,
                                                                tmp_path):
    d = sdaemon
    release = tmp_path / "release"
    s = start(d, sshd, "drop", sys.executable, str(script(tmp_path, PROG)),
              str(release))
    (url,) = wait_opened(opened)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/page", url), url
    before = urllib.request.urlopen(url, timeout=10).read().decode()
    d.wait_for(lambda: b"line 5\n" in Path(s["log"]).read_bytes(), what="some lines")

    events = subprocess.Popen([sys.executable, "-m", "tunnelctl", "events"], env=d.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "watching" in events.stderr.readline()
        cut_connection(sshd)
        wait_state(d, "drop", "disconnected")
        assert "disconnected" in d.ctl("sessions").stdout
        assert _alive(s["pid"])                     # the command did not notice
        remote_log = Path(s["remote_dir"]) / "log"
        size = remote_log.stat().st_size
        d.wait_for(lambda: remote_log.stat().st_size > size + 100,
                   what="output while cut off")
        restore_connection(d, sshd)
        wait_state(d, "drop", "running")
    finally:
        events.terminate()
        seen = events.communicate(timeout=10)[0]
    assert 0 <= seen.find(": session drop disconnected\n") < \
        seen.find(": session drop re-attached\n"), seen
    assert "re-attached at byte" in d.log(tail=None)
    # the page keeps working against the same process, through the same forward
    assert urllib.request.urlopen(url, timeout=10).read().decode() == before

    release.touch()
    s = wait_state(d, "drop", "exited")
    assert s["exit_status"] == 0 and s["opens"] == 1
    check_log_complete(s)
    time.sleep(0.5)
    assert opened.read_text().splitlines() == [url]   # the marker was not acted on again


def test_daemon_restart_reattaches_and_kill_leaves_no_survivor(sdaemon, sshd, opened,
                                                                tmp_path):
    d = sdaemon
    release, second_half = tmp_path / "release", tmp_path / "second-half"
    s = start(d, sshd, "lab", sys.executable, str(script(tmp_path, PROG)),
              str(release), str(second_half))
    (url,) = wait_opened(opened)
    d.wait_for(lambda: Path(s["log"]).read_bytes().endswith(b"/spl"),
               what="the first half of a marker")
    pid = s["pid"]
    tree = _descendants(pid) | {pid}
    before = urllib.request.urlopen(url, timeout=10).read().decode()

    assert d.stop() == 0
    assert all(_alive(p) for p in tree)             # a stopped daemon leaves it running
    saved = d.state_file.with_name("sessions.json")
    assert os.stat(saved).st_mode & 0o777 == 0o600
    assert [r["name"] for r in json.loads(saved.read_text())["sessions"]] == ["lab"]
    second_half.touch()                             # "it]" is printed while no one listens
    remote_log = Path(s["remote_dir"]) / "log"
    d.wait_for(lambda: b"/split]\n" in remote_log.read_bytes(),
               what="the second half printed while the daemon is stopped")
    d.start()

    s = wait_state(d, "lab", "running")
    assert s["pid"] == pid
    # the marker split at the restart is acted on once; the one before it not again
    lines = wait_opened(opened, 2)
    assert lines[0] == url and re.fullmatch(r"http://127\.0\.0\.1:\d+/split", lines[1]), lines
    # the forward made for the page before the restart is back
    assert urllib.request.urlopen(url, timeout=10).read().decode() == before
    d.wait_for(lambda: b"line 3\n" in Path(s["log"]).read_bytes(), what="lines after restart")

    tree |= _descendants(pid)
    r = d.ctl("kill", "lab")
    assert "lab: killed" in r.stdout
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.1)
    assert [p for p in tree if _alive(p)] == []
    s = sessions(d)["lab"]
    assert s["state"] == "killed"
    assert Path(s["log"]).read_bytes() == (Path(s["remote_dir"]) / "log").read_bytes()
    # every byte was scanned: a marker acted on again would have started by now; give its
    # browser launch a moment (a negative check cannot wait for a condition)
    time.sleep(0.5)
    assert len(opened.read_text().splitlines()) == 2


def test_a_crashed_daemon_reattaches_too(sdaemon, sshd, opened, tmp_path):
    """kill -9: no goodbye, the sessions file as last written; the next daemon takes up."""
    d = sdaemon
    release = tmp_path / "release"
    s = start(d, sshd, "crash", sys.executable, str(script(tmp_path, PROG)), str(release))
    (url,) = wait_opened(opened)
    d.wait_for(lambda: b"line 3\n" in Path(s["log"]).read_bytes(), what="some lines")
    d.kill9()
    assert _alive(s["pid"])
    time.sleep(0.5)
    d.start()
    wait_state(d, "crash", "running")
    release.touch()
    s = wait_state(d, "crash", "exited")
    assert s["exit_status"] == 0
    check_log_complete(s)
    time.sleep(0.5)
    assert opened.read_text().splitlines() == [url]


BIG = 64 * 1024 * 1024


def test_a_lost_local_log_is_fetched_again_without_reopening(sdaemon, sshd, opened,
                                                              tmp_path):
    """The local copy of a session's log deleted while the daemon was stopped: the next
    daemon fetches the whole log again from the server, and the marker it had acted on is
    not acted on again."""
    d = sdaemon
    release = tmp_path / "release"
    s = start(d, sshd, "relog", sys.executable, str(script(tmp_path, PROG)), str(release))
    (url,) = wait_opened(opened)
    d.wait_for(lambda: b"line 3\n" in Path(s["log"]).read_bytes(), what="some lines")
    assert d.stop() == 0
    Path(s["log"]).unlink()
    d.start()
    wait_state(d, "relog", "running")
    release.touch()
    s = wait_state(d, "relog", "exited")
    assert s["exit_status"] == 0
    check_log_complete(s)
    time.sleep(0.5)
    assert opened.read_text().splitlines() == [url]
    assert "fetching the rest again" in d.log()


def test_an_end_while_disconnected_is_shown_with_its_status(sdaemon, sshd, tmp_path):
    d = sdaemon
    release = tmp_path / "release"
    # after the release it writes 64 MiB at once: more than the follower started after the
    # reconnect passes on before it sees the end, so the rest is fetched afterwards
    s = start(d, sshd, "short", "sh", "-c", (
        f"echo started; while [ ! -e {release} ]; do sleep 0.05; done; "
        f"head -c {BIG} /dev/zero | tr '\\0' x; echo; echo bye; exit 5"))
    d.wait_for(lambda: b"started" in Path(s["log"]).read_bytes(), what="output")
    cut_connection(sshd)
    wait_state(d, "short", "disconnected")
    # no kill without a connection: said in one line, and the session is left as it is
    r = d.ctl("kill", "short", check=False)
    assert r.returncode == 1 and "keeps running on the server" in r.stderr, r
    assert len(r.stderr.strip().splitlines()) == 1
    release.touch()
    d.wait_for(lambda: (Path(s["remote_dir"]) / "status").exists(), what="the end")
    restore_connection(d, sshd)
    s = wait_state(d, "short", "exited")
    assert s["exit_status"] == 5
    local = Path(s["log"]).read_bytes()
    assert local == b"started\n" + b"x" * BIG + b"\nbye\n"
    assert local == (Path(s["remote_dir"]) / "log").read_bytes()
    assert "exit status 5" in d.ctl("sessions").stdout


# -- a compute node behind the server ----------------------------------------------------------

COMPUTE_PROG = textwrap.dedent("""
    import http.server, os, socket, socketserver, sys, threading, webbrowser
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = ("served on %s path %s" % (socket.gethostname(), self.path)).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    srv = socketserver.TCPServer(("0.0.0.0", 0), H)
    port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    webbrowser.open("http://127.0.0.1:%d/lab?token=t0k" % port)
    page = sys.argv[1]                  # Jupyter's redirect file, in the shared home
    target = "http://localhost:%d/tree?token=t0k" % port
    open(page, "w").write('<html><head><meta http-equiv="refresh" content="1;url=%s" />'
                          '</head><body><a href="%s">open</a></body></html>' % (target, target))
    webbrowser.open("file://" + page)
    threading.Event().wait(90)
""")


@pytest.mark.parametrize("mode", ["detached", "attached"])
def test_a_loopback_url_printed_on_a_compute_node_goes_to_that_node(netns_daemon, netns_sshd,
                                                                   opened, tmp_path, mode):
    """The login node is netns_sshd; the "compute node" a second namespace that only the
    login node reaches.  The program runs there as `srun` would put it, in its own UTS
    namespace whose host name is the node's address (so that the name the BROWSER helper
    reports is one the login node can connect to, as a cluster node's name is); it listens
    on all addresses and prints http://127.0.0.1:PORT/.  The same with `run --no-detach`,
    whose sessions get the same BROWSER helper."""
    d = with_recorder(netns_daemon, opened, tmp_path)
    try:
        compute_test(d, netns_sshd, opened, tmp_path,
                     ["--no-detach"] if mode == "attached" else [])
    finally:
        d.close()
        reap_detached(d)


def compute_test(d, netns_sshd, opened, tmp_path, options: list[str] = []) -> None:
    prog = script(tmp_path, COMPUTE_PROG)
    page = tmp_path / "jpserver-77-open.html"
    with compute_node(netns_sshd.netns) as (node, node_ip):
        inner = f"hostname {node_ip} && exec {sys.executable} {prog} {page}"
        d.ctl("run", netns_sshd.host, "--name", "srun", *options, "--", "ip", "netns", "exec",
              node, "unshare", "--uts", "sh", "-c", inner)
        urls = wait_opened(opened, 2)
        by_path = {u.split("/", 3)[3]: u for u in urls}
        assert set(by_path) == {"lab?token=t0k", "tree?token=t0k"}, urls
        for path, url in by_path.items():
            m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/.*", url)
            assert m, url
            body = urllib.request.urlopen(url, timeout=10).read().decode()
            assert body == f"served on {node_ip} path /{path}"
            fwd = d.forward(int(m.group(1)), netns_sshd.host)
            assert fwd["target"].startswith(f"{node_ip}:") and fwd["origin"] == "auto"
        assert f"was printed on {node_ip}: forwarding to that node" in d.log(tail=None)
        port = int(urls[0].split(":")[2].split("/")[0])
        remote_port = int(d.forward(port, netns_sshd.host)["target"].rsplit(":", 1)[1])
        # the same marker in what `tunnelctl watch` sees (the server's name is asked for)
        marker = f"OPEN_ON_LOCAL({node_ip})[http://localhost:{remote_port}/watched]\n"
        r = d.ctl("watch", netns_sshd.host, input=marker)
        assert r.stdout == marker
        # and a URL that names the node keeps working as it is
        d.ctl("open", netns_sshd.host, f"http://{node_ip}:{remote_port}/named")
        for path in ("watched", "named"):
            (url,) = [u for u in wait_opened(opened, 4) if u.endswith("/" + path)]
            body = urllib.request.urlopen(url, timeout=10).read().decode()
            assert body == f"served on {node_ip} path /{path}"
        d.ctl("kill", "srun")


def test_the_sessions_file_is_checked_when_taken_up(daemon, sshd):
    """Ended sessions are listed with their status; records that are malformed or name a
    directory outside ~/.tunneld/sessions are skipped; an unreadable file is set aside."""
    d = daemon
    saved = d.state_file.with_name("sessions.json")
    base = {"host": sshd.host, "command": "true", "detached": True, "remote_dir": None,
            "server": "x", "pid": 4242, "port": None, "log": "/etc/passwd",
            "started": time.time() - 60, "ended": None, "state": "running",
            "exit_status": None, "error": None, "opens": 0, "forwards": []}
    records = [
        dict(base, name="old", remote_id="old-1", ended=time.time() - 30, state="exited",
             exit_status=3),
        dict(base, name="evil", remote_id="../../etc"),            # not a session id
        dict(base, name="bad name", remote_id="x-1"),              # not a session name
        dict(base, name="extra", remote_id="x-2", unknown=1),      # a key it does not know
    ]
    assert d.stop() == 0
    saved.write_text(json.dumps({"version": 1, "sessions": records}))
    d.start()
    r = json.loads(d.ctl("sessions", "--json").stdout)["sessions"]
    assert [(s["name"], s["state"], s["exit_status"]) for s in r] == [("old", "exited", 3)]
    assert r[0]["log"] != "/etc/passwd"       # the daemon's own place for the log
    assert "exit status 3" in d.ctl("sessions").stdout
    assert "session evil cannot be taken up" in d.log()
    assert "skipped a malformed record" in d.log()

    assert d.stop() == 0
    saved.write_text("{not json")
    d.start()
    assert json.loads(d.ctl("sessions", "--json").stdout)["sessions"] == []
    assert "is unreadable" in d.log()
    assert list(saved.parent.glob("sessions.json.corrupt-*"))


def test_a_forgotten_session_directory_is_removed_on_the_server(sdaemon, sshd):
    """Reusing an ended session's name forgets it: its directory on the server goes (and
    nothing else there)."""
    d = sdaemon
    d.ctl("run", sshd.host, "--name", "again", "--follow", "--", "echo", "first")
    first = Path(sessions(d)["again"]["remote_dir"])
    assert (first / "log").read_text() == "first\n"
    d.ctl("run", sshd.host, "--name", "again", "--follow", "--", "echo", "second")
    s = sessions(d)["again"]
    second = Path(s["remote_dir"])
    assert second != first and (second / "log").read_text() == "second\n"
    d.wait_for(lambda: not first.exists(), what="the old directory to go")
    assert second.exists() and first.parent.is_dir()
