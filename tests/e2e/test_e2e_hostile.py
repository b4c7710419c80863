"""Hostile input against a running tunneld (issue 7): another user on the control socket, a
fuzz run of the socket, privileged ports, shell metacharacters in marker URLs and session
commands, and secrets that must stay out of the log, `list` and the state file.

Each test says what it throws at the daemon and asserts what the user sees.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tunneld import wire

from test_e2e_control import Lines, assert_error, assert_status_ok, connect, status_request
from test_e2e_sessions import script, wait_opened, with_recorder

REPO = Path(__file__).resolve().parents[2]
#: the uid/gid of the "other user" (nobody on Debian and most Linux systems)
OTHER_UID = 65534


# -- running something as another user -------------------------------------------------------


def _other_python() -> str | None:
    """An interpreter that uid OTHER_UID can run (sys.executable may live under /root)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    for exe in (sys.executable, "/usr/bin/python3"):
        r = subprocess.run(["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}",
                            "--clear-groups", exe, "-c", "import json, socket, sys"],
                           capture_output=True, timeout=30)
        if r.returncode == 0:
            return exe
    return None


@pytest.fixture(scope="module")
def other_user():
    """``run(code_or_argv, env=None)`` runs Python as uid 65534 (stdlib, plus a copy of tunneld,
    tunnelctl and platformdirs readable by that user).  Skips unless root with setpriv."""
    exe = _other_python()
    if exe is None:
        pytest.skip("needs root, setpriv and a Python that uid 65534 can run")
    import platformdirs
    lib = Path(tempfile.mkdtemp(prefix="td-other-", dir="/tmp"))
    try:
        for src in (REPO / "tunneld", REPO / "tunnelctl", Path(platformdirs.__file__).parent):
            shutil.copytree(src, lib / src.name, ignore=shutil.ignore_patterns("__pycache__"))
        for p in [lib, *lib.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)

        def run(args: list[str], env: dict[str, str] | None = None,
                timeout: float = 30) -> subprocess.CompletedProcess[str]:
            full_env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONPATH": str(lib),
                        "PYTHONDONTWRITEBYTECODE": "1", "TUNNELD_NO_AUTOSTART": "1",
                        **(env or {})}
            return subprocess.run(
                ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
                 exe, *args], env=full_env, cwd="/", capture_output=True, text=True,
                timeout=timeout, stdin=subprocess.DEVNULL)

        yield run
    finally:
        shutil.rmtree(lib, ignore_errors=True)


RAW_CLIENT = textwrap.dedent("""
    import json, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(sys.argv[1])
    except OSError as exc:
        print(json.dumps({"connect": exc.__class__.__name__, "errno": exc.errno}))
        sys.exit(0)
    # whatever we send (here: stop, then add), the daemon must not act on it
    replies = []
    try:
        s.sendall(b'{"cmd":"stop","proto":1,"args":{}}\\n'
                  b'{"cmd":"add","proto":1,"args":{"host":"testhost","specs":["1"]}}\\n')
    except OSError as exc:
        replies.append({"send": exc.__class__.__name__})
    buf = b""
    while True:
        try:
            chunk = s.recv(65536)
        except OSError as exc:
            replies.append({"recv": exc.__class__.__name__})
            break
        if not chunk:
            break
        buf += chunk
    replies += [json.loads(line) for line in buf.splitlines() if line.strip()]
    print(json.dumps({"connect": "ok", "replies": replies}))
""")


def _log_has(daemon, text: str, timeout: float = 10) -> None:
    daemon.wait_for(lambda: text in daemon.log(tail=None), timeout=timeout,
                    what=f"log line {text!r}")


@pytest.mark.timeout(120)
def test_another_uid_is_refused(daemon, other_user):
    """uid 65534 on the control socket: kept out by the 0700 directory and the 0600 socket;
    with both opened up on purpose, the daemon's own SO_PEERCRED check still refuses it, with a
    reply that says why and a log line, and does not act on what it sent."""
    sock = daemon.socket
    run_dir = sock.parent
    base = run_dir.parent   # $XDG_RUNTIME_DIR of the test, a 0700 dir of our own under /tmp
    env = {"TUNNELD_SOCKET": str(sock)}
    modes = {p: stat.S_IMODE(os.stat(p).st_mode) for p in (base, run_dir, sock)}
    assert modes[run_dir] == 0o700 and modes[sock] == 0o600, modes
    try:
        base.chmod(0o755)   # let the other user reach run_dir; run_dir itself stays 0700

        # 1. directory 0700: the kernel refuses the other user before the daemon sees it
        r = other_user(["-c", RAW_CLIENT, str(sock)])
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"connect": "PermissionError", "errno": 13}, r.stdout
        r = other_user(["-m", "tunnelctl", "status"], env)
        assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
        assert r.stderr.strip() == (f"tunnelctl: cannot reach tunneld at {sock}: "
                                    "Permission denied"), r.stderr

        # 2. directory opened, socket still 0600: still the kernel
        run_dir.chmod(0o755)
        r = other_user(["-c", RAW_CLIENT, str(sock)])
        assert json.loads(r.stdout) == {"connect": "PermissionError", "errno": 13}, r.stdout

        # 3. socket opened too (as a careless chmod would): tunneld's peer-uid check refuses
        sock.chmod(0o666)
        r = other_user(["-c", RAW_CLIENT, str(sock)])
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["connect"] == "ok", out
        finals = [m for m in out["replies"] if "ok" in m]
        assert len(finals) == 1, out      # one refusal, then the connection is closed
        err = assert_error(finals[0], "ProtocolError")
        assert err["message"] == f"permission denied: this tunneld belongs to uid {os.getuid()}"
        _log_has(daemon, f"control: refused a connection from uid {OTHER_UID} "
                         f"(only uid {os.getuid()} may control this daemon)")

        # what the other user sees from tunnelctl: the refusal, exit 1, no traceback
        r = other_user(["-m", "tunnelctl", "status"], env)
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert r.stderr.strip() == (f"tunnelctl: permission denied: this tunneld belongs to "
                                    f"uid {os.getuid()}"), r.stderr
        r = other_user(["-m", "tunnelctl", "add", daemon.server.host, "1"], env)
        assert r.returncode == 1 and "permission denied" in r.stderr, (r.returncode, r.stderr)

    finally:
        # (platformdirs ignores an XDG_RUNTIME_DIR that is not 0700: restore before tunnelctl)
        for p, mode in modes.items():
            if p.exists():
                p.chmod(mode)
    # nothing the other user sent was acted on: not stopped, nothing added
    assert daemon.proc.poll() is None
    assert daemon.list()["hosts"] == []
    assert daemon.log(tail=None).count(f"refused a connection from uid {OTHER_UID}") >= 3
    daemon.ctl("status")
    assert "Traceback" not in daemon.log(tail=None)


