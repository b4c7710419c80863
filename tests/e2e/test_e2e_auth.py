"""Logins that need a person, relayed through tunnelctl in a pseudo-terminal (issue 8).

The server is ``authserver.py`` (asyncssh in its own process: keyboard-interactive with a
password and a verification code), reached through the alias ``authhost`` in the sshd fixture's
HOME; encrypted keys are tested against the real sshd.  tunnelctl runs in a pty that is its
controlling terminal, as when a person types.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Daemon, SSHServer
from netutil import roundtrip
from ptyproc import PtyProc
from test_e2e_errors import _closed_within, _log_lines, _transitions

PASSWORD = "Hunter2-sekrit-pw"
CODE = "424242-otp-code"
WRONG_PASSWORD = "Wrong-pw-Zq9xx"
WRONG_CODE = "000111-bad-code"
PASSPHRASE = "Passphrase-Kx7-secret"
SECRETS = (PASSWORD, CODE, WRONG_PASSWORD, WRONG_CODE, PASSPHRASE)
ALIAS = "authhost"
AUTHSERVER = Path(__file__).with_name("authserver.py")
#: seconds a pty read may wait for an expected text
EXPECT_TIMEOUT = 30.0


# -- tunnelctl in a pseudo-terminal ---------------------------------------------------------------


class Pty(PtyProc):
    """``tunnelctl ARGS`` with a pty as its controlling terminal (stdin, stdout, stderr)."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        super().__init__([sys.executable, "-m", "tunnelctl", *args], env)


def _login(daemon: Daemon, answers: list[tuple[str, str | None]], *args: str) -> Pty:
    """Run tunnelctl ARGS in a pty; for each (prompt, answer) wait for the prompt and type
    the answer (None: only wait); return it ended.  Type only after the prompt itself: text
    typed before getpass turned echo off would be echoed (as in any terminal)."""
    p = Pty(daemon.env, *args)
    try:
        for prompt, answer in answers:
            p.expect(prompt)
            if answer is not None:
                p.send(answer + "\n")
        p.wait()
    finally:
        p.kill()
    return p


RIGHT = [("(authhost) Password: ", PASSWORD), ("Verification code: ", CODE)]
WRONG = [("(authhost) Password: ", WRONG_PASSWORD), ("Verification code: ", WRONG_CODE)]


# -- the server and the daemon --------------------------------------------------------------------


@dataclass
class AuthServer:
    proc: subprocess.Popen
    port: int
    dir: Path

    def attempts(self) -> list[str]:
        try:
            return (self.dir / "attempts").read_text().splitlines()
        except FileNotFoundError:
            return []

    def drop_connections(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)


