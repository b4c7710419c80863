"""`tunnelctl run --sock auto`: the program listens on a Unix socket in a private directory on
the server (nobody else on a shared login node can connect), tunneld forwards a local port to
it once it listens, lists and opens its URL, and removes socket and directory at the end.
Real sshd, real jupyter-server (``--sock``), another real uid on the server."""

from __future__ import annotations

import json
import re
import shutil
import stat
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from test_e2e_printed import auto_forwards, wait_urls
from test_e2e_sessions import reap_detached, script, session, wait_opened, with_recorder
from test_e2e_unixsock import _refused, other_user  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(150)

UNIX_HTTP = textwrap.dedent("""
    import http.server, os, socketserver
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = ("private page " + self.path).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    class S(socketserver.UnixStreamServer):
        def get_request(self):
            conn, _ = super().get_request()
            return conn, ("unix", 0)
    srv = S(os.environ["SOCK"], H)
    print("listening on", os.environ["SOCK"], flush=True)
    srv.serve_forever()
""")


@pytest.fixture
def opened(tmp_path):
    return tmp_path / "opened.txt"


@pytest.fixture
def runtime_dir(sshd):
    """The server's sessions get a short HOME and ``XDG_RUNTIME_DIR``, a 0700 directory (as
    pam_systemd's /run/user/UID); the fixture's own HOME is too long for a socket path.
    Yields (home, runtime dir)."""
    top = Path(tempfile.mkdtemp(prefix="td-r", dir="/tmp"))
    try:
        home, xdg = top / "h", top / "x"
        home.mkdir()
        xdg.mkdir(mode=0o700)
        line = f"SetEnv HOME={sshd.server_home}"
        text = sshd.sshd_config.read_text()
        assert line in text
        sshd.sshd_config.write_text(text.replace(line, f"SetEnv HOME={home} "
                                                       f"XDG_RUNTIME_DIR={xdg}"))
        sshd.start()
        yield home, xdg
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_a_home_too_long_for_a_socket_path_is_a_clear_error(daemon, sshd):
    """The fixture's HOME makes ~/.tunneld/sock/NAME.XXXXXX/web.sock longer than 107 bytes:
    `run` says so, starts nothing and leaves no directory."""
    r = daemon.ctl("run", sshd.host, "--sock", "auto", "--name", "toolong", "--", "true",
                   check=False)
    assert r.returncode == 1 and "at most 107" in r.stderr and "--port" in r.stderr, r.stderr
    assert json.loads(daemon.ctl("sessions", "--json").stdout)["sessions"] == []
    assert list((sshd.server_home / ".tunneld" / "sock").iterdir()) == []


@pytest.mark.parametrize("mode", [[], ["--no-detach"]], ids=["detached", "attached"])
def test_a_private_socket_is_made_forwarded_and_removed(daemon, sshd, opened, tmp_path,
                                                         runtime_dir, mode):
    d = with_recorder(daemon, opened, tmp_path)
    try:
        prog = script(tmp_path, UNIX_HTTP)
        r = d.ctl("run", sshd.host, *mode, "--sock", "auto", "--name", "priv", "--",
                  sys.executable, str(prog), "{sock}")
        m = re.search(r"socket (/\S+): forwarded", r.stderr)
        assert m, r.stderr
        sock = Path(m.group(1))
        # a detached session outlives its login: not in the runtime directory (no linger)
        home, xdg = runtime_dir
        base = home / ".tunneld" / "sock" if not mode else xdg / "tunneld"
        assert sock.parent.parent == base and sock.name == "web.sock", sock
        for p in (base, sock.parent):
            assert stat.S_IMODE(p.stat().st_mode) == 0o700
        s = session(d, "priv")
        assert s["sock"] == str(sock) and s["words"][-1] == "{sock}"   # as typed
        (u,) = wait_urls(d, "priv")
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", u["local"]), u
        assert urllib.request.urlopen(u["local"] + "x?y", timeout=20).read() == \
            b"private page /x?y"
        (fwd,) = auto_forwards(d, sshd.host)
        assert fwd["target_path"] == str(sock) and not opened.exists()
        d.ctl("open", "priv")
        assert wait_opened(opened) == [u["local"]]
        d.ctl("kill", "priv")
        d.wait_for(lambda: not sock.parent.exists(), what="the socket directory removed")
        d.wait_for(lambda: not auto_forwards(d, sshd.host), what="the forward removed")
    finally:
        d.close()
        reap_detached(d)


@pytest.mark.timeout(200)
def test_jupyter_on_a_private_socket_with_its_token(daemon, sshd, opened, tmp_path,
                                                    other_user, free_port,  # noqa: F811
                                                    runtime_dir):
    """jupyter-server ``--sock {sock}`` prints ``http+unix://…?token=…``: that URL (not the
    token-less one it also prints) is listed at its local end and serves the API; another
    uid on the server cannot connect to the socket."""
    d = with_recorder(daemon, opened, tmp_path)
    try:
        (tmp_path / "nb").mkdir()
        d.ctl("run", sshd.host, "--sock", "auto", "--name", "lab", "--", sys.executable, "-m",
              "jupyter_server", "--no-browser", "--allow-root", "--sock", "{sock}",
              f"--ServerApp.root_dir={tmp_path / 'nb'}")
        sock = session(d, "lab")["sock"]
        deadline = time.monotonic() + 90
        while not any("token=" in u["local"] for u in session(d, "lab")["urls"]):
            assert time.monotonic() < deadline, (session(d, "lab"), d.ctl("logs", "lab").stdout)
            time.sleep(0.2)
        d.wait_for(lambda: "tunnel to the instance" in d.ctl("logs", "lab").stdout,
                   what="all of jupyter's lines")
        urls = session(d, "lab")["urls"]
        newest = urls[-1]
        m = re.fullmatch(r"(http://127\.0\.0\.1:\d+)/\?token=([0-9a-f]+)", newest["local"])
        assert m and newest["remote"].startswith("http+unix://%2F"), urls
        assert len(urls) <= 2 and len(auto_forwards(d, sshd.host)) == 1, urls
        api = f"{m.group(1)}/api/status?token={m.group(2)}"
        assert "started" in json.loads(urllib.request.urlopen(api, timeout=20).read())
        # the socket is out of reach of another user of the server
        port = free_port()
        d.ctl("add", "otheruid", f"{port}:{sock}")
        err = _refused(d, "otheruid", port, sock)
        assert "not yours to reach" in err, err
        d.ctl("kill", "lab")
        d.wait_for(lambda: not Path(sock).parent.exists(), what="the socket directory removed")
    finally:
        d.close()
        reap_detached(d)