# -- fuzzing the control socket ---------------------------------------------------------------

#: the fuzz run is seeded and bounded: this many inputs, or this many seconds, whichever first
FUZZ_SEED = 7_2026
FUZZ_INPUTS = 3000
FUZZ_SECONDS = 75.0
#: share of request envelopes whose arguments are of the right types (they reach the
#: manager: bind listeners, start sessions, wait for a host that never answers)
PLAUSIBLE = 0.08
#: an input that gets no reply within this long fails the test (the daemon hung on it)
FUZZ_REPLY_TIMEOUT = 30.0
#: commands the fuzzer may name: all but `stop` (it would end the run) and streaming ones
FUZZ_CMDS = sorted(wire.COMMANDS & {"add", "remove", "list", "status", "reconnect", "run",
                                    "sessions", "logs", "kill", "open", "reload"})
ARG_KEYS = ["host", "specs", "public", "name", "command", "port", "url", "node", "follow",
            "all", "json"]


def _hostile_strings(canary: Path) -> list[str]:
    return [
        "", " ", "\n", "\x00", "\x1b[31mred", "\u202e", "\ud800", "\udfff", "\U0001f600",
        "a" * 300, "x" * 70_000,
        "-oProxyCommand=touch " + str(canary), f"$(touch {canary})", f"`touch {canary}`",
        f"; touch {canary}", f"|touch {canary}", "../../../../etc/passwd", "/etc/shadow",
        "%s", "%n%n%n", "{port}", "nosuchhost.invalid", "web\n", "barhal\n",
        "8090", "0", "65536", "1-1025", "20000-20010", "0.0.0.0:18931:localhost:22",
        "[::]:18932:x:1", "*:18933:x:1", "18934:[::1]:1", "١٢٣", "8090\n:1",
        "http://localhost:1/?token=fuzz", "http://user:pw@localhost:1/", "file:///etc/passwd",
        "javascript:alert(1)", "http://localhost:1/" + "%" * 9000, "auto", "NaN",
    ]


def _rand_text(rng: random.Random, hostile: list[str]) -> str:
    k = rng.random()
    if k < 0.35:
        return rng.choice(hostile)
    if k < 0.65:
        return "".join(rng.choice("abcxyz019-_.:[]*/ @%$`'\"\\;&|<>") for _ in
                       range(rng.randrange(0, 24)))
    ranges = [(0, 0x20), (0x20, 0x80), (0x80, 0x800), (0xD800, 0xE000), (0x10000, 0x110000)]
    return "".join(chr(rng.randrange(*rng.choice(ranges))) for _ in range(rng.randrange(0, 12)))


def _rand_json(rng: random.Random, hostile: list[str], depth: int = 0):
    k = rng.randrange(9 if depth < 4 else 6)
    if k == 0:
        return None
    if k == 1:
        return rng.random() < 0.5
    if k == 2:
        return rng.choice([0, 1, -1, 22, 80, 65535, 65536, 2**31, 2**70, -2**70,
                           rng.randrange(-10**6, 10**6)])
    if k == 3:
        return rng.choice([0.5, -0.0, 1e308, float("inf"), float("-inf"), float("nan"),
                           rng.uniform(-1e6, 1e6)])
    if k in (4, 5):
        return _rand_text(rng, hostile)
    if k == 6:
        return [_rand_json(rng, hostile, depth + 1) for _ in range(rng.randrange(0, 5))]
    keys = ARG_KEYS if k == 7 else None
    return {(rng.choice(keys) if keys else _rand_text(rng, hostile)):
            _rand_json(rng, hostile, depth + 1) for _ in range(rng.randrange(0, 5))}