@pytest.fixture
def authserver(sshd, tmp_path):
    d = tmp_path / "authserver"
    d.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(AUTHSERVER), "--host-key", str(sshd.host_key), "--dir", str(d),
         "--password", PASSWORD, "--code", CODE], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=open(d / "stderr", "wb"), start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not (d / "port").exists():
            assert proc.poll() is None, (d / "stderr").read_text()
            assert time.monotonic() < deadline, "authserver did not start"
            time.sleep(0.05)
        port = int((d / "port").read_text())
        algo, key = sshd.host_key.with_suffix(".pub").read_text().split()[:2]
        with sshd.known_hosts.open("a") as f:
            f.write(f"[127.0.0.1]:{port} {algo} {key}\n")
        sshd.add_host_alias(ALIAS, HostName="127.0.0.1", Port=str(port))
        yield AuthServer(proc, port, d)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def notes(tmp_path) -> Path:
    """A fake notify-send first on the daemon's PATH; it appends its arguments here."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    out = tmp_path / "notifications"
    script = bindir / "notify-send"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" >> {out}\n")
    script.chmod(0o755)
    return out


@pytest.fixture
def adaemon(sshd, authserver, notes):
    # DEBUG: asyncssh's own debug lines are checked for answers too
    d = Daemon(sshd, {"PATH": f"{notes.parent / 'bin'}:{os.environ['PATH']}",
                      "TUNNELD_LOG_LEVEL": "DEBUG"})
    # longer than _no_tty_ctl's limit: a command that waits for an attempt that is not
    # coming (the host waits for a person) shows up as a hang, not as a slow success
    d.config_file.parent.mkdir(parents=True, exist_ok=True)
    d.config_file.write_text(f"[defaults]\nconnect_timeout = {NO_TTY_LIMIT + 30}\n")
    d.start()
    try:
        yield d
    finally:
        d.close()


#: seconds a tunnelctl without a terminal may take
NO_TTY_LIMIT = 60


def _no_tty_ctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """tunnelctl without a controlling terminal (as from a script or a service)."""
    return subprocess.run([sys.executable, "-m", "tunnelctl", *args], env=daemon.env,
                          capture_output=True, text=True, timeout=NO_TTY_LIMIT,
                          start_new_session=True, stdin=subprocess.DEVNULL)


def _assert_no_secrets(daemon: Daemon, *more: str) -> None:
    places = {"daemon log": daemon.stderr_path.read_text(errors="replace"),
              "list --json": daemon.ctl("list", "--json").stdout}
    if daemon.state_file.exists():
        places["state file"] = daemon.state_file.read_text()
    for i, text in enumerate(more):
        places[f"extra {i}"] = text
    for log in daemon.server.home.rglob("*.log"):
        places[str(log)] = log.read_text(errors="replace")
    for where, text in places.items():
        for secret in SECRETS:
            assert secret not in text, f"an answer appears in the {where}"


# -- tests ----------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_right_answers_connect_and_forward(adaemon, authserver, echo_server, free_port):
    _, rport = echo_server()
    lport = free_port()
    p = _login(adaemon, RIGHT, "add", ALIAS, f"{lport}:127.0.0.2:{rport}")
    assert p.status == 0, p.text
    assert f"{ALIAS}: added" in p.text, p.text
    assert PASSWORD not in p.text and CODE not in p.text, "a secret was echoed"
    assert adaemon.host(ALIAS)["state"] == "connected"
    assert authserver.attempts() == ["kbdint ok"]
    assert roundtrip(lport, b"through an interactive login\n") == \
        b"through an interactive login\n"
    _assert_no_secrets(adaemon, p.text)


@pytest.mark.timeout(120)
def test_login_to_a_host_without_forwards_checks_it(adaemon, authserver):
    p = _login(adaemon, RIGHT, "login", ALIAS)
    assert p.status == 0, p.text
    assert "the login works" in p.text, p.text
    assert authserver.attempts() == ["kbdint ok"]
    assert adaemon.list()["hosts"] == []   # nothing uses it: released, as after `open`
    p = _login(adaemon, WRONG * 3, "login", ALIAS)
    assert p.status == 1 and "rejected the answers" in p.text, p.text
    assert adaemon.list()["hosts"] == []


@pytest.mark.timeout(180)
def test_no_terminal_then_wrong_answers_then_login(adaemon, authserver, notes, echo_server,
                                                   free_port):
    _, rport = echo_server()
    lport = free_port()
    # no terminal: nothing is asked, the server sees no try, needs-auth, run `tunnelctl login`
    r = _no_tty_ctl(adaemon, "add", ALIAS, f"{lport}:127.0.0.2:{rport}")
    assert r.returncode == 0, r.stderr
    assert f"{ALIAS} is needs-auth" in r.stderr and f"tunnelctl login {ALIAS}" in r.stderr, \
        r.stderr
    assert authserver.attempts() == []
    adaemon.wait_for(lambda: notes.exists() and f"tunnelctl login {ALIAS}" in notes.read_text(),
                     10, "a desktop notification")

    # wrong answers: asked a bounded number of times, a clear message, exit 1, no loop
    p = _login(adaemon, WRONG * 3, "login", ALIAS)
    assert p.status == 1, p.text
    assert "Permission denied, please try again." in p.text, p.text
    assert "rejected the answers" in p.text and f"tunnelctl login {ALIAS}" in p.text, p.text
    assert authserver.attempts() == ["kbdint fail"] * 3
    tries = _transitions(adaemon, ALIAS, "connecting")
    time.sleep(3)
    assert authserver.attempts() == ["kbdint fail"] * 3
    assert _transitions(adaemon, ALIAS, "connecting") == tries
    assert adaemon.host(ALIAS)["state"] == "needs-auth"
    assert _closed_within(lport, 5) < 5

    # more forwards, a session or an open on a host that waits for a person, with nobody to
    # answer: taken (the forward) or refused at once, no attempt, nothing asked
    r = _no_tty_ctl(adaemon, "add", ALIAS, f"{free_port()}:127.0.0.2:{rport}")
    assert r.returncode == 0 and f"{ALIAS} is needs-auth" in r.stderr, r.stderr
    r = _no_tty_ctl(adaemon, "open", ALIAS, "http://127.0.0.1:9/")
    assert r.returncode == 1 and f"tunnelctl login {ALIAS}" in r.stderr, r.stderr
    assert authserver.attempts() == ["kbdint fail"] * 3
    assert _transitions(adaemon, ALIAS, "connecting") == tries

    # `tunnelctl login` with the right answers recovers it
    p = _login(adaemon, RIGHT, "login", ALIAS)
    assert p.status == 0, p.text
    assert f"{ALIAS}: connected" in p.text
    assert roundtrip(lport, b"after login\n") == b"after login\n"
    _assert_no_secrets(adaemon, p.text, r.stderr, notes.read_text())


@pytest.mark.timeout(180)
def test_lost_link_goes_to_needs_auth_without_retry(adaemon, authserver, notes, echo_server,
                                                    free_port):
    _, rport = echo_server()
    lport = free_port()
    events = subprocess.Popen([sys.executable, "-m", "tunnelctl", "events", "--json"],
                              env=adaemon.env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        p = _login(adaemon, RIGHT, "add", ALIAS, f"{lport}:127.0.0.2:{rport}")
        assert p.status == 0, p.text
        assert adaemon.host(ALIAS)["state"] == "connected"

        authserver.drop_connections()
        adaemon.wait_for(lambda: adaemon.host(ALIAS)["state"] == "needs-auth", 30,
                         "needs-auth after the link was lost")
        h = adaemon.host(ALIAS)
        assert f"tunnelctl login {ALIAS}" in h["last_error"], h
        assert authserver.attempts() == ["kbdint ok"]   # the reconnect sent no answers
        tries = _transitions(adaemon, ALIAS, "connecting")
        time.sleep(3)
        assert _transitions(adaemon, ALIAS, "connecting") == tries
        assert authserver.attempts() == ["kbdint ok"]
        assert _transitions(adaemon, ALIAS, "needs-auth") == 1
        adaemon.wait_for(lambda: notes.exists() and
                         f"tunnelctl login {ALIAS}" in notes.read_text(), 10,
                         "a desktop notification")
        # a client of the forward is closed, and the log says why
        assert _closed_within(lport, 5) < 5
        adaemon.wait_for(lambda: any("closed client" in line and "needs-auth" in line
                                     for line in _log_lines(adaemon)), 10, "the log line")

        p = _login(adaemon, RIGHT, "login", ALIAS)
        assert p.status == 0, p.text
        assert roundtrip(lport, b"back\n") == b"back\n"
    finally:
        events.terminate()
        out, _ = events.communicate(timeout=10)
    assert '"new": "needs-auth"' in out, out
    _assert_no_secrets(adaemon, out, notes.read_text())


@pytest.mark.timeout(120)
def test_ctrl_c_at_the_prompt_leaves_needs_auth(adaemon, authserver, free_port):
    lport = free_port()
    r = _no_tty_ctl(adaemon, "add", "--no-prompt", ALIAS, f"{lport}:127.0.0.2:9")
    assert "needs-auth" in r.stderr, r.stderr
    p = Pty(adaemon.env, "login", ALIAS)
    try:
        p.expect("(authhost) Password: ")
        p.send("\x03")
        assert p.wait() == 130, p.text
    finally:
        p.kill()
    adaemon.wait_for(lambda: "abandoned" in (adaemon.host(ALIAS)["last_error"] or ""), 20,
                     "the abandoned login")
    assert adaemon.host(ALIAS)["state"] == "needs-auth"
    tries = _transitions(adaemon, ALIAS, "connecting")
    time.sleep(3)
    assert _transitions(adaemon, ALIAS, "connecting") == tries
    assert authserver.attempts() == []

    # the terminal goes away at the prompt (tunnelctl dies with it): abandoned too
    p = Pty(adaemon.env, "login", ALIAS)
    try:
        p.expect("(authhost) Password: ")
    finally:
        p.kill()
    adaemon.wait_for(lambda: "went away" in (adaemon.host(ALIAS)["last_error"] or ""), 20,
                     "the login abandoned by a closed terminal")
    assert adaemon.host(ALIAS)["state"] == "needs-auth"
    assert authserver.attempts() == []

    # `tunnelctl reconnect HOST` in a terminal asks too
    p = _login(adaemon, RIGHT, "reconnect", ALIAS)
    assert p.status == 0 and f"{ALIAS}: connected" in p.text, p.text
    assert authserver.attempts() == ["kbdint ok"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("key_format", ["openssh", "pem"])
def test_encrypted_key_passphrase_held_for_the_daemon_run(sshd, tmp_path, echo_server,
                                                         free_port, key_format):
    key = tmp_path / "locked_key"
    # OpenSSH's own format (ssh-keygen's default; asyncssh decrypts it with bcrypt, a
    # dependency) and PEM (decrypted by `cryptography`)
    fmt = ["-m", "PEM"] if key_format == "pem" else []
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", *fmt, "-N", PASSPHRASE, "-C",
                    "locked", "-f", str(key)], check=True, capture_output=True, timeout=30,
                   stdin=subprocess.DEVNULL)
    assert (b"BEGIN OPENSSH PRIVATE KEY" in key.read_bytes()) == (key_format == "openssh")
    with sshd.authorized_keys.open("a") as f:
        f.write(key.with_suffix(".pub").read_text())
    sshd.add_host_alias("lockedhost", IdentityFile=str(key))
    _, rport = echo_server()
    lport = free_port()
    d = Daemon(sshd)
    assert "SSH_AUTH_SOCK" not in d.env
    d.start()
    try:
        r = d.ctl("add", "--no-prompt", "lockedhost", f"{lport}:127.0.0.2:{rport}")
        assert "lockedhost is needs-auth" in r.stderr, r.stderr
        assert "passphrase" in r.stderr and f"ssh-add {key}" in r.stderr, r.stderr

        p = _login(d, [("Enter passphrase for key", "not the passphrase"),
                       ("Bad passphrase, try again.", None),
                       ("Enter passphrase for key", PASSPHRASE)], "login", "lockedhost")
        assert p.status == 0, p.text
        assert f"Enter passphrase for key '{key}'" in p.text, p.text
        assert roundtrip(lport, b"key unlocked\n") == b"key unlocked\n"

        # held in memory: a reconnect with nobody to ask connects
        r = d.ctl("reconnect", "--no-prompt", "lockedhost")
        assert "lockedhost: connected" in r.stdout, r.stdout
        _assert_no_secrets(d, p.text)

        # ... but only for this daemon run
        d.stop()
        d.start()
        d.wait_for(lambda: d.host("lockedhost")["state"] == "needs-auth", 30,
                   "needs-auth after a restart")
        assert "passphrase" in d.host("lockedhost")["last_error"]
        _assert_no_secrets(d)
    finally:
        d.close()


# -- a real OpenSSH sshd with password logins for a throw-away user ------------------------------


@pytest.fixture
def pw_user():
    """A throw-away local user whose password is PASSWORD (removed at teardown)."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("chpasswd"):
        pytest.skip("a password login to a real sshd needs root and useradd/chpasswd to make "
                    "a throw-away user")
    name = f"tdpw{os.getpid() % 100000}"
    subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True, timeout=30)
    subprocess.run(["userdel", name], capture_output=True, timeout=30)  # a leftover
    subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-s", "/bin/sh", name], check=True,
                   capture_output=True, timeout=30)
    try:
        subprocess.run(["chpasswd"], input=f"{name}:{PASSWORD}\n", text=True, check=True,
                       capture_output=True, timeout=30)
        yield name
    finally:
        # its sessions' processes first (userdel refuses a user who still runs something)
        deadline = time.monotonic() + 10
        while True:
            subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True, timeout=30)
            r = subprocess.run(["userdel", name], capture_output=True, text=True, timeout=30)
            if r.returncode in (0, 6) or time.monotonic() > deadline:   # 6: no such user
                break
            time.sleep(0.2)
        assert r.returncode in (0, 6), f"userdel {name}: {r.stderr.strip()}"


