"""URLs that programs print, end to end: the real jupyter-server with ``--no-browser`` and a real
Flask app run as sessions through the real sshd; their printed address is forwarded, listed
(`sessions`, `open SESSION --list`), served through the tunnel, opened on request or by
``printed_urls = "open"``, and goes with the session."""

from __future__ import annotations

import json
import re
import socket
import sys
import textwrap
import time
import urllib.request

import pytest
from test_e2e_sessions import reap_detached, script, session, wait_opened, with_recorder

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def opened(tmp_path):
    return tmp_path / "opened.txt"


def free_port(host: str = "127.0.0.2") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_urls(d, name: str, n: int = 1, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        s = session(d, name)
        if len(s["urls"]) >= n:
            return s["urls"]
        assert s["state"] in ("starting", "running"), (s, d.ctl("logs", name).stdout)
        assert time.monotonic() < deadline, f"{name} listed {s['urls']}"
        time.sleep(0.1)


def auto_forwards(d, host: str) -> list[dict]:
    for h in json.loads(d.ctl("list", "--json").stdout)["hosts"]:
        if h["name"] == host:
            return [f for f in h["forwards"] if f["origin"] == "auto"]
    return []


@pytest.mark.timeout(180)
def test_jupyter_servers_token_url_is_forwarded_listed_and_served(daemon, sshd, opened,
                                                                   tmp_path):
    d = with_recorder(daemon, opened, tmp_path)
    try:
        port = free_port()
        (tmp_path / "nb").mkdir()
        d.ctl("run", sshd.host, "--name", "lab", "--", sys.executable, "-m", "jupyter_server",
              "--no-browser", "--allow-root", "--ip=127.0.0.2", f"--port={port}",
              f"--ServerApp.root_dir={tmp_path / 'nb'}")
        (u,) = wait_urls(d, "lab")
        m = re.fullmatch(rf"http://127\.0\.0\.2:{port}/\?token=([0-9a-f]{{16,}})", u["remote"])
        assert m, u
        token = m.group(1)
        lm = re.fullmatch(rf"http://127\.0\.0\.1:(\d+)/\?token={token}", u["local"])
        assert lm, u
        # Jupyter prints its URLs twice and a 127.0.0.1 variant: one forward, one entry
        d.wait_for(lambda: d.ctl("logs", "lab").stdout.count(token) >= 4, what="all lines")
        assert len(session(d, "lab")["urls"]) == 1
        (fwd,) = auto_forwards(d, sshd.host)
        assert fwd["target"] == f"127.0.0.2:{port}" and u["forward"] == fwd["spec"]
        # served through the tunnel, the token works
        local_port = int(lm.group(1))
        api = f"http://127.0.0.1:{local_port}/api/status?token={token}"
        status = json.loads(urllib.request.urlopen(api, timeout=20).read())
        assert "started" in status
        # the default (printed_urls = "forward") lists and does not open
        assert not opened.exists()
        table = d.ctl("sessions").stdout
        assert "URL" in table.splitlines()[0]
        r = d.ctl("open", "lab", "--list")
        assert r.stdout.startswith(u["local"] + "  (remote " + u["remote"]), r.stdout
        r = d.ctl("open", "lab")
        assert wait_opened(opened) == [u["local"]] and "opened" in r.stdout
        # tokens are kept in the JSON, never written to the log
        assert token not in d.log(tail=None)
        # a daemon restart takes the session up with its URL and forward
        assert d.stop() == 0
        d.start()
        d.wait_for(lambda: auto_forwards(d, sshd.host), what="the forward restored")
        assert session(d, "lab")["urls"] == [u]
        assert json.loads(urllib.request.urlopen(api, timeout=20).read())["started"]
        # the forward goes with the session
        d.ctl("kill", "lab")
        d.wait_for(lambda: not auto_forwards(d, sshd.host), what="the forward removed")
        r = d.ctl("open", "lab", check=False)
        assert r.returncode == 1 and "has ended" in r.stderr, r.stderr
    finally:
        d.close()
        reap_detached(d)


FLASK_APP = textwrap.dedent("""
    import sys
    from flask import Flask
    app = Flask(__name__)
    @app.route("/")
    def index():
        return "firefly-like page"
    app.run(host="0.0.0.0", port=int(sys.argv[1]))
""")


@pytest.mark.parametrize("mode", ["open", "forward", "ignore"])
def test_a_flask_apps_running_on_line_follows_printed_urls(daemon, sshd, opened, tmp_path,
                                                          mode):
    """Flask prints " * Running on http://127.0.0.1:PORT" and its LAN address: one forward
    (the first URL of the port); `printed_urls` of the host decides what else happens."""
    d = with_recorder(daemon, opened, tmp_path,
                      f'\n[hosts.{json.dumps(sshd.host)}]\nprinted_urls = "{mode}"\n')
    try:
        port = free_port("0.0.0.0")
        prog = script(tmp_path, FLASK_APP)
        d.ctl("run", sshd.host, "--no-detach", "--name", "web", "--", sys.executable,
              str(prog), str(port))
        d.wait_for(lambda: "Running on" in d.ctl("logs", "web").stdout, what="flask's lines")
        if mode == "ignore":
            d.wait_for(lambda: "CTRL+C" in d.ctl("logs", "web").stdout, what="all its lines")
            time.sleep(0.5)   # (what would have been forwarded by now was not)
            assert session(d, "web")["urls"] == [] and auto_forwards(d, sshd.host) == []
            return
        (u,) = wait_urls(d, "web")
        assert u["remote"] == f"http://127.0.0.1:{port}", u
        body = urllib.request.urlopen(u["local"], timeout=20).read()
        assert body == b"firefly-like page"
        if mode == "open":
            assert wait_opened(opened) == [u["local"]]
        else:
            assert not opened.exists()
        assert len(auto_forwards(d, sshd.host)) == 1
        d.ctl("kill", "web")
        d.wait_for(lambda: not auto_forwards(d, sshd.host), what="the forward removed")
    finally:
        d.ctl("kill", "web", check=False)


def test_a_loopback_url_of_another_users_port_is_not_forwarded(daemon, sshd, opened,
                                                                tmp_path):
    """On a shared login node a program on a compute node that prints
    ``http://127.0.0.1:PORT/`` must not get us forwarded to whoever listens on the login
    node's PORT: another uid's listener (and a port nobody listens on) is refused, said in
    the log; our own listener on the same kind of URL is taken."""
    import shutil
    import subprocess
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv is needed (util-linux; .ci/run installs it)")
    d = with_recorder(daemon, opened, tmp_path)
    theirs, nobody = free_port(), free_port()
    other = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
         "http.server", str(theirs), "--bind", "127.0.0.2", "--directory", "/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.2", theirs), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the other user's server did not start"
                time.sleep(0.05)
        code = (f"print('http://127.0.0.2:{theirs}/lab?token=x'); "
                f"print('http://localhost:{nobody}/'); import time; time.sleep(60)")
        # (no -u: a session's Python prints unbuffered, PYTHONUNBUFFERED=1, as on a terminal)
        d.ctl("run", sshd.host, "--name", "srun", "--", sys.executable, "-c", code)
        d.wait_for(lambda: "belongs to another user (uid 65534)" in d.log(tail=None),
                   what="the refusal of the other user's port")
        d.wait_for(lambda: f"nothing of yours listens on port {nobody}" in d.log(tail=None),
                   what="the refusal of a port nobody listens on")
        assert session(d, "srun")["urls"] == [] and auto_forwards(d, sshd.host) == []
        assert f"printed http://127.0.0.2:{theirs}/lab?token=…, but" in d.log(tail=None)
    finally:
        other.kill()
        other.wait()
        d.ctl("kill", "srun", check=False)
        d.close()
        reap_detached(d)