def _plausible_args(rng: random.Random, hostile: list[str], canary: Path) -> dict:
    """Arguments of the right types and often valid values, so that requests get past the
    first checks: the host never resolves (``*.invalid``), so no connection is ever made."""
    pools = {
        "host": ["nosuchhost.invalid", "fuzz-2.invalid", rng.choice(hostile)],
        "specs": [["20931"], ["20932-20936"], ["20937:node1:80", "20938"], ["0.0.0.0:20939:x:1"],
                  ["[::1]:20940:x:1"], [rng.choice(hostile)], [], "20941", [20942]],
        "public": [True, False, "yes", 1, None],
        "name": ["echo-1", "sh-1", "fuzz", None, rng.choice(hostile)],
        "command": [["echo", "hi"], "echo hi", [f"$(touch {canary})"], [], [""], [1],
                    ["sh", "-c", f"touch {canary}"], ["echo", "\ud800"], ["echo", "\x00"]],
        "port": ["auto", 20943, 0, 65536, True, "20944", None, -1],
        "url": ["http://localhost:20945/?token=fuzz-secret", "http://node1:80/x",
                "http://[::1]:20946/", "file:///tmp/jpserver-1-open.html",
                rng.choice(hostile)],
        "node": [None, "node1", rng.choice(hostile)],
        "follow": [True, False], "all": [True, False], "json": [True],
    }
    keys = ["host", "specs", "command", "url"] + rng.sample(ARG_KEYS, rng.randrange(0, 4))
    keys = [k for k in keys if rng.random() < 0.9]
    return {k: rng.choice(pools[k]) for k in keys}