@pytest.fixture
def pw_sshd(tmp_path, pw_user):
    """A real sshd that accepts passwords (through PAM's keyboard-interactive where PAM is
    set up, else plain password auth), with the alias ``pwhost`` for ``pw_user``."""
    server = SSHServer.create(tmp_path / "pw")
    pam = os.path.exists("/etc/pam.d/sshd")
    text = server.sshd_config.read_text()
    for old, new in (("UsePAM no", f"UsePAM {'yes' if pam else 'no'}"),
                     ("PasswordAuthentication no", "PasswordAuthentication yes"),
                     ("KbdInteractiveAuthentication no", "KbdInteractiveAuthentication yes")):
        assert old in text
        text = text.replace(old, new)
    server.sshd_config.write_text(text)
    server.add_host_alias("pwhost", User=pw_user, PubkeyAuthentication="no")
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.mark.timeout(180)
def test_real_sshd_password_login(pw_sshd, echo_server, free_port):
    _, rport = echo_server()
    lport = free_port()
    d = Daemon(pw_sshd)
    d.start()
    try:
        r = _no_tty_ctl(d, "add", "pwhost", f"{lport}:127.0.0.2:{rport}")
        assert "pwhost is needs-auth" in r.stderr and "tunnelctl login pwhost" in r.stderr, \
            r.stderr
        p = _login(d, [("(pwhost) ", None), ("assword: ", WRONG_PASSWORD),
                       ("Permission denied, please try again.", None),
                       ("assword: ", PASSWORD)], "login", "pwhost")
        assert p.status == 0, p.text + d.log()
        assert "pwhost: connected" in p.text, p.text
        assert WRONG_PASSWORD not in p.text and PASSWORD not in p.text, "a secret was echoed"
        assert roundtrip(lport, b"through sshd's password login\n") == \
            b"through sshd's password login\n"
        _assert_no_secrets(d, p.text, r.stderr)
    finally:
        d.close()


