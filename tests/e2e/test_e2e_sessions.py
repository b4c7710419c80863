"""Sessions and browser-open markers end to end: `tunnelctl run/sessions/logs/kill/open/watch`.

The "browser" is a recording command set in config.toml: it appends each URL it is given to a
file, so a test sees exactly what would have been opened.  Remote programs run on the same
machine through the real sshd; they serve on 127.0.0.2 so that the server's address is not the
client's 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(90)

SERVE_AND_OPEN = textwrap.dedent("""
    import http.server, socketserver, sys, threading, webbrowser
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = ("hello from the server, path " + self.path).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    srv = socketserver.TCPServer(("127.0.0.2", 0), H)
    port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("serving on", port, flush=True)
    webbrowser.open_new("http://127.0.0.2:%d/x?y=1#z" % port)
    sys.stdout.flush()
    threading.Event().wait(float(sys.argv[1]) if len(sys.argv) > 1 else 60)
""")


@pytest.fixture
def opened(tmp_path):
    """Path of the file the recording browser writes, one URL per line."""
    return tmp_path / "opened.txt"


def with_recorder(daemon, opened: Path, tmp_path: Path, extra: str = ""):
    """Restart ``daemon`` with the recording browser configured (and ``extra`` TOML lines
    after ``[defaults]``'s)."""
    daemon.config_file.parent.mkdir(parents=True, exist_ok=True)
    recorder = tmp_path / "record.py"
    recorder.write_text("import sys\nopen(%r, 'a').write(sys.argv[1] + '\\n')\n" % str(opened))
    daemon.config_file.write_text(
        "[defaults]\n"
        f"browser = [{json.dumps(sys.executable)}, {json.dumps(str(recorder))}, \"%s\"]\n"
        "ready_timeout = 20\n" + extra)
    assert daemon.stop() == 0
    daemon.start()
    return daemon


def reap_detached(d) -> None:
    """Kill what the daemon's detached sessions left running on the server (this machine)
    and remove their directories there."""
    saved = d.state_file.with_name("sessions.json")
    try:
        records = json.loads(saved.read_text())["sessions"]
    except (OSError, ValueError, KeyError):
        return
    for rec in records:
        where = rec.get("remote_dir")
        if not where or "/.tunneld/sessions/" not in where:
            continue
        path = Path(where)
        try:
            if not (path / "status").exists():
                os.killpg(int((path / "pid").read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sdaemon(daemon, opened, tmp_path):
    """The daemon with the recording browser configured."""
    yield with_recorder(daemon, opened, tmp_path)
    daemon.close()
    reap_detached(daemon)


@pytest.fixture
def ndaemon(netns_daemon, opened, tmp_path):
    """The same, against an sshd in its own network namespace (its own loopback)."""
    yield with_recorder(netns_daemon, opened, tmp_path)
    netns_daemon.close()
    reap_detached(netns_daemon)


def wait_opened(opened: Path, n: int = 1, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if opened.exists():
            lines = opened.read_text().splitlines()
            if len(lines) >= n:
                return lines
        time.sleep(0.05)
    raise AssertionError(f"expected {n} opened URL(s), got "
                         f"{opened.read_text() if opened.exists() else 'none'}")


def script(tmp_path: Path, text: str, name: str = "prog.py") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def session(d, name: str) -> dict:
    for s in json.loads(d.ctl("sessions", "--json").stdout)["sessions"]:
        if s["name"] == name:
            return s
    raise AssertionError(f"no session {name}")


def test_run_webbrowser_open_is_forwarded_and_opened(sdaemon, sshd, opened, tmp_path):
    d = sdaemon
    prog = script(tmp_path, SERVE_AND_OPEN)
    r = d.ctl("run", sshd.host, "--name", "web", "--", sys.executable, str(prog))
    assert r.stdout.strip() == "web"
    (url,) = wait_opened(opened)
    m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/x\?y=1#z", url)
    assert m, url
    # the page is served through the tunnel
    body = urllib.request.urlopen(url.split("#")[0], timeout=10).read().decode()
    assert body == "hello from the server, path /x?y=1"
    # the forward made for it is marked automatic and is not saved
    fwd = d.forward(int(m.group(1)))
    assert fwd["origin"] == "auto" and fwd["target"].startswith("127.0.0.2:")
    assert not d.state_file.exists() or sshd.host not in d.state_file.read_text()
    s = session(d, "web")
    assert s["state"] == "running" and s["pid"] and s["opens"] == 1
    logs = d.ctl("logs", "web").stdout
    assert "serving on" in logs
    # the BROWSER helper names the host it ran on
    assert re.search(r"OPEN_ON_LOCAL\([A-Za-z0-9_.-]+\)\[http://127\.0\.0\.2:", logs), logs
    assert "tunneld-pid" not in logs
    assert os.stat(s["log"]).st_mode & 0o777 == 0o600
    d.ctl("kill", "web")
    assert session(d, "web")["state"] == "killed"


def test_existing_forward_is_reused_and_dedup(sdaemon, sshd, opened, echo_server, free_port):
    d = sdaemon
    host, port = echo_server()
    local = free_port()
    d.ctl("add", sshd.host, f"{local}:{host}:{port}")
    r = d.ctl("open", sshd.host, f"http://{host}:{port}/a?token=secret123")
    assert f"http://127.0.0.1:{local}/a?token=secret123" in r.stdout
    assert wait_opened(opened) == [f"http://127.0.0.1:{local}/a?token=secret123"]
    assert len(d.host()["forwards"]) == 1  # no new forward
    r = d.ctl("open", sshd.host, f"http://{host}:{port}/a?token=secret123")
    assert "not opened again" in r.stdout
    time.sleep(0.5)
    assert len(opened.read_text().splitlines()) == 1
    assert "secret123" not in d.log(tail=None)  # tokens are redacted in the log


@pytest.mark.parametrize("url,fragment", [
    ("file:///etc/passwd", "file"),
    ("javascript:alert(1)", "javascript"),
    ("data:text/html,hi", "data"),
    ("vscode://open?x", "vscode"),
    ("http://user:pw@localhost:8080/", "credentials"),
])
def test_refused_schemes_and_urls(sdaemon, sshd, opened, url, fragment, free_port,
                                  echo_server):
    d = sdaemon
    d.ctl("add", sshd.host, f"{free_port()}:127.0.0.2:{echo_server()[1]}")
    r = d.ctl("open", sshd.host, url, check=False)
    assert r.returncode == 1
    assert fragment in r.stderr.lower()
    assert not opened.exists()
    assert "refused to open" in d.log()


def test_watch_with_markers_split_across_chunks(sdaemon, sshd, opened, echo_server):
    d = sdaemon
    host, port = echo_server()
    stream = (b"some output\n\x1b[32mOPEN_ON_LOCAL[\x1b[0mhttp://" + host.encode() +
              b":%d/split?q=1\x1b[0m]\r\nmore \xff binary\n" % port)
    proc = subprocess.Popen([sys.executable, "-m", "tunnelctl", "watch", sshd.host],
                            env=d.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None
    for i in range(0, len(stream), 3):  # three bytes at a time, with pauses
        proc.stdin.write(stream[i:i + 3])
        proc.stdin.flush()
        time.sleep(0.005)
    proc.stdin.close()
    out = proc.stdout.read()  # type: ignore[union-attr]
    err = proc.stderr.read()  # type: ignore[union-attr]
    proc.wait(60)
    assert proc.returncode == 0, err
    assert out == stream  # copied unchanged, byte for byte
    (url,) = wait_opened(opened)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/split\?q=1", url)


@pytest.mark.timeout(120)
def test_port_auto_and_kill_of_a_process_tree(sdaemon, sshd, opened, tmp_path):
    d = sdaemon
    # a server on the port tunneld picked, plus a child and a grandchild that try to survive
    prog = script(tmp_path, textwrap.dedent("""
        import os, subprocess, sys, time, http.server, socketserver, threading
        port = int(os.environ["PORT"])
        assert sys.argv[1] == str(port), (sys.argv, port)
        kids = [subprocess.Popen([sys.executable, "-c",
                 "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                 "subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(300)']);"
                 "time.sleep(300)"]) for _ in range(2)]
        print("children", " ".join(str(k.pid) for k in kids), flush=True)
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers(); self.wfile.write(b"auto port ok")
            def log_message(self, *a): pass
        socketserver.TCPServer.allow_reuse_address = True
        socketserver.TCPServer(("127.0.0.2", port), H).serve_forever()
    """))
    r = d.ctl("run", sshd.host, "--name", "tree", "--port", "auto", "--",
              sys.executable, str(prog), "{port}")
    m = re.search(r"port (\d+) is forwarded: (http://127\.0\.0\.1:(\d+)/)", r.stderr)
    assert m, r.stderr
    port = int(m.group(1))
    fwd = d.forward(int(m.group(3)))
    assert fwd["target"] == f"localhost:{port}" and fwd["origin"] == "auto"
    d.wait_for(lambda: "children" in d.ctl("logs", "tree").stdout, what="children started")
    s = session(d, "tree")
    assert s["port"] == port and s["state"] == "running"
    pgid = s["pid"]
    # 2 children + 2 grandchildren of the python (the shell may exec it): they take a moment
    d.wait_for(lambda: len(_descendants(pgid)) >= 4, what="the whole process tree")
    tree = _descendants(pgid)
    r = d.ctl("kill", "tree")
    assert "tree: killed" in r.stdout
    survivors = [p for p in tree | {pgid} if _alive(p)]
    assert survivors == [], (survivors, d.log())
    assert session(d, "tree")["state"] == "killed"
    # its automatic forward went with it
    d.wait_for(lambda: all(f["listen"] != fwd["listen"]
                           for h in d.list()["hosts"] for f in h["forwards"]),
               what="the session's forward to go")


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("mode", [[], ["--no-detach"]], ids=["detached", "attached"])
def test_a_command_keeps_its_words(sdaemon, sshd, opened, tmp_path, echo_server, mode):
    """The issue's example (a quoted `python3 -c "…"`) opens the browser, `sh -c '…'` and a
    one-word shell line run as typed, and `sessions` shows each command so that pasting it
    back after `tunnelctl run HOST --` gives the same words."""
    d = sdaemon
    _, port = echo_server()
    code = f"import webbrowser; webbrowser.open_new('http://127.0.0.2:{port}/typed')"
    d.ctl("run", sshd.host, *mode, "--name", "py", "--", sys.executable, "-c", code)
    (url,) = wait_opened(opened)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/typed", url), url
    (tmp_path / "a b").mkdir()
    d.ctl("run", sshd.host, *mode, "--name", "shc", "--follow", "--", "sh", "-c",
          'cd "$1" && pwd && echo "$0" "*"; echo é', "x y", str(tmp_path / "a b"))
    assert d.ctl("logs", "shc").stdout == f"{tmp_path / 'a b'}\nx y *\né\n"
    d.ctl("run", sshd.host, *mode, "--name", "line", "--follow", "--",
          "cd ~ && printf '%s\\n' \"$HOME\" | wc -l")
    assert d.ctl("logs", "line").stdout.strip() == "1"
    import shlex
    for name, words in [("py", [sys.executable, "-c", code]),
                        ("shc", ["sh", "-c", 'cd "$1" && pwd && echo "$0" "*"; echo é', "x y",
                                 str(tmp_path / "a b")]),
                        ("line", ["cd ~ && printf '%s\\n' \"$HOME\" | wc -l"])]:
        s = session(d, name)
        assert s["words"] == words and shlex.split(s["command"]) == words, s
    d.ctl("kill", "py", check=False)


def test_session_exit_status_follow_and_logs(sdaemon, sshd):
    d = sdaemon
    r = d.ctl("run", sshd.host, "--follow", "--", "echo hello; echo err >&2; exit 3",
              check=False)
    assert r.returncode == 3
    assert "hello" in r.stdout and "err" in r.stdout
    (s,) = json.loads(d.ctl("sessions", "--json").stdout)["sessions"]
    assert s["state"] == "exited" and s["exit_status"] == 3
    assert s["name"] == "echo-1"
    assert "exit status 3" in d.ctl("sessions").stdout
    assert "hello" in d.ctl("logs", "echo-1").stdout


def test_attached_sessions_end_when_the_daemon_stops(sdaemon, sshd, tmp_path):
    """`run --no-detach`: the command runs in the SSH channel and ends with the daemon (a
    detached one survives it: test_e2e_detached)."""
    d = sdaemon
    d.ctl("run", sshd.host, "--name", "long", "--no-detach", "--", "sleep", "300")
    d.wait_for(lambda: session(d, "long")["pid"] is not None, what="pid")
    s = session(d, "long")
    assert s["detached"] is False and s["remote_dir"] is None
    assert re.search(r"long\s+\S+\s+running\s+attached", d.ctl("sessions").stdout)
    pid = s["pid"]
    tree = _descendants(pid) | {pid}
    assert d.stop() == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.1)
    assert [p for p in tree if _alive(p)] == []


def test_usage_errors(sdaemon, sshd):
    d = sdaemon
    r = d.ctl("run", sshd.host, check=False)
    assert r.returncode == 2 and "--" in r.stderr
    r = d.ctl("run", sshd.host, "--port", "x", "--", "true", check=False)
    assert r.returncode == 2 and "--port" in r.stderr
    r = d.ctl("run", sshd.host, "--name", "bad name", "--", "true", check=False)
    assert r.returncode == 1 and "session name" in r.stderr
    r = d.ctl("kill", "nosuch", check=False)
    assert r.returncode == 1 and "no session named" in r.stderr
    r = d.ctl("logs", "nosuch", check=False)
    assert r.returncode == 1
    d.ctl("run", sshd.host, "--name", "dup", "--", "sleep", "30")
    r = d.ctl("run", sshd.host, "--name", "dup", "--", "sleep", "30", check=False)
    assert r.returncode == 1 and "is running" in r.stderr
    d.ctl("kill", "dup")


WS_SERVER = textwrap.dedent("""
    import asyncio, webbrowser
    import websockets
    async def handler(ws):
        async for msg in ws:
            await ws.send("server got " + msg)
        await ws.send("bye")
    async def main():
        async with websockets.serve(handler, "127.0.0.2", 0) as server:
            port = server.sockets[0].getsockname()[1]
            webbrowser.open("http://127.0.0.2:%d/" % port)
            await asyncio.sleep(120)
    asyncio.run(main())
""")


def test_websocket_server_through_the_tunnel(sdaemon, sshd, opened, tmp_path):
    """EpiViz's case: a WebSocket data provider on the server, messages both ways."""
    from websockets.sync.client import connect
    d = sdaemon
    d.ctl("run", sshd.host, "--name", "ws", "--", sys.executable,
          str(script(tmp_path, WS_SERVER)))
    (url,) = wait_opened(opened)
    ws_url = url.replace("http://", "ws://")
    with connect(ws_url, open_timeout=10) as ws:
        for i in range(20):
            ws.send(f"ping {i}")
            assert ws.recv(timeout=10) == f"server got ping {i}"
        big = "x" * 200_000
        ws.send(big)
        assert ws.recv(timeout=10) == "server got " + big
    d.ctl("kill", "ws")


PAGE_SERVER = textwrap.dedent("""
    import http.server, socketserver, threading, time, webbrowser
    PAGE = b'''<!doctype html><html><body><p id="p">static</p>
    <script>document.getElementById("p").textContent = "rendered by " + "javascript";</script>
    </body></html>'''
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(PAGE))); self.end_headers()
            self.wfile.write(PAGE)
        def log_message(self, *a): pass
    srv = socketserver.TCPServer(("127.0.0.2", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    webbrowser.open("http://127.0.0.2:%d/page" % srv.server_address[1])
    time.sleep(120)
""")


@pytest.mark.timeout(120)
def test_headless_chromium_loads_the_opened_page(daemon, sshd, tmp_path):
    """The browser is real: Debian's chromium, headless, renders the page through the tunnel
    (its JavaScript runs) and dumps the DOM to a file."""
    import shutil
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (.ci/run does)")
    dom = tmp_path / "dom.html"
    wrapper = tmp_path / "browser.sh"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"{chromium} --headless --no-sandbox --disable-gpu --disable-quic --no-first-run "
        "--disable-background-networking --disable-component-update --disable-sync "
        f"--user-data-dir={tmp_path}/chromium-profile --virtual-time-budget=2000 "
        f"--dump-dom \"$1\" > {dom}.tmp 2>/dev/null && mv {dom}.tmp {dom}\n")
    wrapper.chmod(0o755)
    daemon.config_file.parent.mkdir(parents=True, exist_ok=True)
    daemon.config_file.write_text(f"[defaults]\nbrowser = [{json.dumps(str(wrapper))}]\n")
    assert daemon.stop() == 0
    daemon.start()
    daemon.ctl("run", sshd.host, "--name", "page", "--", sys.executable,
               str(script(tmp_path, PAGE_SERVER)))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not dom.exists():
        time.sleep(0.2)
    assert dom.exists(), f"chromium wrote no DOM\n{daemon.log()}"
    assert "rendered by javascript" in dom.read_text()
    daemon.ctl("kill", "page")
    reap_detached(daemon)


def test_loopback_url_on_a_server_with_its_own_loopback(ndaemon, netns_sshd, opened, tmp_path):
    """The usual case, faithfully: the program listens on the server's 127.0.0.1 and prints
    http://0.0.0.0:PORT/; the URL opened locally reaches it.  With --port auto too."""
    d = ndaemon
    prog = script(tmp_path, SERVE_AND_OPEN.replace('"127.0.0.2", 0', '"127.0.0.1", 0')
                  .replace("http://127.0.0.2:%d", "http://0.0.0.0:%d"))
    d.ctl("run", netns_sshd.host, "--name", "nb", "--", sys.executable, str(prog))
    (url,) = wait_opened(opened)
    m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/x\?y=1#z", url)
    assert m, url
    assert urllib.request.urlopen(url.split("#")[0], timeout=10).read() == \
        b"hello from the server, path /x?y=1"
    assert d.forward(int(m.group(1)), netns_sshd.host)["target"].startswith("localhost:")
    # --port auto: the command gets a port free on the server, and it is forwarded
    r = d.ctl("run", netns_sshd.host, "--name", "auto", "--port", "auto", "--",
              sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "{port}")
    m = re.search(r"is forwarded: (http://127\.0\.0\.1:\d+/)", r.stderr)
    assert m, r.stderr
    deadline = time.monotonic() + 20
    while True:
        try:
            body = urllib.request.urlopen(m.group(1), timeout=5).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert b"Directory listing" in body
    d.ctl("kill", "auto")
    d.ctl("kill", "nb")


INTERACTIVE = textwrap.dedent("""
    import os, signal, sys, time
    def size():
        c, r = os.get_terminal_size(0)
        print("size %d %d" % (r, c), flush=True)
    got = []
    signal.signal(signal.SIGWINCH, lambda *a: got.append(1))
    size()
    print("OPEN_ON_LOCAL[http://127.0.0.2:%s/ssh]" % sys.argv[1], flush=True)
    line = sys.stdin.readline().strip()
    print("got " + line, flush=True)
    deadline = time.time() + 20
    while not got and time.time() < deadline:
        time.sleep(0.05)
    size()
    sys.exit(7)
""")


@pytest.mark.timeout(60)
def test_tunnelctl_ssh_is_transparent(sdaemon, sshd, opened, tmp_path, echo_server):
    """Your own ssh in a terminal: output, input, window size, exit status pass through;
    a marker in the output is opened."""
    import fcntl
    import pty
    import signal
    import struct
    import termios
    d = sdaemon
    _, port = echo_server()
    prog = script(tmp_path, INTERACTIVE)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunnelctl", "ssh", sshd.host, "-F", str(sshd.ssh_config),
         "-tt", sys.executable, str(prog), str(port)],
        env=d.env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    out = b""

    def read_until(token: bytes, timeout: float = 20) -> None:
        nonlocal out
        deadline = time.monotonic() + timeout
        while token not in out:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {token!r} in {out!r}")
            import select
            if select.select([master], [], [], 0.2)[0]:
                try:
                    out += os.read(master, 4096)
                except OSError:
                    raise AssertionError(f"terminal closed; no {token!r} in {out!r}")

    try:
        read_until(b"size 30 100")
        (url,) = wait_opened(opened)
        assert url == f"http://127.0.0.1:{port}/ssh" or url.endswith("/ssh")
        os.write(master, b"hello\r")
        read_until(b"got hello")
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        proc.send_signal(signal.SIGWINCH)
        read_until(b"size 40 120")
        assert proc.wait(timeout=20) == 7
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_jupyter_redirect_file_is_read_on_the_server(sdaemon, sshd, opened, tmp_path,
                                                    echo_server):
    """Jupyter opens file://…/jpserver-NNN-open.html; the token URL inside is opened."""
    d = sdaemon
    _, port = echo_server()
    runtime = tmp_path / "jupyter" / "runtime"
    runtime.mkdir(parents=True)
    page = runtime / "jpserver-4242-open.html"
    target = f"http://127.0.0.2:{port}/lab?token=abcdef0123"
    page.write_text(f'<html><head><meta http-equiv="refresh" content="1;url={target}" />'
                    f'</head><body><a href="{target}">open</a></body></html>')
    d.ctl("run", sshd.host, "--name", "jp", "--", sys.executable, "-c",
          f"import webbrowser; webbrowser.open('file://{page}')")
    (url,) = wait_opened(opened)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/lab\?token=abcdef0123", url), url
    assert "abcdef0123" not in d.log(tail=None)


def test_a_flood_of_markers_is_rate_limited(sdaemon, sshd, opened, tmp_path, echo_server):
    d = sdaemon
    _, port = echo_server()
    d.ctl("run", sshd.host, "--name", "flood", "--", sys.executable, "-c",
          f"[print('OPEN_ON_LOCAL[http://127.0.0.2:{port}/%d]' % i) for i in range(100)]")
    d.wait_for(lambda: session(d, "flood")["state"] == "exited", what="flood to end")
    d.wait_for(lambda: "too many browser opens" in d.log(), what="the rate-limit line")
    time.sleep(1)
    n = len(opened.read_text().splitlines())
    assert 1 <= n <= 5, n
    assert d.log(tail=None).count("too many browser opens") == 1