def _rand_request(rng: random.Random, hostile: list[str], canary: Path) -> bytes:
    """One line: a request envelope with random (often wrong) parts, a random JSON value, or
    random bytes; always exactly one newline, at the end."""
    k = rng.random()
    if k < 0.55:
        msg: dict = {}
        if rng.random() < 0.95:
            msg["cmd"] = rng.choice(FUZZ_CMDS) if rng.random() < 0.85 else \
                _rand_json(rng, hostile)
        if rng.random() < 0.9:
            msg["proto"] = rng.choice([1, 1, 1, 1, 0, 2, "1", None, 1.5, [1]])
        if rng.random() < PLAUSIBLE:
            msg["args"] = _plausible_args(rng, hostile, canary)
        elif rng.random() < 0.95:
            msg["args"] = {key: _rand_json(rng, hostile) for key in
                           rng.sample(ARG_KEYS, rng.randrange(0, 5))} \
                if rng.random() < 0.9 else _rand_json(rng, hostile)
        body = json.dumps(msg, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    elif k < 0.75:
        body = json.dumps(_rand_json(rng, hostile)).encode()
    else:
        body = rng.randbytes(rng.randrange(0, 200))
    return body.replace(b"\n", b"") + b"\n"


def _read_final(sock: socket.socket, lines: Lines, what: bytes) -> dict:
    try:
        reply = lines.read()
    except socket.timeout:
        pytest.fail(f"no reply within {FUZZ_REPLY_TIMEOUT}s to {what[:300]!r}")
    assert reply is not None, f"the daemon closed the connection on {what[:300]!r}"
    assert isinstance(reply.get("ok"), bool) and reply.get("version"), reply
    if not reply["ok"]:
        msg = reply["error"]["message"]
        assert isinstance(msg, str) and msg, reply
        assert "internal error" not in msg, (what[:300], reply)
    return reply


@pytest.mark.timeout(300)
def test_fuzz_control_socket(daemon, tmp_path):
    """A few thousand random lines (request envelopes with random parts, random JSON values,
    random bytes), truncated lines, over-long and deeply nested lines against a live daemon:
    every complete line gets one reply (never an internal error), nothing is opened or run
    locally, and afterwards `tunnelctl status` answers and the log holds no traceback."""
    opened = tmp_path / "opened.txt"
    recorder = tmp_path / "record.py"
    recorder.write_text("import sys\nopen(%r, 'a').write(sys.argv[1] + '\\n')\n" % str(opened))
    daemon.config_file.parent.mkdir(parents=True, exist_ok=True)
    daemon.config_file.write_text(
        "[defaults]\n"
        f"browser = [{json.dumps(sys.executable)}, {json.dumps(str(recorder))}, \"%s\"]\n"
        "connect_timeout = 2\nhold_timeout = 1\nready_timeout = 2\n")
    assert daemon.stop() == 0
    daemon.start()

    canary = tmp_path / "canary"
    hostile = _hostile_strings(canary)
    rng = random.Random(FUZZ_SEED)
    deadline = time.monotonic() + FUZZ_SECONDS
    counts = {"lines": 0, "ok": 0, "error": 0, "truncated": 0, "oversized": 0, "nested": 0,
              "echo": 0}
    sock = connect(daemon.socket, timeout=FUZZ_REPLY_TIMEOUT)
    lines = Lines(sock)
    last = b""
    try:
        n = 0
        while n < FUZZ_INPUTS and time.monotonic() < deadline:
            n += 1
            k = rng.random()
            if k < 0.9:          # a complete line on the long-lived connection
                payload = _rand_request(rng, hostile, canary)
                try:
                    sock.sendall(payload)
                except OSError as exc:
                    pytest.fail(f"input {n}: {exc!r} sending {payload[:300]!r} after "
                                f"{last[:300]!r}\n{daemon.log()}")
                reply = _read_final(sock, lines, payload)
                counts["lines"] += 1
                counts["ok" if reply["ok"] else "error"] += 1
                last = payload
            elif k < 0.98:       # a half-written line, then close (or EOF and read)
                payload = _rand_request(rng, hostile, canary)[:-1]
                payload = payload[:rng.randrange(0, len(payload) + 1)]
                with connect(daemon.socket, timeout=FUZZ_REPLY_TIMEOUT) as s:
                    s.sendall(payload)
                    if rng.random() < 0.5:
                        s.shutdown(socket.SHUT_WR)
                        try:
                            while s.recv(65536):
                                pass
                        except ConnectionResetError:
                            pass
                counts["truncated"] += 1
            elif k < 0.982:      # a line just under the limit whose error echoes it
                field = rng.choice(["cmd", "host", "name"])
                msg = {"cmd": "add", "proto": 1, "args": {}}
                filler = "y" * (wire.MAX_LINE - 80)
                if field == "cmd":
                    msg["cmd"] = filler
                else:
                    msg["args"][field] = filler + "/"
                    msg["cmd"] = "add" if field == "host" else "logs"
                payload = json.dumps(msg).encode() + b"\n"
                assert len(payload) < wire.MAX_LINE
                sock.sendall(payload)
                reply = _read_final(sock, lines, payload)
                assert reply["ok"] is False, reply
                assert len(reply["error"]["message"]) <= wire.MAX_ERROR_MESSAGE, reply
                counts["echo"] += 1
            elif k < 0.99:       # nested too deeply for a recursive parser
                unit = rng.choice([b"[", b'{"a":', b'{"cmd":"add","args":{"x":['])
                payload = unit * rng.randrange(2_000, wire.MAX_LINE // len(unit) - 1) + b"\n"
                sock.sendall(payload)
                reply = _read_final(sock, lines, payload)
                assert reply["ok"] is False and reply["error"]["type"] == "ProtocolError", reply
                counts["nested"] += 1
            else:                # longer than wire.MAX_LINE: refused, that connection closes
                with connect(daemon.socket, timeout=FUZZ_REPLY_TIMEOUT) as s:
                    try:
                        s.sendall(b'{"cmd":"status","pad":"' + b"z" * (wire.MAX_LINE + 1))
                        reply = Lines(s).read()
                    except (BrokenPipeError, ConnectionResetError):
                        reply = None
                    if reply is not None:
                        assert_error(reply, "ProtocolError")
                counts["oversized"] += 1
    finally:
        sock.close()
    print("fuzz:", n, "inputs", counts)
    assert n >= 500, f"only {n} inputs in {FUZZ_SECONDS}s: {counts}"

    # the daemon still answers, on a new connection and through tunnelctl
    assert daemon.proc.poll() is None, daemon.log()
    with connect(daemon.socket) as s:
        assert_status_ok(Lines(s).read() if s.sendall(status_request()) is None else None)
    r = daemon.ctl("status")
    assert r.returncode == 0 and "tunneld" in r.stdout
    daemon.ctl("list", "--json")
    log = daemon.log(tail=None)
    for bad in ("Traceback", "internal error", "Logging error", "Unhandled exception",
                "never retrieved", "ERROR"):
        assert bad not in log, f"{bad!r} in the daemon log:\n{log[-6000:]}"
    assert not opened.exists(), opened.read_text()
    assert not canary.exists()


# -- host keys: the message names the file, the fingerprint and the commands ----------------------


def _fingerprint(pub: Path) -> str:
    """``SHA256:…`` of a public key file, as ssh-keygen prints it."""
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return out.split()[1]


def _backticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def _run_shell(cmd: str, env: dict) -> str:
    return subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, env=env,
                          timeout=30).stdout


@pytest.mark.timeout(90)
def test_unknown_host_key_message_shows_fingerprint_file_and_commands(daemon, sshd, free_port,
                                                                     tmp_path):
    """Unknown key: never accepted; the message names the known_hosts file, the fingerprint the
    server offered (the real one), and a command that shows it; the commands it quotes work."""
    alias = "unknownkey"
    known = tmp_path / "known_hosts_empty"
    known.write_text("")
    sshd.add_host_alias(alias, UserKnownHostsFile=str(known))
    r = daemon.ctl("add", alias, f"{free_port()}:127.0.0.2:1", check=False)
    err = daemon.host(alias)["last_error"]
    assert daemon.host(alias)["state"] == "failed", err
    real = _fingerprint(sshd.host_key.with_suffix(".pub"))
    assert f"is unknown (not in {known})" in err, err
    assert f"the server offers ssh-ed25519 {real}" in err, err
    cmds = _backticked(err)
    scan = f"ssh-keyscan -p {sshd.port} 127.0.0.1 | ssh-keygen -lf -"
    assert cmds == [scan, f"ssh {alias}", f"tunnelctl reconnect {alias}"], cmds
    assert real in _run_shell(scan, daemon.env)   # the command shows the same fingerprint
    assert err in r.stderr
    assert known.read_text() == ""                # nothing was written to known_hosts


@pytest.mark.timeout(90)
def test_changed_host_key_message_names_the_file_to_fix(daemon, sshd, free_port, tmp_path):
    """Changed key: the message names the file holding the old key, shows the new fingerprint,
    and its `ssh-keygen -lF/-R … -f FILE` commands act on that file (not ~/.ssh/known_hosts)."""
    alias = "changedkey2"
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-t", "ed25519", "-f", str(other)],
                   check=True, capture_output=True, timeout=30)
    kind, blob = other.with_suffix(".pub").read_text().split()[:2]
    known = tmp_path / "known_hosts_changed"
    entry = f"[127.0.0.1]:{sshd.port}"
    known.write_text(f"{entry} {kind} {blob}\n")
    sshd.add_host_alias(alias, UserKnownHostsFile=str(known))
    daemon.ctl("add", alias, f"{free_port()}:127.0.0.2:1", check=False)
    h = daemon.host(alias)
    err = h["last_error"]
    assert h["state"] == "failed", err
    real = _fingerprint(sshd.host_key.with_suffix(".pub"))
    recorded = _fingerprint(other.with_suffix(".pub"))
    assert f"does NOT match the one in {known} " in err, err
    assert f"the server offers ssh-ed25519 {real}" in err, err
    cmds = _backticked(err)
    assert f"ssh-keygen -lF '{entry}' -f {known}" in cmds, cmds
    assert f"ssh-keygen -R '{entry}' -f {known}" in cmds, cmds
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 | ssh-keygen -lf -" in cmds, cmds
    # the quoted commands do what the message says, on the right file
    assert recorded in _run_shell(f"ssh-keygen -lF '{entry}' -f {known}", daemon.env)
    _run_shell(f"ssh-keygen -R '{entry}' -f {known}", daemon.env)
    assert blob not in known.read_text()
    assert known.read_text().strip() == ""


