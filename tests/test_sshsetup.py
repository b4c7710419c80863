"""`tunnelctl ssh-config`: the pure texts (tunneld.conf, the Include line in ~/.ssh/config) as
tables, the verb run as a subprocess in a temporary HOME, and what the real OpenSSH client
makes of the files (``ssh -G``).  No daemon: a fake one answers ``list`` where one is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from tunnelctl import sshinstall, sshsetup
from tunnelctl.client import Failed
from tunneld import __version__, paths, wire

pytestmark = pytest.mark.timeout(60)

HOME = "/home/me"
CONF = f"{HOME}/.ssh/tunneld.conf"
TOP = f"{sshsetup.COMMENT}\n{sshsetup.INCLUDE_LINE}\n"
SSH = shutil.which("ssh") or "/usr/bin/ssh"


# -- the Include line ----------------------------------------------------------------------------

CONFIGS = {
    "empty": "",
    "only-newline": "\n",
    "comment-header": "# my ssh config\n# keep it tidy\n",
    "global-options": "User bob\nServerAliveInterval 30\n\nHost a\n  HostName a.example\n",
    "host-first": "Host a\n  User b\n",
    "match-first": "Match host a\n  User b\n",
    "lowercase-equals": "host=a\n  user=b\n",
    "indented-host": "  Host a\n    User b\n",
    "no-trailing-newline": "Host a\n  User b",
    "crlf": "Host a\r\n  User b\r\n",
    "leading-blank": "\nHost a\n",
    "other-include": "Include conf.d/*\nHost a\n  User b\n",
    "commented-include": "# Include ~/.ssh/tunneld.conf\nHost a\n",
    "not-utf8": "Host caf\udce9\n",
}


@pytest.mark.parametrize("text", CONFIGS.values(), ids=CONFIGS.keys())
def test_the_include_goes_at_the_top_once_and_comes_out_exactly(text):
    new = sshsetup.add_include(text, CONF, HOME)
    assert new.startswith(TOP)
    at = sshsetup.installed(new, CONF, HOME)
    assert at == 1
    first = sshsetup.first_block(new)
    assert first is None or at < first            # before every Host/Match line
    assert new.count("\r") == text.count("\r")    # no CR of ours
    assert new.endswith(text)                     # the user's text is untouched
    assert sshsetup.add_include(new, CONF, HOME) == new           # idempotent
    assert sshsetup.remove_include(new, CONF, HOME) == text       # exactly as it was
    assert sshsetup.remove_include(text, CONF, HOME) == text      # nothing to remove


@pytest.mark.parametrize("line", [
    "Include ~/.ssh/tunneld.conf", f"Include {CONF}", "include tunneld.conf",
    "Include=~/.ssh/tunneld.conf", '  Include "~/.ssh/tunneld.conf" conf.d/*',
    "INCLUDE ~/.ssh/../.ssh/tunneld.conf",
])
def test_an_include_written_otherwise_counts(line):
    text = f"# header\n{line}\nHost a\n  User b\n"
    assert sshsetup.installed(text, CONF, HOME) == 1
    assert sshsetup.add_include(text, CONF, HOME) == text


def test_an_include_inside_a_host_block_does_not_count():
    text = "Host a\n  User b\n  Include ~/.ssh/tunneld.conf\n"
    assert sshsetup.installed(text, CONF, HOME) is None
    new = sshsetup.add_include(text, CONF, HOME)
    assert new == TOP + "\n" + text
    assert sshsetup.misplaced(new, CONF, HOME) == [5]
    # uninstall takes out both (the file they name goes away)
    assert sshsetup.remove_include(new, CONF, HOME) == "Host a\n  User b\n"


@pytest.mark.parametrize("text,expected", [
    ("Include ~/.ssh/tunneld.conf\nHost a\n", "Host a\n"),               # the user's own
    ("Include ~/.ssh/tunneld.conf conf.d/*\nHost a\n", "Include conf.d/*\nHost a\n"),
    ('Include "/home/me/.ssh/tunneld.conf" "my dir/x"\n', 'Include "my dir/x"\n'),
    ("Include ~/.ssh/other.conf\n", "Include ~/.ssh/other.conf\n"),
    (TOP + "Host a\n", "Host a\n"),           # our lines without the blank (edited by hand)
])
def test_remove_include(text, expected):
    assert sshsetup.remove_include(text, CONF, HOME) == expected


@pytest.mark.parametrize("value,expected", [
    ("/run/user/1000/tunneld/mux/barhal", "/run/user/1000/tunneld/mux/barhal"),
    ("/Users/Jane Doe/x", '"/Users/Jane Doe/x"'),
    ("/tmp/a#b", '"/tmp/a#b"'),
    ("/tmp/it's", "\"/tmp/it's\""),
])
def test_quote(value, expected):
    assert sshsetup.quote(value) == expected


@pytest.mark.parametrize("value", ['/tmp/a"b', "/tmp/a\\b", "/tmp/a\nb", "/tmp/${HOME}", ""])
def test_quote_refuses_what_ssh_reads_differently(value):
    with pytest.raises(ValueError):
        sshsetup.quote(value)


def test_control_path_doubles_percent_signs():
    assert sshsetup.control_path("/tmp/50%/mux/a%b") == "/tmp/50%%/mux/a%%b"
    assert sshsetup.control_path("/tmp/my dir/mux/", "%n") == '"/tmp/my dir/mux/%n"'


@pytest.mark.parametrize("name,ok", [
    ("barhal", True), ("hpc.example.org", True), ("10.0.0.5", True), ("a_b-c", True),
    ("me@hpc", False), ("-oProxyCommand=x", False), ("a b", False), ("a*", False),
    ("!a", False), ("a,b", False),
])
def test_host_problem(name, ok):
    assert (sshsetup.host_problem(name) is None) == ok


def test_conf_text_per_host():
    text = sshsetup.conf_text({"hpc": "/r/mux/hpc", "barhal": "/r/mux/barhal"}, "/r/mux")
    assert text.startswith("# Written by `tunnelctl ssh-config --install`; do not edit it")
    assert "with tunneld down, ssh makes its own connection as before" in text
    assert text.endswith("\n") and "\r" not in text
    body = text.split("\n\n", 1)[1]
    assert body == ("Host barhal\n    ControlPath /r/mux/barhal\n    ControlMaster no\n\n"
                    "Host hpc\n    ControlPath /r/mux/hpc\n    ControlMaster no\n")
    assert "Host" not in sshsetup.conf_text({}, "/r/mux").replace("# ", "")


def test_conf_text_all_hosts_puts_hashed_names_first():
    long = "x" * 120
    sockets = {"hpc": "/r/mux/hpc", long: "/r/mux/h-0123", "h-node": "/r/mux/h-4567"}
    text = sshsetup.conf_text(sockets, "/r/mux", all_hosts=True)
    blocks = text.split("\n\n")[1:]
    assert blocks[0] == "Host h-node\n    ControlPath /r/mux/h-4567\n    ControlMaster no"
    assert blocks[1] == f"Host {long}\n    ControlPath /r/mux/h-0123\n    ControlMaster no"
    limit = sshsetup.MAX_SOCKET_PATH - len("/r/mux/")
    assert blocks[2] == (f"Host * !h-* !{'?' * limit}*\n    ControlPath /r/mux/%n\n"
                         "    ControlMaster no\n")
    assert len(blocks) == 3          # hpc is served by Host *


def test_the_socket_limit_is_the_daemons():
    assert sshsetup.MAX_SOCKET_PATH == paths.MAX_SOCKET_PATH


def test_a_path_ssh_cannot_read_is_refused():
    with pytest.raises(ValueError):
        sshsetup.conf_text({"a": '/r/"q"/a'}, '/r/"q"')


# -- the verb ------------------------------------------------------------------------------------

@pytest.fixture
def env(tmp_path):
    """A temp HOME and XDG dirs; a runtime dir (0700, short: socket paths) nothing listens in;
    autostart off."""
    rundir = Path(tempfile.mkdtemp(prefix="tssh-", dir="/tmp"))
    home = tmp_path / "home"
    home.mkdir()
    e = dict(os.environ)
    e.pop("TUNNELD_CONFIG", None)
    e.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
             XDG_STATE_HOME=str(home / ".local" / "state"), XDG_RUNTIME_DIR=str(rundir),
             TUNNELD_SOCKET=str(rundir / "tunneld.sock"), TUNNELD_NO_AUTOSTART="1")
    try:
        yield e
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def ctl(env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tunnelctl", *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


def home(env) -> Path:
    return Path(env["HOME"])


def mux(env) -> str:
    return f"{env['XDG_RUNTIME_DIR']}/tunneld/mux"


def managed(env, config: tuple[str, ...] | list[str] = (),
            state: tuple[str, ...] | list[str] = ()) -> None:
    """Hosts with forwards in config.toml and in the state file."""
    cfg = Path(env["XDG_CONFIG_HOME"]) / "tunneld" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("[defaults]\nbind = \"127.0.0.1\"\n[hosts.quiet]\nprinted_urls = \"open\"\n"
                   + "".join(f'[hosts."{h}"]\nforwards = ["8090"]\n' for h in config))
    st = Path(env["XDG_STATE_HOME"]) / "tunneld" / "forwards.json"
    st.parent.mkdir(parents=True, exist_ok=True)
    st.write_text(json.dumps({"version": 1, "hosts": {h: ["8888"] for h in state}}))


def backups(env) -> list[Path]:
    return sorted((home(env) / ".ssh").glob("config.tunneld-backup-*"))


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_print_mode_changes_nothing(env):
    managed(env, config=["barhal"], state=["hpc", "me@hpc"])
    r = ctl(env, "ssh-config")
    assert r.returncode == 0, r.stderr
    assert f"Host barhal\n    ControlPath {mux(env)}/barhal\n    ControlMaster no" in r.stdout
    assert f"Host hpc\n    ControlPath {mux(env)}/hpc" in r.stdout
    assert "Host quiet" not in r.stdout             # no forwards: not managed
    assert sshsetup.INCLUDE_LINE in r.stdout and "--install" in r.stdout
    assert "me@hpc: not served" in r.stderr
    assert not (home(env) / ".ssh").exists()
    j = json.loads(ctl(env, "ssh-config", "--json").stdout)
    assert j["hosts"] == ["barhal", "hpc"] and j["installed"] is False
    assert j["sockets"]["hpc"] == f"{mux(env)}/hpc"
    assert j["conf"] == str(home(env) / ".ssh" / "tunneld.conf")
    assert f"    ControlPath {mux(env)}/barhal" in j["lines"]


def test_install_creates_the_files_and_a_second_run_changes_nothing(env):
    managed(env, config=["barhal"])
    r = ctl(env, "ssh-config", "--install")
    assert r.returncode == 0, r.stderr
    ssh = home(env) / ".ssh"
    assert mode(ssh) == 0o700 and mode(ssh / "config") == 0o600
    assert mode(ssh / "tunneld.conf") == 0o600
    assert (ssh / "config").read_text() == TOP
    assert "Host barhal" in (ssh / "tunneld.conf").read_text()
    assert "(new file)" in r.stdout and f"+{sshsetup.INCLUDE_LINE}" in r.stdout
    assert backups(env) == []
    r = ctl(env, "ssh-config", "--install")
    assert r.returncode == 0 and "already installed" in r.stdout and "up to date" in r.stdout
    assert (ssh / "config").read_text() == TOP and backups(env) == []
    assert list(ssh.glob(".*")) == []            # no temp file left


def test_install_into_an_existing_config_and_uninstall(env):
    managed(env, state=["hpc"])
    ssh = home(env) / ".ssh"
    ssh.mkdir(mode=0o755)
    original = "# mine\nUser bob\n\nHost hpc\n  HostName hpc.example.org\n  ControlMaster auto"
    (ssh / "config").write_text(original)
    (ssh / "config").chmod(0o640)
    r = ctl(env, "ssh-config", "--install")
    assert r.returncode == 0, r.stderr
    text = (ssh / "config").read_text()
    assert text == TOP + "\n" + original
    assert mode(ssh / "config") == 0o640 and mode(ssh) == 0o755     # kept
    [b] = backups(env)
    assert b.read_text() == original and mode(b) == 0o640
    assert f"--- {ssh / 'config'}  (backup: {b})" in r.stdout
    assert f"+{sshsetup.INCLUDE_LINE}" in r.stdout and " # mine" in r.stdout
    assert "Host hpc" in (ssh / "tunneld.conf").read_text()

    # a new host: tunneld.conf is rewritten, ~/.ssh/config is not touched again
    managed(env, config=["barhal"], state=["hpc"])
    r = ctl(env, "ssh-config", "--install")
    assert r.returncode == 0 and "wrote" in r.stdout and "already installed" in r.stdout
    assert "Host barhal" in (ssh / "tunneld.conf").read_text()
    assert (ssh / "config").read_text() == text and len(backups(env)) == 1

    r = ctl(env, "ssh-config", "--uninstall")
    assert r.returncode == 0, r.stderr
    assert (ssh / "config").read_text() == original
    assert not (ssh / "tunneld.conf").exists()
    assert mode(ssh / "config") == 0o640
    assert "removed the Include line" in r.stdout and f"-{sshsetup.INCLUDE_LINE}" in r.stdout
    assert len(backups(env)) in (1, 2)          # the same second: the name has a -2 then
    assert any(p.read_text() == text for p in backups(env))
    r = ctl(env, "ssh-config", "--uninstall")
    assert r.returncode == 0 and "not installed" in r.stdout


def test_bytes_that_are_not_utf8_are_kept(env):
    ssh = home(env) / ".ssh"
    ssh.mkdir(mode=0o700)
    env["PYTHONIOENCODING"] = "utf-8:strict"      # as in a UTF-8 locale
    original = b"# caf\xe9\nHost a\n"
    (ssh / "config").write_bytes(original)
    r = ctl(env, "ssh-config", "--install")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert (ssh / "config").read_bytes().endswith(original)
    assert backups(env)[0].read_bytes() == original
    assert ctl(env, "ssh-config", "--uninstall").returncode == 0
    assert (ssh / "config").read_bytes() == original


def test_a_symlinked_config_is_followed(env, tmp_path):
    managed(env, state=["hpc"])
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    (dotfiles / "ssh_config").write_text("Host hpc\n  User me\n")
    ssh = home(env) / ".ssh"
    ssh.mkdir(mode=0o700)
    (ssh / "config").symlink_to(dotfiles / "ssh_config")
    r = ctl(env, "ssh-config", "--install")
    assert r.returncode == 0, r.stderr
    assert (ssh / "config").is_symlink()
    assert "is a symlink: edited its target" in r.stdout and str(dotfiles) in r.stdout
    assert (dotfiles / "ssh_config").read_text().startswith(TOP)
    assert backups(env)[0].read_text() == "Host hpc\n  User me\n"
    assert list(dotfiles.iterdir()) == [dotfiles / "ssh_config"]
    assert ctl(env, "ssh-config", "--uninstall").returncode == 0
    assert (dotfiles / "ssh_config").read_text() == "Host hpc\n  User me\n"


def test_a_dangling_symlink_or_a_directory_is_an_error(env, tmp_path):
    ssh = home(env) / ".ssh"
    ssh.mkdir(mode=0o700)
    (ssh / "config").symlink_to(tmp_path / "gone")
    r = ctl(env, "ssh-config", "--install")
    assert r.returncode == 1
    assert f"{ssh / 'config'} is a symlink to {tmp_path / 'gone'}, which does not exist" \
        in r.stderr and "nothing was changed" in r.stderr
    assert sorted(p.name for p in ssh.iterdir()) == ["config"]
    (ssh / "config").unlink()
    (ssh / "config").mkdir()
    r = ctl(env, "ssh-config", "--install")
    assert r.returncode == 1 and "is not a regular file" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in ssh.iterdir()) == ["config"]


def test_a_failed_write_leaves_the_config_whole(env, monkeypatch):
    for k in ("HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR",
              "TUNNELD_SOCKET", "TUNNELD_NO_AUTOSTART"):
        monkeypatch.setenv(k, env[k])
    ssh = home(env) / ".ssh"
    ssh.mkdir(mode=0o700)
    (ssh / "config").write_text("Host a\n")
    real = os.replace

    def failing(src, dst):
        if str(dst).endswith("/config"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(sshinstall.os, "replace", failing)
    with pytest.raises(Failed) as exc:
        sshinstall.install(False)
    assert f"cannot write {ssh / 'config'} (No space left on device)" in str(exc.value)
    assert sshsetup.INCLUDE_LINE in str(exc.value)
    assert (ssh / "config").read_text() == "Host a\n"
    assert sorted(p.name for p in ssh.iterdir()) == ["config", "tunneld.conf"]


@pytest.mark.parametrize("argv", [["--install", "--uninstall"], ["--install", "--json"],
                                  ["--uninstall", "--all-hosts"]])
def test_usage_errors(env, argv):
    r = ctl(env, "ssh-config", *argv)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def fake_daemon(path: str, hosts: list[str]) -> socket.socket:
    """A socket at ``path`` answering every request with a ``list`` of ``hosts``."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                c.makefile("rb").readline()
                c.sendall(wire.encode(wire.ok(__version__, {"hosts": [
                    {"name": h} for h in hosts]})))
    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_the_running_daemons_hosts_are_served(env):
    managed(env, config=["barhal"])
    srv = fake_daemon(env["TUNNELD_SOCKET"], ["fromdaemon", "barhal"])
    try:
        r = ctl(env, "ssh-config", "--json")
    finally:
        srv.close()
    assert json.loads(r.stdout)["hosts"] == ["barhal", "fromdaemon"], r.stderr


