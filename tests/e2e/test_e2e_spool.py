"""The browser-open spool end to end, through the real sshd: a program started outside tunneld
(a plain `ssh`, a process on the server, one on a compute node) reaches the local browser
through ``~/.tunneld/spool``; an old entry is listed, not opened, and opened on request; a
reconnect and a daemon restart neither repeat nor lose entries; rotation; the message when
the spool cannot be written; `setup-remote` shows, applies once, backs up.

The server's HOME is the test sshd's ``server_home`` (on this machine: the "shared home").
"""

from __future__ import annotations

import http.server
import json
import os
import pwd
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from test_e2e_detached import COMPUTE_PROG, compute_node
from test_e2e_sessions import script, wait_opened, with_recorder

pytestmark = pytest.mark.timeout(180)

HELPER = ".tunneld/bin/open-on-local"


@pytest.fixture
def opened(tmp_path):
    return tmp_path / "opened.txt"


@pytest.fixture
def web():
    """A web server on the server side (127.0.0.2:PORT), answering with its path."""
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"path {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    srv = socketserver.ThreadingTCPServer(("127.0.0.2", 0), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def opens(d) -> dict:
    return json.loads(d.ctl("opens", "--json").stdout)


def wait_requests(d, n: int, timeout: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        reqs = [r for r in opens(d)["requests"] if r["outcome"] != "pending"]
        if len(reqs) >= n:
            return reqs
        assert time.monotonic() < deadline, (opens(d), d.log())
        time.sleep(0.1)


def spool_state(d, host: str) -> str:
    for s in opens(d)["spools"]:
        if s["host"] == host:
            return s["state"]
    return ""


def connected(d, sshd, opened, tmp_path, extra: str = ""):
    """The daemon with the recording browser, the helper installed with setup-remote
    --apply, and the host connected (a forward keeps it so): its spool is followed."""
    d = with_recorder(d, opened, tmp_path, extra)
    r = d.ctl("setup-remote", sshd.host, "--apply")
    assert "the BROWSER helper is installed" in r.stdout, r.stdout
    d.ctl("add", sshd.host, str(free_port()))
    d.wait_for(lambda: spool_state(d, sshd.host).startswith(("following", "waiting")),
               what="the spool reader")
    return d


def plain_ssh(sshd, command: str) -> subprocess.CompletedProcess[str]:
    """`ssh HOST COMMAND` as a person types it (not through tunneld)."""
    return subprocess.run(["ssh", "-F", str(sshd.ssh_config), sshd.host, command],
                          env=sshd.env, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def on_server(sshd, url: str) -> subprocess.CompletedProcess[str]:
    """The helper run by a process on the server that tunneld did not start (cron, tmux)."""
    return subprocess.run([str(sshd.server_home / HELPER), url],
                          env={"HOME": str(sshd.server_home), "PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=30)


def test_a_program_started_with_plain_ssh_reaches_the_local_browser(daemon, sshd, opened,
                                                                     tmp_path, web):
    d = connected(daemon, sshd, opened, tmp_path)
    try:
        r = plain_ssh(sshd, f"$HOME/{HELPER} http://127.0.0.2:{web}/x?y=1")
        assert r.returncode == 0 and "OPEN_ON_LOCAL(" in r.stdout, r
        (url,) = wait_opened(opened, 1, timeout=10)
        assert url.startswith("http://127.0.0.1:") and url.endswith("/x?y=1")
        assert urllib.request.urlopen(url, timeout=10).read() == b"path /x?y=1"
        (req,) = wait_requests(d, 1)
        assert req["source"] == "spool" and req["outcome"] == "opened"
        assert req["url"] == f"http://127.0.0.2:{web}/x?y=1" and req["local"] == url
        assert req["age"] is not None and req["age"] <= 5 and req["node"]
        # text form: the request with its outcome, and how the spool is followed
        text = d.ctl("opens").stdout
        assert "spool" in text and "opened" in text and f"spool of {sshd.host}: following" \
            in text
        # the server's spool is private
        sp = sshd.server_home / ".tunneld" / "spool"
        assert sp.stat().st_mode & 0o777 == 0o700
        assert (sp / "opens").stat().st_mode & 0o777 == 0o600
        # a second one, from a program on the server that tunneld did not start
        on_server(sshd, f"http://127.0.0.2:{web}/cron")
        urls = wait_opened(opened, 2, timeout=10)
        assert urls[1].endswith("/cron")
    finally:
        d.close()


def test_an_old_entry_is_listed_not_opened_and_opens_on_request(daemon, sshd, opened,
                                                                 tmp_path, web):
    sp = sshd.server_home / ".tunneld" / "spool"
    sp.mkdir(parents=True, mode=0o700)
    (sp / "opens").write_text(
        f"{int(time.time()) - 3 * 3600}\t\thttp://127.0.0.2:{web}/yesterday\n")
    d = connected(daemon, sshd, opened, tmp_path)
    try:
        (req,) = wait_requests(d, 1)
        assert req["outcome"] == "old" and 3 * 3600 - 5 <= req["age"] <= 3 * 3600 + 60
        assert "older than open_max_age (3h 0m > 2m)" in req["reason"]
        assert not opened.exists()
        # the list says what to do; unknown numbers name the range
        r = d.ctl("open", "--request", str(req["n"] + 5), check=False)
        assert r.returncode == 1
        assert f"no request {req['n'] + 5}: the list holds requests {req['n']} to " \
               f"{req['n']}" in r.stderr
        r = d.ctl("open", "--request", str(req["n"]))
        assert r.stdout.startswith(f"request {req['n']}: opened http://127.0.0.1:")
        (url,) = wait_opened(opened, 1)
        assert urllib.request.urlopen(url, timeout=10).read() == b"path /yesterday"
        (req,) = wait_requests(d, 1)
        assert req["outcome"] == "opened"
        # open_max_age is per host too, and applied by reload
        d.config_file.write_text(d.config_file.read_text() +
                                 f"\n[hosts.{sshd.host}]\nopen_max_age = 5\n")
        d.ctl("reload")
        with open(sp / "opens", "a") as f:   # 30 s old: the default would open it
            f.write(f"{int(time.time()) - 30}\t\thttp://127.0.0.2:{web}/now\n")
        reqs = wait_requests(d, 2)
        assert reqs[1]["outcome"] == "old" and reqs[1]["url"].endswith("/now")
        assert "> 5s" in reqs[1]["reason"]
        # a bad value is a clear error
        d.config_file.write_text(d.config_file.read_text().replace("open_max_age = 5",
                                                                   "open_max_age = -1"))
        r = d.ctl("reload", check=False)
        assert r.returncode == 1 and "open_max_age" in r.stderr
    finally:
        d.close()


def test_reconnects_and_restarts_neither_repeat_nor_lose_entries(daemon, sshd, opened,
                                                                 tmp_path, web):
    d = connected(daemon, sshd, opened, tmp_path)
    try:
        on_server(sshd, f"http://127.0.0.2:{web}/one")
        wait_opened(opened, 1)
        # the connection drops; a request made meanwhile is opened once it is back
        sshd.kill_connections()
        on_server(sshd, f"http://127.0.0.2:{web}/two")
        wait_opened(opened, 2, timeout=30)
        # the daemon restarts; a request made while it was down is opened after it
        assert d.stop() == 0
        on_server(sshd, f"http://127.0.0.2:{web}/three")
        d.start()
        wait_opened(opened, 3, timeout=30)
        on_server(sshd, f"http://127.0.0.2:{web}/four")
        wait_opened(opened, 4, timeout=15)
        d.wait_for(lambda: len(wait_requests(d, 4)) == 4 and
                   spool_state(d, sshd.host).startswith("following"), what="the list")
        time.sleep(2.5)   # two more polls of the reader: nothing is seen twice
        paths = [u.rsplit("/", 1)[1] for u in opened.read_text().splitlines()]
        assert paths == ["one", "two", "three", "four"]
        assert [r["url"].rsplit("/", 1)[1] for r in opens(d)["requests"]] == paths
    finally:
        d.close()


def test_a_rotated_spool_loses_and_repeats_nothing(daemon, sshd, opened, tmp_path, web):
    d = connected(daemon, sshd, opened, tmp_path)
    try:
        sp = sshd.server_home / ".tunneld" / "spool"
        on_server(sshd, f"http://127.0.0.2:{web}/before")
        wait_opened(opened, 1)
        # a backlog of old requests past the limit (a laptop away for a week), then a new one
        old = int(time.time()) - 86400
        line = f"{old}\tlogin1\thttp://127.0.0.2:{web}/old-" + "x" * 60
        with open(sp / "opens", "a") as f:
            f.write("".join(f"{line}{i}\n" for i in range(256 * 1024 // len(line) + 10)))
        on_server(sshd, f"http://127.0.0.2:{web}/after")
        assert (sp / "opens.1").exists() and not (sp / "opens").exists()
        on_server(sshd, f"http://127.0.0.2:{web}/next")
        urls = wait_opened(opened, 3, timeout=30)   # (the last two are acted on at once)
        assert sorted(u.rsplit("/", 1)[1] for u in urls) == ["after", "before", "next"]
        d.wait_for(lambda: opens(d)["requests"][-1]["url"].endswith("/next"), what="next")
        reqs = opens(d)["requests"]
        assert len(reqs) == 100   # bounded
        assert [r["outcome"] for r in reqs[-2:]] == ["opened", "opened"]
        assert {r["outcome"] for r in reqs[:-2]} == {"old"}
        assert "older than open_max_age: listed" in d.log(tail=None)
    finally:
        d.close()


def test_a_spool_that_cannot_be_written_is_said_and_the_marker_printed(daemon, sshd, opened,
                                                                       tmp_path):
    d = connected(daemon, sshd, opened, tmp_path)
    try:
        sp = sshd.server_home / ".tunneld" / "spool"
        sp.mkdir(exist_ok=True)
        sp.rename(sp.with_name("spool.away"))
        sp.write_text("a file where the directory should be")
        r = plain_ssh(sshd, f"$HOME/{HELPER} http://127.0.0.2:1/x")
        assert r.returncode == 0 and r.stdout.startswith("OPEN_ON_LOCAL(")
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith(f"open-on-local: could not add it to tunneld's spool {sp}/opens")
        assert "tunneld sees this request only in this output" in line
    finally:
        d.close()


def test_setup_remote_prints_applies_once_and_backs_up(daemon, sshd, tmp_path):
    # sshd sets the remote $SHELL from the password database, not from this process's $SHELL
    # (CI runs with none)
    shell = os.path.basename(pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh")
    rc = {"bash": ".bashrc", "zsh": ".zshrc"}.get(shell, ".profile")
    start_file = sshd.server_home / rc
    start_file.write_text("alias ll='ls -l'\n")
    r = daemon.ctl("setup-remote", sshd.host)
    assert "export BROWSER=$HOME/.tunneld/bin/open-on-local" in r.stdout
    assert str(start_file) in r.stdout and "nothing was changed" in r.stdout
    assert start_file.read_text() == "alias ll='ls -l'\n"
    assert not (sshd.server_home / ".tunneld").exists()
    r = daemon.ctl("setup-remote", sshd.host, "--apply")
    assert f"+++ {start_file}" in r.stdout and "+export BROWSER=$HOME/.tunneld/bin/" \
        "open-on-local" in r.stdout
    (backup,) = sshd.server_home.glob(f"{rc}.tunneld-backup-*")
    assert backup.read_text() == "alias ll='ls -l'\n" and f"backup: {backup}" in r.stdout
    assert (sshd.server_home / HELPER).stat().st_mode & 0o777 == 0o700
    r = daemon.ctl("setup-remote", sshd.host, "--apply")
    assert "already set up" in r.stdout and "+++" not in r.stdout
    assert start_file.read_text().count("open-on-local") == 1
    assert len(list(sshd.server_home.glob(f"{rc}.tunneld-backup-*"))) == 1
    # a login through that file gets the helper as BROWSER
    r = plain_ssh(sshd, f". $HOME/{rc}; echo $BROWSER")
    assert r.stdout.strip() == str(sshd.server_home / HELPER)
    # another file, given
    r = daemon.ctl("setup-remote", sshd.host, "--apply", "--shell-file", "~/.profile-x")
    assert (sshd.server_home / ".profile-x").read_text().count("open-on-local") == 1
    # refusals: a bad file, a host that does not answer
    r = daemon.ctl("setup-remote", sshd.host, "--shell-file", "a\nb", check=False)
    assert r.returncode == 1 and "--shell-file" in r.stderr
    sshd.add_host_alias("nowhere", HostName="127.0.0.1", Port=str(free_port()))
    r = daemon.ctl("setup-remote", "nowhere", "--no-prompt", check=False)
    assert r.returncode == 1 and "nowhere" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_compute_nodes_request_in_the_shared_spool_goes_to_that_node(
        netns_daemon, netns_sshd, opened, tmp_path):
    """The program runs on a "compute node" (its own namespace, reached only from the login
    node) as a batch job would: not started by tunneld; it finds the helper in the shared
    home and its request through the spool is forwarded to the node."""
    d = connected(netns_daemon, netns_sshd, opened, tmp_path)
    try:
        prog = script(tmp_path, COMPUTE_PROG)
        page = tmp_path / "jpserver-88-open.html"
        with compute_node(netns_sshd.netns) as (node, node_ip):
            env = {"HOME": str(netns_sshd.server_home), "PATH": os.environ["PATH"],
                   "BROWSER": str(netns_sshd.server_home / HELPER)}
            job = subprocess.Popen(
                ["ip", "netns", "exec", node, "unshare", "--uts", "sh", "-c",
                 f"hostname {node_ip} && exec {sys.executable} {prog} {page}"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                urls = wait_opened(opened, 2, timeout=30)
                by_path = {u.split("/", 3)[3]: u for u in urls}
                assert set(by_path) == {"lab?token=t0k", "tree?token=t0k"}, urls
                for path, url in by_path.items():
                    body = urllib.request.urlopen(url, timeout=10).read().decode()
                    assert body == f"served on {node_ip} path /{path}"
                reqs = wait_requests(d, 2)
                assert {r["node"] for r in reqs} == {node_ip}
                assert all(r["source"] == "spool" and r["outcome"] == "opened" for r in reqs)
            finally:
                job.kill()
                job.wait()
    finally:
        d.close()