# -- listeners: --public and privileged ports -------------------------------------------------


def test_bind_error_message_for_privileged_ports():
    """EACCES on a port below 1024 (not root): the message says why and what to use."""
    import errno as errno_
    from tunneld.bindfail import bind_error_message
    from tunneld.spec import parse
    for text, suggestion in (("80", "10080:localhost:80"), ("443:node7:8443",
                                                            "10443:node7:8443"),
                             ("[::1]:1:x:22", "10001:x:22"), ("1023", "11023:localhost:1023")):
        spec = parse(text)[0]
        msg = bind_error_message(spec, PermissionError(errno_.EACCES, "Permission denied"))
        assert msg == (f"cannot listen on {spec.listen}: ports below 1024 are privileged; use a "
                       f"port of 1024 or more (e.g. {suggestion})"), msg
    # EACCES on an unprivileged port has another cause: the system's words, no wrong advice
    spec = parse("8080")[0]
    msg = bind_error_message(spec, PermissionError(errno_.EACCES, "Permission denied"))
    assert msg == "cannot listen on 127.0.0.1:8080: Permission denied", msg


@pytest.mark.timeout(60)
def test_privileged_port_as_another_user_is_eacces(other_user):
    """A real bind of port 80 by uid 65534 fails with EACCES: the errno the message is for."""
    code = ("import socket, json\ns = socket.socket()\ntry:\n    s.bind(('127.0.0.1', 80))\n"
            "    print(json.dumps(None))\nexcept OSError as e:\n"
            "    print(json.dumps([e.errno, e.strerror]))\n")
    r = other_user(["-c", code])
    result = json.loads(r.stdout)
    if result is None:
        pytest.skip("this system lets every user bind port 80 (ip_unprivileged_port_start)")
    import errno as errno_
    from tunneld.bindfail import bind_error_message
    from tunneld.spec import parse
    assert result[0] == errno_.EACCES, result
    msg = bind_error_message(parse("80")[0], PermissionError(*result))
    assert "ports below 1024 are privileged" in msg and "10080:localhost:80" in msg, msg


def _can_drop_bind_cap() -> bool:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    r = subprocess.run(["setpriv", "--bounding-set=-net_bind_service",
                        "--inh-caps=-net_bind_service", sys.executable, "-c",
                        "import socket; socket.socket().bind(('127.0.0.1', 80))"],
                       capture_output=True, timeout=30)
    return r.returncode != 0 and b"Permission denied" in r.stderr