@pytest.mark.timeout(180)
def test_run_asks_for_the_login_first(pw_sshd):
    """`tunnelctl run` on a host whose login needs a person answers the prompts in its
    terminal before the session starts (no needs-auth detour through `tunnelctl login`)."""
    d = Daemon(pw_sshd)
    d.start()
    try:
        p = _login(d, [("(pwhost) ", None), ("assword: ", PASSWORD), ("prompted-run-ok", None)],
                   "run", "pwhost", "--no-detach", "--follow", "--", "echo", "prompted-run-ok")
        assert p.status == 0, p.text + d.log()
        assert PASSWORD not in p.text, "the password was echoed"
        sessions = json.loads(d.ctl("sessions", "--json").stdout)["sessions"]
        assert [(x["host"], x["state"], x["exit_status"]) for x in sessions] == \
            [("pwhost", "exited", 0)], sessions
        # no terminal: nothing is asked, and the session says why it could not start
        d.stop()
        d.start()
        r = _no_tty_ctl(d, "run", "pwhost", "--no-detach", "--follow", "--", "echo", "x")
        assert "x\n" not in r.stdout and r.returncode != 0, (r.stdout, r.stderr)
        assert "tunnelctl login pwhost" in r.stderr + d.log(), r.stderr
        _assert_no_secrets(d, p.text)
    finally:
        d.close()
