"""tunneld as the ControlMaster of the real OpenSSH client (``ssh -o ControlPath=… -o
ControlMaster=no``, BatchMode: a refused session would make ssh fail instead of logging in
itself): commands and exit codes, byte-exact stdio both ways, environment, scp, sftp, rsync,
git, ``-W`` as a ProxyJump, ``-O check/forward/cancel/exit/stop`` and ``list``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest
from _mux_tools import (
    CMD_TIMEOUT,
    mux_path,
    mux_ssh,
    passengers,
    sessions_logged,
    ssh_opts,
    start_socket,
    wait_passengers,
)
from conftest import SSHServer
from netutil import roundtrip

pytestmark = pytest.mark.timeout(180)


def _logins(sshd) -> int:
    return sshd.sshd_log.read_text().count("Accepted publickey")


def test_a_command_rides_tunnelds_connection_with_its_exit_status(daemon, sshd):
    sock = start_socket(daemon)
    assert sock.stat().st_mode & 0o777 == 0o600
    assert sock.parent.stat().st_mode & 0o777 == 0o700
    r = mux_ssh(daemon, sshd.host, "echo hi; echo err >&2")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"hi\n", b"err\n"), r
    logins = _logins(sshd)
    assert mux_ssh(daemon, sshd.host, "exit 3").returncode == 3
    assert mux_ssh(daemon, sshd.host, "exit 255").returncode == 255
    # killed by a signal: no exit status, 255, as OpenSSH's own ssh exits then
    assert mux_ssh(daemon, sshd.host, "kill -9 $$").returncode == 255
    assert sessions_logged(daemon) == 4, daemon.log()
    # no login of their own: the host stays connected after its passengers (mux_persist)
    # and sshd saw no new connection
    assert _logins(sshd) == logins
    assert daemon.host()["state"] == "connected"


def test_twenty_megabytes_each_way_byte_exact(daemon, sshd, tmp_path):
    start_socket(daemon)
    data = os.urandom(20 * 1024 * 1024)
    r = mux_ssh(daemon, sshd.host, "sha256sum", input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    # stdout and stderr kept apart, every byte, from a regular file on the server
    (sshd.server_home / "big").write_bytes(data)
    r = mux_ssh(daemon, sshd.host, "cat $HOME/big; head -c 100000 $HOME/big >&2")
    assert r.returncode == 0 and r.stdout == data and r.stderr == data[:100000]
    # stdin from a regular file and stdout to one (descriptors epoll cannot wait on)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(data[:3_000_000])
    with src.open("rb") as fin, dst.open("wb") as fout:
        p = subprocess.run(["ssh", *ssh_opts(daemon), sshd.host, "cat"], stdin=fin,
                           stdout=fout, stderr=subprocess.PIPE, env=daemon.env,
                           timeout=CMD_TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert dst.read_bytes() == data[:3_000_000]
    # ssh -n: stdin is /dev/null
    r = mux_ssh(daemon, "-n", sshd.host, "wc -c")
    assert r.returncode == 0 and r.stdout.strip() == b"0"


def test_environment_and_the_terminal_type(daemon, sshd):
    sshd.add_sshd_options(AcceptEnv="TD_*")
    sshd.start()
    start_socket(daemon)
    env = dict(daemon.env, TD_SENT="from-sendenv", TERM="vt220")
    r = mux_ssh(daemon, "-o", "SendEnv=TD_SENT", "-o", "SetEnv=TD_SET=from-setenv",
                sshd.host, 'echo "$TD_SENT|$TD_SET"', env=env)
    assert r.returncode == 0 and r.stdout == b"from-sendenv|from-setenv\n", r
    r = mux_ssh(daemon, "-tt", sshd.host, 'echo "$TERM"; tty', env=env)
    assert r.returncode == 0, r
    lines = r.stdout.decode().split("\r\n")
    assert lines[0] == "vt220" and lines[1].startswith("/dev/pts/"), r.stdout
    # no pty unless asked (-T, or no -t with a command)
    r = mux_ssh(daemon, sshd.host, "tty")
    assert r.stdout == b"not a tty\n"


def test_scp_and_sftp_both_ways(daemon, sshd, tmp_path):
    start_socket(daemon)
    blob = os.urandom(5 * 1024 * 1024 + 17)
    local = tmp_path / "results.tar"
    local.write_bytes(blob)
    opts = ssh_opts(daemon)
    for legacy in ([], ["-O"]):    # the SFTP protocol (the default) and scp's own
        r = subprocess.run(["scp", "-q", *legacy, *opts, str(local),
                            f"{sshd.host}:{sshd.server_home}/up{len(legacy)}.tar"],
                           capture_output=True, env=daemon.env, timeout=CMD_TIMEOUT)
        assert r.returncode == 0, r.stderr
        assert (sshd.server_home / f"up{len(legacy)}.tar").read_bytes() == blob
        back = tmp_path / f"back{len(legacy)}"
        r = subprocess.run(["scp", "-q", *legacy, *opts,
                            f"{sshd.host}:{sshd.server_home}/up{len(legacy)}.tar", str(back)],
                           capture_output=True, env=daemon.env, timeout=CMD_TIMEOUT)
        assert r.returncode == 0, r.stderr
        assert back.read_bytes() == blob
    batch = tmp_path / "batch"
    home = sshd.server_home
    batch.write_text(f"put {local} {home}/viasftp\nget {home}/viasftp {tmp_path / 'viasftp'}\n"
                     f"ls -1 {home}\n")
    r = subprocess.run(["sftp", "-q", "-b", str(batch), *opts, sshd.host],
                       capture_output=True, env=daemon.env, timeout=CMD_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "viasftp").read_bytes() == blob and b"viasftp" in r.stdout
    assert _logins(sshd) == 2    # tunnelctl login's, then the first passenger's


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
def test_rsync_both_ways(daemon, sshd, tmp_path):
    start_socket(daemon)
    src = tmp_path / "data"
    (src / "sub").mkdir(parents=True)
    for i in range(20):
        (src / "sub" / f"f{i}").write_bytes(os.urandom(50_000 + i))
    e = "ssh " + " ".join(ssh_opts(daemon))
    r = subprocess.run(["rsync", "-a", "-e", e, f"{src}/", f"{sshd.host}:{sshd.server_home}/data/"],
                       capture_output=True, env=daemon.env, timeout=CMD_TIMEOUT)
    assert r.returncode == 0, r.stderr
    back = tmp_path / "back"
    r = subprocess.run(["rsync", "-a", "-e", e, f"{sshd.host}:{sshd.server_home}/data/",
                        f"{back}/"],
                       capture_output=True, env=daemon.env, timeout=CMD_TIMEOUT)
    assert r.returncode == 0, r.stderr
    for i in range(20):
        assert (back / "sub" / f"f{i}").read_bytes() == (src / "sub" / f"f{i}").read_bytes()


def test_git_clone_and_push(daemon, sshd, tmp_path):
    start_socket(daemon)
    bare = sshd.server_home / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    env = dict(daemon.env, GIT_SSH_COMMAND="ssh " + " ".join(ssh_opts(daemon)),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@x", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@x")
    work = tmp_path / "work"
    git = ["git", "-C", str(work)]
    r = subprocess.run(["git", "clone", "-q", f"{sshd.host}:{bare}", str(work)],
                       capture_output=True, env=env, timeout=CMD_TIMEOUT)
    assert r.returncode == 0, r.stderr
    (work / "notes.txt").write_text("pushed through tunneld\n")
    subprocess.run([*git, "add", "notes.txt"], check=True, env=env)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True, env=env)
    r = subprocess.run([*git, "push", "-q", "origin", "HEAD"], capture_output=True, env=env,
                       timeout=CMD_TIMEOUT)
    assert r.returncode == 0, r.stderr
    shown = subprocess.run(["git", "--git-dir", str(bare), "log", "--format=%s", "-1"],
                           capture_output=True, text=True, check=True).stdout
    assert shown == "first\n"


def test_proxyjump_through_the_host_to_a_second_sshd(daemon, sshd, tmp_path):
    """``ssh -J testhost node``: the jump is ``ssh -W`` through tunneld's connection; the
    second sshd (a compute node) is reached from the first one."""
    start_socket(daemon)
    node = SSHServer.create(tmp_path / "node", host="node")
    node.authorized_keys.write_text(sshd.identity.with_suffix(".pub").read_text())
    node.start()
    try:
        pub = node.host_key.with_suffix(".pub").read_text().split()
        with sshd.known_hosts.open("a") as f:
            f.write(f"[127.0.0.1]:{node.port} {pub[0]} {pub[1]}\n")
        # the jump ssh that ProxyJump starts reads the same -F file, not our -o options
        with sshd.ssh_config.open("a") as f:
            f.write(f"Host {sshd.host}\n    ControlPath {mux_path(daemon)}\n"
                    "    ControlMaster no\n\n")
        sshd.add_host_alias("node", HostName="127.0.0.1", Port=str(node.port),
                            ProxyJump=sshd.host)
        r = subprocess.run(["ssh", "-F", str(sshd.ssh_config), "node", "echo on the node"],
                           capture_output=True, env=daemon.env, timeout=CMD_TIMEOUT)
        assert r.returncode == 0 and r.stdout == b"on the node\n", r
        # the jump's passenger ends (and is logged) once tunneld sees its channel close,
        # which may come after the outer ssh exited
        daemon.wait_for(lambda: f"-W 127.0.0.1:{node.port}" in daemon.log(None), 10,
                        "the -W passenger's end in the log")
        assert _logins(sshd) == 2 and "Accepted publickey" in node.sshd_log.read_text()
    finally:
        node.close()


def test_control_commands_check_forward_cancel_exit_stop(daemon, sshd, echo_server,
                                                        free_port):
    start_socket(daemon)
    r = mux_ssh(daemon, "-O", "check", sshd.host)
    assert r.returncode == 0 and f"Master running (pid={daemon.pid})".encode() in r.stderr
    _, eport = echo_server()
    lport = free_port()
    r = mux_ssh(daemon, "-O", "forward", "-L", f"{lport}:127.0.0.2:{eport}", sshd.host)
    assert r.returncode == 0, r.stderr
    fwd = daemon.forward(lport)
    assert fwd["origin"] == "mux", fwd
    assert roundtrip(lport, b"via ssh -O forward\n") == b"via ssh -O forward\n"
    assert not daemon.state_file.exists() or str(lport) not in daemon.state_file.read_text()
    # the same again: nothing new, no error (as OpenSSH's master)
    assert mux_ssh(daemon, "-O", "forward", "-L", f"{lport}:127.0.0.2:{eport}",
                   sshd.host).returncode == 0
    r = mux_ssh(daemon, "-O", "cancel", "-L", f"{lport}:127.0.0.2:{eport}", sshd.host)
    assert r.returncode == 0, r.stderr
    # gone (and the host with it: nothing else used it)
    assert all(not f["listen"].endswith(f":{lport}") for h in daemon.list()["hosts"]
               for f in h["forwards"])
    r = mux_ssh(daemon, "-O", "cancel", "-L", f"{lport}:127.0.0.2:{eport}", sshd.host)
    assert b"port not forwarded" in r.stderr
    # -D and -R become tunneld forwards too
    dport, rport = free_port(), free_port()
    assert mux_ssh(daemon, "-O", "forward", "-D", str(dport), sshd.host).returncode == 0
    assert mux_ssh(daemon, "-O", "forward", "-R", f"{rport}:127.0.0.2:{eport}",
                   sshd.host).returncode == 0
    kinds = {f["kind"]: f["origin"] for f in daemon.host()["forwards"]}
    assert kinds == {"socks": "mux", "remote": "mux"}, daemon.host()["forwards"]
    # a public address is refused, as `add` refuses one without --public
    r = mux_ssh(daemon, "-O", "forward", "-L", f"*:{free_port()}:127.0.0.2:{eport}",
                sshd.host)
    assert r.returncode != 0 and b"public" in r.stderr, r.stderr
    for cmd in ("exit", "stop"):
        r = mux_ssh(daemon, "-O", cmd, sshd.host)
        assert r.returncode != 0 and b"tunnelctl stop" in r.stderr, r.stderr
    assert daemon.proc.poll() is None
    assert mux_ssh(daemon, sshd.host, "echo still here").stdout == b"still here\n"


def test_list_shows_the_passengers(daemon, sshd):
    start_socket(daemon)
    p = subprocess.Popen(["ssh", *ssh_opts(daemon), sshd.host, "sleep 30"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=daemon.env)
    try:
        wait_passengers(daemon, 1)
        (one,) = passengers(daemon)
        assert one["command"] == "sleep 30" and one["pid"] == p.pid and one["started"]
        text = daemon.ctl("list").stdout
        assert "1 ssh passenger" in text, text
    finally:
        p.kill()
        p.wait(10)
    wait_passengers(daemon, 0)
    assert json.loads(daemon.ctl("list", "--json").stdout)["hosts"][0]["mux"] == []


def test_ssh_config_install_then_plain_ssh_rides_even_after_a_restart(daemon, sshd,
                                                                     free_port):
    """The whole setup as a user does it: `tunnelctl ssh-config --install`, then a plain
    `ssh HOST` (no -o option) uses tunneld's socket; after a daemon restart the socket of a
    host named in ~/.ssh/tunneld.conf is there before any use."""
    port = free_port()
    daemon.ctl("add", sshd.host, str(port))
    r = daemon.ctl("ssh-config", "--install")
    assert "Include" in r.stdout, r.stdout
    r = subprocess.run(["ssh", "-F", str(sshd.ssh_config), sshd.host, "echo via config"],
                       capture_output=True, env=daemon.env, timeout=CMD_TIMEOUT)
    assert (r.returncode, r.stdout) == (0, b"via config\n"), r
    assert sessions_logged(daemon) == 1
    daemon.ctl("remove", sshd.host, str(port))
    assert daemon.stop() == 0
    daemon.start()
    assert mux_path(daemon).is_socket()       # before the host was used
    logins = _logins(sshd)
    r = subprocess.run(["ssh", "-F", str(sshd.ssh_config), sshd.host, "echo again"],
                       capture_output=True, env=daemon.env, timeout=CMD_TIMEOUT)
    assert (r.returncode, r.stdout) == (0, b"again\n"), r
    assert sessions_logged(daemon) == 2 and _logins(sshd) == logins + 1   # tunneld's login