@pytest.mark.timeout(90)
def test_privileged_port_through_tunnelctl(daemon, sshd, echo_server):
    """The whole path for a user who may not bind low ports (here: a tunneld without
    CAP_NET_BIND_SERVICE): `tunnelctl add HOST 80:…` exits 1 with the message, binds nothing,
    and the daemon logs no traceback."""
    if not _can_drop_bind_cap():
        pytest.skip("needs root and setpriv, on a system where port 80 is privileged")
    assert daemon.stop() == 0
    err = open(daemon.stderr_path, "ab")
    daemon.proc = subprocess.Popen(
        ["setpriv", "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service",
         sys.executable, "-m", "tunneld"], env=daemon.env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    err.close()
    daemon.wait_for(lambda: daemon.ctl("status", check=False, timeout=5).returncode == 0,
                    what="the capability-less daemon")
    _, rport = echo_server()
    r = daemon.ctl("add", sshd.host, f"80:127.0.0.2:{rport}", check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.strip() == (
        "tunnelctl: cannot listen on 127.0.0.1:80: ports below 1024 are privileged; use a port "
        f"of 1024 or more (e.g. 10080:127.0.0.2:{rport})"), r.stderr
    assert daemon.list()["hosts"] == []
    assert "Traceback" not in daemon.log(tail=None)


@pytest.mark.timeout(90)
def test_public_bind_needs_the_flag_and_config_ones_are_logged(daemon, sshd, free_port,
                                                               echo_server):
    """`add 0.0.0.0:…` without --public: exit 1, the message says who could reach what and
    names the flag, nothing is bound.  A public forward declared in config.toml is bound (the
    file is the person's decision) but logged as a warning at start."""
    _, rport = echo_server()
    port = free_port("0.0.0.0")
    for spec in (f"0.0.0.0:{port}:127.0.0.2:{rport}", f"*:{port}:127.0.0.2:{rport}"):
        r = daemon.ctl("add", sshd.host, spec, check=False)
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert r.stderr.strip() == (
            f"tunnelctl: 0.0.0.0:{port} is reachable from other machines; anyone who can reach "
            f"it reaches {sshd.host}'s 127.0.0.2:{rport}. Pass --public if that is what you "
            "want, or bind to 127.0.0.1"), r.stderr
    assert daemon.list()["hosts"] == []
    daemon.config_file.parent.mkdir(parents=True, exist_ok=True)
    daemon.config_file.write_text(
        f'[hosts.{sshd.host}]\nforwards = ["0.0.0.0:{port}:127.0.0.2:{rport}"]\n')
    assert daemon.stop() == 0
    daemon.start()
    assert daemon.forward(port)["listen"] == f"0.0.0.0:{port}"
    _log_has(daemon, f"WARNING {sshd.host}: 0.0.0.0:{port} is listening on a public address "
                     "of this machine (config file)")


@pytest.mark.timeout(90)
def test_automatic_forwards_stay_on_loopback_even_with_a_public_default(daemon, sshd,
                                                                        echo_server, tmp_path):
    """With ``bind = "0.0.0.0"`` in config.toml, a URL printed on the server (or `open`) must
    not make this machine listen publicly: the automatic forward binds 127.0.0.1."""
    opened = tmp_path / "opened.txt"
    recorder = tmp_path / "record.py"
    recorder.write_text("import sys\nopen(%r, 'a').write(sys.argv[1] + '\\n')\n" % str(opened))
    daemon.config_file.parent.mkdir(parents=True, exist_ok=True)
    daemon.config_file.write_text(
        '[defaults]\nbind = "0.0.0.0"\nready_timeout = 20\n'
        f"browser = [{json.dumps(sys.executable)}, {json.dumps(str(recorder))}, \"%s\"]\n")
    assert daemon.stop() == 0
    daemon.start()
    host, rport = echo_server()
    r = daemon.ctl("open", sshd.host, f"http://{host}:{rport}/x")
    (url,) = wait_opened(opened)
    m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/x", url)
    assert m, url
    assert daemon.forward(int(m.group(1)))["listen"] == f"127.0.0.1:{m.group(1)}", r.stdout
    assert "public address" not in daemon.log(tail=None)


# -- markers: the browser is run without a shell ------------------------------------------------


@pytest.mark.timeout(120)
def test_shell_metacharacters_in_urls_reach_the_browser_verbatim(daemon, sshd, echo_server,
                                                                  free_port, tmp_path):
    """URLs full of shell syntax, from `tunnelctl open` and from markers printed by a session,
    reach the (recording) browser as one argument, byte for byte, and nothing they spell out
    runs.  The same with a space in it is refused (no whitespace in URLs), and nothing runs."""
    opened = tmp_path / "opened.txt"
    d = with_recorder(daemon, opened, tmp_path)
    host, rport = echo_server()
    lport = free_port()
    d.ctl("add", sshd.host, f"{lport}:{host}:{rport}")
    c = [tmp_path / f"canary{i}" for i in range(6)]
    paths = [
        f"/$(touch${{IFS}}{c[0]})?a=`touch${{IFS}}{c[1]}`",
        f"/x;touch${{IFS}}{c[2]}|touch${{IFS}}{c[2]}&&touch${{IFS}}{c[2]}>{c[2]}",
        "/'\"$HOME\"'%s%n<x>{port}",
    ]
    for p in paths:
        r = d.ctl("open", sshd.host, f"http://{host}:{rport}{p}")
        assert r.returncode == 0, r
    # and from a session's output: a marker, and Python's webbrowser on the server
    marker_path = f"/$(touch${{IFS}}{c[3]})`touch${{IFS}}{c[3]}`"
    wb_path = f"/wb;touch${{IFS}}{c[4]}"
    prog = script(tmp_path, textwrap.dedent(f"""
        import webbrowser
        print("OPEN_ON_LOCAL[http://{host}:{rport}{marker_path}]", flush=True)
        webbrowser.open("http://{host}:{rport}{wb_path}")
    """))
    d.ctl("run", sshd.host, "--name", "meta", "--", sys.executable, str(prog))
    want = [f"http://127.0.0.1:{lport}{p}" for p in paths + [marker_path, wb_path]]
    got = wait_opened(opened, len(want))
    assert sorted(got) == sorted(want), got
    # refused: a space (as `$(touch /x)` needs) is not allowed in a URL
    r = d.ctl("open", sshd.host, f"http://{host}:{rport}/$(touch {c[5]})", check=False)
    assert r.returncode == 1, r
    assert r.stderr.startswith(f"tunnelctl: {sshd.host}: not opened: the URL contains "
                               "whitespace or a control character (U+0020) at position "), \
        r.stderr
    time.sleep(1)
    assert len(opened.read_text().splitlines()) == len(want)
    assert [p for p in c if p.exists()] == []
    assert "Traceback" not in d.log(tail=None)


# -- sessions: argv, not a local shell --------------------------------------------------------


@pytest.mark.timeout(90)
def test_run_passes_words_as_typed_without_a_local_shell(daemon, sshd):
    """tmux's rule, with no local shell anywhere: several words reach the server's program as
    typed (nothing expanded, locally or remotely); one word is a line for the REMOTE shell,
    exactly as `ssh HOST LINE` runs it (so `$HOME` there is the server's).  A variable set only
    in tunnelctl's and the daemon's environment is never expanded by them."""
    assert daemon.stop() == 0
    daemon.env["TUNNELD_HOSTILE_LOCAL"] = "local-only-value"
    daemon.start()
    argv = ["echo", "[$TUNNELD_HOSTILE_LOCAL]", "'$HOME'", "`echo tick`", "$(echo dollar)",
            "a;echo", "semi", "'%s {port}'"]
    r = daemon.ctl("run", sshd.host, "--follow", "--", *argv)
    assert r.stdout == " ".join(argv[1:]) + "\n", r.stdout
    line = "echo [$TUNNELD_HOSTILE_LOCAL] '$HOME' `echo tick` $(echo dollar) a;echo semi"
    r = daemon.ctl("run", sshd.host, "--follow", "--", line)
    ssh = subprocess.run(["ssh", "-F", str(sshd.ssh_config), sshd.host, line],
                         capture_output=True, text=True, timeout=30, env=daemon.env,
                         stdin=subprocess.DEVNULL)
    assert ssh.returncode == 0, ssh.stderr
    assert r.stdout == ssh.stdout == "[] $HOME tick dollar a\nsemi\n", (r.stdout, ssh.stdout)
    assert "local-only-value" not in r.stdout


# -- secrets: tokens in URLs stay out of the log, `list` and the state file -------------------

JUPYTER_LIKE = textwrap.dedent("""
    import http.server, socketserver, sys, threading, webbrowser
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"lab")
        def log_message(self, *a): pass
    srv = socketserver.TCPServer(("127.0.0.2", 0), H)
    port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    token = open(sys.argv[1]).read().strip()   # Jupyter makes its own; not on the command line
    url = "http://127.0.0.2:%d/lab?token=%s" % (port, token)
    print("    To access the server, copy and paste one of these URLs:", flush=True)
    print("        " + url, flush=True)
    webbrowser.open(url)
    print("PORT", port, flush=True)
    threading.Event().wait(120)
""")


@pytest.mark.timeout(120)
def test_jupyter_tokens_never_reach_the_log_list_or_state(daemon, sshd, tmp_path):
    secret = "c0ffee" + "5ec7e7" * 6
    secret2, password, frag = "tok2" + "9" * 20, "hunter2pw", "fragsecret42"
    opened = tmp_path / "opened.txt"
    d = with_recorder(daemon, opened, tmp_path)
    prog = script(tmp_path, JUPYTER_LIKE)
    token_file = tmp_path / "token"
    token_file.write_text(secret)
    d.ctl("run", sshd.host, "--name", "lab", "--", sys.executable, str(prog), str(token_file))
    (url,) = wait_opened(opened)
    assert url.endswith(f"/lab?token={secret}")           # the browser needs the token
    port = int(re.search(r"127\.0\.0\.2:(\d+)", d.ctl("logs", "lab").stdout).group(1))
    r = d.ctl("open", sshd.host, f"http://127.0.0.2:{port}/tree?token={secret2}"
                                 f"&password={password}#access_token={frag}")
    wait_opened(opened, 2)
    d.ctl("add", sshd.host, "--", f"{_free(d)}:127.0.0.2:{port}")   # something persisted

    log_file = sshd.home / ".local" / "state" / "tunneld" / "log" / "tunneld.log"
    # a session's printed URLs keep their tokens (`sessions --json` and the 0600 sessions
    # file, for `tunnelctl open SESSION`); nothing else there does
    listed = json.loads(d.ctl("sessions", "--json").stdout)
    saved = d.state_file.with_name("sessions.json")
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    records = json.loads(saved.read_text())
    for where in (listed, records):
        assert any(secret in u["local"] for x in where["sessions"] for u in x["urls"]), where
        for x in where["sessions"]:
            x.pop("urls")
    places = {
        "daemon stderr": d.log(tail=None),
        "daemon log file": log_file.read_text(errors="replace"),
        "list --json": d.ctl("list", "--json").stdout,
        "list": d.ctl("list").stdout,
        "sessions --json without urls": json.dumps(listed),
        "sessions file without urls": json.dumps(records),
        "status --json": d.ctl("status", "--json").stdout,
        "state file": d.state_file.read_text(),
    }
    assert "opening http://127.0.0.1:" in places["daemon log file"]   # the opens were logged
    for where, text in places.items():
        for s in (secret, secret2, password, frag):
            assert s not in text, f"{s} found in {where}:\n{text[-3000:]}"
    # the session's own log is the program's output, kept as printed (and private: 0600)
    session_log = Path(listed["sessions"][0]["log"])
    assert secret in session_log.read_text()
    assert stat.S_IMODE(session_log.stat().st_mode) == 0o600
    assert r.returncode == 0
    d.ctl("kill", "lab")


def _free(d) -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# -- files: nothing tunneld writes is readable by other users --------------------------------


def _exposed(root: Path) -> list[str]:
    """Files under ``root`` that another user could read, assuming everything above ``root``
    is open (a 0755 home): group/other-readable, below directories they can all search."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        chain = [d, *[p for p in d.parents if root in (p, *p.parents)]]
        searchable = all(os.stat(p).st_mode & 0o011 for p in chain)
        for name in filenames:
            p = d / name
            if searchable and os.lstat(p).st_mode & 0o044:
                out.append(f"{oct(stat.S_IMODE(os.lstat(p).st_mode))} {p}")
    return out


@pytest.mark.timeout(90)
def test_files_tunneld_writes_are_private(daemon, sshd, echo_server, free_port):
    state_dir = sshd.home / ".local" / "state" / "tunneld"
    # a log left world-readable by an older run: reusing its session name makes it 0600
    (state_dir / "sessions").mkdir(parents=True, exist_ok=True)
    old = state_dir / "sessions" / "privy.log"
    old.write_text("old output\n")
    old.chmod(0o644)
    _, rport = echo_server()
    daemon.ctl("add", sshd.host, f"{free_port()}:127.0.0.2:{rport}")
    daemon.ctl("run", sshd.host, "--name", "privy", "--follow", "--", "echo", "hi")
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    assert stat.S_IMODE(daemon.state_file.stat().st_mode) == 0o600
    for p in (daemon.socket, Path(str(daemon.socket) + ".lock")):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    for d in (daemon.socket.parent, state_dir / "sessions", state_dir / "log"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    assert daemon.stop() == 0
    assert _exposed(state_dir) == [] and _exposed(daemon.socket.parent) == []


# -- arguments of the wrong type leave nothing behind -----------------------------------------


def _request(daemon, cmd: str, **args) -> dict:
    with connect(daemon.socket, timeout=30) as s:
        s.sendall(json.dumps({"cmd": cmd, "proto": 1, "args": args}).encode() + b"\n")
        reply = Lines(s).read()
    assert reply is not None
    return reply


@pytest.mark.timeout(90)
def test_wrongly_typed_flags_and_failed_runs_leave_nothing_behind(daemon, free_port):
    """Found by the fuzz run: ``"public": "false"`` counted as true (any non-empty value did),
    ``"port": true`` was taken as port 1, and a `run` that failed before its session started
    (bad port, no free port, host down) left a host supervisor reconnecting forever."""
    daemon.config_file.parent.mkdir(parents=True, exist_ok=True)
    daemon.config_file.write_text("[defaults]\nconnect_timeout = 2\nhold_timeout = 1\n")
    assert daemon.stop() == 0
    daemon.start()
    port = free_port("0.0.0.0")
    for flag in ("false", "no", 1, [True], {"x": 1}):
        # refused at the boundary: a flag is true or false (wire.ARGS), never "truthy"
        err = assert_error(_request(daemon, "add", host="nosuchhost.invalid",
                                    specs=[f"0.0.0.0:{port}:x:1"], public=flag), "UsageError")
        assert err["message"] == f"'public' must be true or false, not {flag!r}", err
    err = assert_error(_request(daemon, "add", host="nosuchhost.invalid",
                                specs=[f"0.0.0.0:{port}:x:1"], public=False), "UsageError")
    assert "Pass --public" in err["message"], err
    err = assert_error(_request(daemon, "add", host="testhost", specs=["1"], pubilc=True),
                       "UsageError")
    assert err["message"].startswith("add takes no argument 'pubilc'"), err
    for bad in (True, False, 0, 65536, "80", 1.5, [80]):
        err = assert_error(_request(daemon, "run", host="nosuchhost.invalid",
                                    command=["echo"], port=bad), "UsageError")
        assert err["message"] == f"--port takes 'auto' or a port number, not {bad!r}", err
    err = assert_error(_request(daemon, "run", host="nosuchhost.invalid", command=["echo"],
                                port="auto"), "UsageError")
    assert "no host 'nosuchhost.invalid'" in err["message"], err   # a typo, say
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    daemon.server.add_host_alias("downhost", Port=str(dead))
    err = assert_error(_request(daemon, "run", host="downhost", command=["echo"],
                                port="auto"), "ConnectError")
    assert "connection refused" in err["message"], err
    assert daemon.list()["hosts"] == [], daemon.list()
    assert json.loads(daemon.ctl("sessions", "--json").stdout)["sessions"] == []


@pytest.mark.timeout(60)
def test_jupyter_redirect_path_is_quoted_for_the_remote_shell(daemon, sshd, tmp_path):
    """The one remote command built from printed text (reading Jupyter's redirect page) quotes
    the path: shell syntax in it names a file that does not exist, and runs nothing (the
    server is this machine, so a canary would show an injection)."""
    canary = tmp_path / "jupyter-canary"
    for path in (f"/tmp/$(touch${{IFS}}{canary})/jpserver-1-open.html",
                 f"/tmp/`touch${{IFS}}{canary}`;touch${{IFS}}{canary}/nbserver-2-open.html"):
        r = daemon.ctl("open", sshd.host, f"file://{path}", check=False)
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert r.stderr.startswith(f"tunnelctl: {sshd.host}: not opened: {path} on the server "
                                   "holds no URL ("), r.stderr
        assert "No such file or directory" in r.stderr, r.stderr
    assert not canary.exists()