def test_completion_knows_the_verb_and_its_flags(env):
    script = ctl(env, "completion", "bash").stdout
    assert "ssh-config" in script
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")

    def complete(*words: str) -> list[str]:
        prog = (f'tunnelctl() {{ "{sys.executable}" -m tunnelctl "$@"; }}\n{script}\n'
                f"COMP_WORDS=(tunnelctl {' '.join(words)})\nCOMP_CWORD={len(words)}\n"
                "_tunnelctl\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
        r = subprocess.run(["bash", "-c", prog], env=env, capture_output=True, text=True,
                           timeout=30)
        return [x for x in r.stdout.splitlines() if x]

    assert complete("ssh-") == ["ssh-config"]
    assert {"--install", "--uninstall", "--all-hosts", "--json"} <= \
        set(complete("ssh-config", "--"))
    assert complete("ssh-config", "") == []        # no host to complete
    zsh = ctl(env, "completion", "zsh").stdout
    assert "'ssh-config:" in zsh and "--all-hosts" in zsh


# -- the real OpenSSH ----------------------------------------------------------------------------

def ssh_g(env, name: str) -> dict[str, str]:
    """``ssh -G`` of ``name`` with the temp home's config: keyword → value."""
    r = subprocess.run([SSH, "-G", "-F", str(home(env) / ".ssh" / "config"), name], env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return dict(line.partition(" ")[::2] for line in r.stdout.splitlines())


needs_ssh = pytest.mark.skipif(not os.path.exists(SSH), reason="no OpenSSH client: "
                               "apt-get install -y openssh-client")


@needs_ssh
def test_ssh_reads_the_installed_files(env):
    managed(env, config=["barhal"], state=["hpc"])
    ssh = home(env) / ".ssh"
    ssh.mkdir(mode=0o700)
    (ssh / "config").write_text("Host *\n  ControlMaster auto\n  ControlPath ~/.ssh/cm-%C\n"
                                "Host hpc\n  User me\n")
    assert ctl(env, "ssh-config", "--install").returncode == 0
    g = ssh_g(env, "hpc")
    assert g["controlpath"] == f"{mux(env)}/hpc" and g["controlmaster"] == "false"
    assert g["user"] == "me"                       # the user's own settings still apply
    assert ssh_g(env, "barhal")["controlpath"] == f"{mux(env)}/barhal"
    other = ssh_g(env, "elsewhere")
    assert other["controlmaster"] == "auto" and "/.ssh/cm-" in other["controlpath"]

    long = "l" * 100
    managed(env, config=["barhal"], state=["hpc", long])
    assert ctl(env, "ssh-config", "--install", "--all-hosts").returncode == 0
    assert ssh_g(env, "elsewhere")["controlpath"] == f"{mux(env)}/elsewhere"
    assert ssh_g(env, "elsewhere")["controlmaster"] == "false"
    with_env = dict(os.environ, **{k: env[k] for k in ("HOME", "XDG_RUNTIME_DIR")})
    hashed = subprocess.run([sys.executable, "-c", "import sys; from tunneld import paths; "
                             "print(paths.mux_socket(sys.argv[1]))", long], env=with_env,
                            capture_output=True, text=True, timeout=30).stdout.strip()
    assert "/h-" in hashed and ssh_g(env, long)["controlpath"] == hashed
    # a long name tunneld does not manage gets no ControlPath of ours (ssh would refuse it)
    assert ssh_g(env, "m" * 100)["controlpath"] != f"{mux(env)}/{'m' * 100}"
    assert ctl(env, "ssh-config", "--uninstall").returncode == 0
    assert ssh_g(env, "hpc")["controlmaster"] == "auto"


@needs_ssh
def test_ssh_reads_a_quoted_path(tmp_path):
    rundir = Path(tempfile.mkdtemp(prefix="t sh ", dir="/tmp"))
    try:
        e = dict(os.environ, HOME=str(tmp_path), XDG_RUNTIME_DIR=str(rundir),
                 XDG_CONFIG_HOME=str(tmp_path / ".config"),
                 XDG_STATE_HOME=str(tmp_path / "state"), TUNNELD_NO_AUTOSTART="1",
                 TUNNELD_SOCKET=str(rundir / "tunneld.sock"))
        managed(e, state=["hpc"])
        r = ctl(e, "ssh-config", "--install")
        assert r.returncode == 0, r.stderr
        assert f'ControlPath "{rundir}/tunneld/mux/hpc"' in \
            (tmp_path / ".ssh" / "tunneld.conf").read_text()
        assert ssh_g(e, "hpc")["controlpath"] == f"{rundir}/tunneld/mux/hpc"
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


@needs_ssh
def test_with_tunneld_down_ssh_connects_by_itself(env, tmp_path):
    """No socket: not a word; a stale one (a daemon killed with -9): one line, then ssh goes
    on by itself (here to a closed port, so it fails there)."""
    managed(env, state=["hpc"])
    ssh = home(env) / ".ssh"
    ssh.mkdir(mode=0o700)
    (ssh / "config").write_text("Host hpc\n  HostName 127.0.0.1\n  Port 9\n")
    assert ctl(env, "ssh-config", "--install").returncode == 0
    argv = [SSH, "-F", str(ssh / "config"), "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
            "-o", f"UserKnownHostsFile={tmp_path}/kh", "hpc", "true"]
    r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 255 and "Control socket" not in r.stderr
    assert "port 9: Connection refused" in r.stderr
    sock = Path(mux(env)) / "hpc"
    sock.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()                       # the file stays, nobody listens: a stale socket
    r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=30)
    assert f"Control socket connect({sock}): Connection refused" in r.stderr
    assert "port 9: Connection refused" in r.stderr and sock.exists()
