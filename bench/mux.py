#!/usr/bin/env python3
"""Your own ssh through tunneld's control socket (issue 19) vs OpenSSH's own master vs a fresh
login, side by side in one run.

    python bench/mux.py            # 30 × `ssh HOST true`, 3 × 200 MB scp/rsync (a few minutes)
    python bench/mux.py --quick    # 10 × `ssh HOST true`, 1 × 20 MB (a smoke run, ~30 s)
    python bench/mux.py --rev HEAD # tunneld as committed (git archive), not the working tree
    python bench/mux.py --profile pyspy      # py-spy samples the daemon (PY_SPY=path/py-spy)
    python bench/mux.py --profile cprofile   # the daemon under cProfile
    (--profile: files in --profile-dir, default /tmp/tunneld-mux-profile)

One run starts a throw-away OpenSSH sshd on 127.0.0.1 (bench/servers.py's SSHD, plus an sftp
subsystem and a throw-away HOME for the commands it runs), a temp HOME whose ~/.ssh/config
names it as ``bench`` with ``Ciphers aes128-gcm@openssh.com`` (read by ssh and by tunneld
alike, so all three paths use the same cipher), and measures three paths to it:

  plain     ssh -c aes128-gcm@openssh.com -o ControlPath=none bench …   (a fresh login each time)
  master    OpenSSH's master, ``ssh -c … -M -S SOCK -fN bench`` started once, then
            ``ssh -S SOCK -o ControlMaster=no bench …``
  tunneld   python -m tunneld in the temp HOME, ``tunnelctl login bench``, then
            ``ssh -o ControlPath=<tunneld.paths.mux_socket('bench')> -o ControlMaster=no bench …``

Metrics: wall time of ``ssh bench true`` (N repetitions, the three paths interleaved, their
order rotated every round); scp upload and download and ``rsync -a`` upload of one file of
random bytes (made once), medians in MB/s (1 MB = 10⁶ bytes); CPU time (user + system, from
/proc/PID/stat) of the master process (tunneld or ``ssh -M``) per command and per transfer,
and of the client-side ssh/scp/rsync processes (getrusage of the reaped children).  Every
transferred file's size is checked, its sha256 once per path and operation; a mismatch
aborts the run.  A passenger that logged in itself (sshd's log grows: the socket refused it
and ssh fell back to a login of its own) aborts the run too.

Progress goes to stderr; the markdown section goes to stdout and to bench/results-mux.md
(bench/results-mux-quick.md with --quick; --out elsewhere).  The section in bench/results.md
("## Your own ssh through tunneld …", at its end, after the Chaos soak, which bench/run.py
keeps) is that file plus a few sentences of reading.  Every process started here is stopped
at the end (also on Ctrl-C); the real HOME is never touched.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import servers as S  # noqa: E402

T_START = time.monotonic()
HOST = "bench"
GCM = "aes128-gcm@openssh.com"
MB = 1_000_000
CLK_TCK = os.sysconf("SC_CLK_TCK")

# time and count bounds of every loop
CMD_TIMEOUT = 30.0            # one `ssh HOST true`
XFER_TIMEOUT = 300.0          # one scp / rsync
READY_TIMEOUT = 30.0          # a socket appearing, a host connecting, a daemon answering
TRUE_BUDGET = 300.0           # all `ssh HOST true` rounds (fewer rounds if hit)
XFER_BUDGET = 1800.0          # all transfers (fewer rounds if hit)


@dataclass
class Params:
    true_n: int
    mb: int
    xfer_reps: int
    idle_s: float


FULL = Params(true_n=30, mb=200, xfer_reps=3, idle_s=10)
QUICK = Params(true_n=10, mb=20, xfer_reps=1, idle_s=2)

PATHS = ("plain", "master", "tunneld")
LABEL = {"plain": "plain ssh (fresh login)", "master": "OpenSSH master (-M -S)",
         "tunneld": "tunneld socket"}
OPS = ("scp_up", "scp_down", "rsync_up")
OP_LABEL = {"scp_up": "scp upload", "scp_down": "scp download", "rsync_up": "rsync -a upload"}


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T_START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def pct(samples: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(samples)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def short(text: str | bytes, limit: int = 400) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def proc_cpu(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read().decode("ascii", "replace")
    rest = data[data.rfind(")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return False
    return data[data.rfind(")") + 2:].split()[0] not in ("Z", "X")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


class BenchFailure(RuntimeError):
    """A measurement that cannot be trusted (wrong bytes, a path that logged in itself)."""


# ------------------------------------------------------------------------------------------
# the processes


class Tunneld:
    """python -m tunneld in the temp HOME (optionally under cProfile), driven with tunnelctl."""

    def __init__(self, env: dict[str, str], base: Path, profile: str | None, tree: Path):
        self.tree = tree
        self.env = dict(env, TUNNELD_NO_AUTOSTART="1", PYTHONUNBUFFERED="1",
                        PYTHONPATH=str(tree))
        self.env.pop("TUNNELD_SOCKET", None)
        self.env.pop("TUNNELD_CONFIG", None)
        self.logfile = base / "tunneld.stderr"
        self.profile = profile
        self.prof_out = base / "tunneld.cprofile"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        cmd = [sys.executable, "-m", "tunneld"]
        if self.profile == "cprofile":
            cmd = [sys.executable, "-m", "cProfile", "-o", str(self.prof_out), "-m", "tunneld"]
        with self.logfile.open("ab") as err:
            self.proc = subprocess.Popen(cmd, cwd=self.tree, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tunneld exited with {self.proc.returncode}: "
                                   f"{short(self.logfile.read_text(errors='replace')[-800:])}")
            if self.ctl("status", check=False, timeout=5).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"tunneld did not answer within {READY_TIMEOUT:g}s")

    def ctl(self, *args: str, check: bool = True,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "tunnelctl", *args], cwd=self.tree,
                           env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"tunnelctl {' '.join(args)} exited {r.returncode}: "
                               f"{short(r.stderr or r.stdout)}")
        return r

    def host(self, name: str) -> dict[str, Any]:
        for h in json.loads(self.ctl("list", "--json").stdout)["hosts"]:
            if h["name"] == name:
                return h
        raise RuntimeError(f"{name} not in tunnelctl list")

    def mux_socket(self, host: str) -> Path:
        r = subprocess.run([sys.executable, "-c",
                            f"from tunneld import paths; print(paths.mux_socket({host!r}))"],
                           cwd=self.tree, env=self.env, capture_output=True, text=True,
                           check=True,
                           timeout=30)
        return Path(r.stdout.strip())

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.ctl("stop", check=False, timeout=30)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                S.stop_process(self.proc)
        self.proc = None


class Master:
    """OpenSSH's own master: ``ssh -M -S SOCK -fN HOST`` (it forks into the background; its
    pid comes from ``ssh -O check``; stopped with ``-O exit``, then by that pid)."""

    def __init__(self, ssh: str, config: Path, env: dict[str, str], sock: Path, log: Path):
        self.ssh, self.config, self.env, self.sock, self.logfile = ssh, config, env, sock, log
        self.pid: int | None = None

    def base(self) -> list[str]:
        return [self.ssh, "-F", str(self.config), "-S", str(self.sock)]

    def start(self) -> None:
        # -v -E: debug1 lines (the negotiated cipher; a few lines per session) to a file;
        # stdio to a file, not pipes: the backgrounded master keeps what it inherited
        with self.logfile.with_suffix(".stdio").open("ab") as out:
            r = subprocess.run([*self.base(), "-c", GCM, "-M", "-o", "ControlPersist=no",
                                "-fN", "-v", "-E", str(self.logfile), HOST], env=self.env,
                               stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                               timeout=READY_TIMEOUT)
        if r.returncode != 0:
            raise RuntimeError(f"ssh -M -fN exited {r.returncode}: "
                               f"{short(self.logfile.read_text(errors='replace')[-600:])}")
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            c = subprocess.run([*self.base(), "-O", "check", HOST], env=self.env,
                               capture_output=True, text=True, timeout=10)
            m = re.search(r"Master running \(pid=(\d+)\)", c.stderr)
            if c.returncode == 0 and m:
                self.pid = int(m.group(1))
                return
            time.sleep(0.05)
        raise RuntimeError(f"OpenSSH master did not answer on {self.sock}")

    def stop(self) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(Exception):
            subprocess.run([*self.base(), "-O", "exit", HOST], env=self.env,
                           capture_output=True, timeout=10)
        deadline = time.monotonic() + 5
        while alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.pid = None


class Spy:
    """py-spy sampling the daemon during one phase (``py-spy record``, raw
    collapsed stacks; SIGINT makes it write them)."""

    def __init__(self, exe: str, pid: int, out: Path, seconds: float):
        self.out = out
        self.proc = subprocess.Popen(
            [exe, "record", "-p", str(pid), "-o", str(out), "-f", "raw", "-r", "200",
             "-d", str(int(seconds) + 1)], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(0.5)   # attached before the phase begins

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                S.stop_process(self.proc)


# ------------------------------------------------------------------------------------------
# the bench


@dataclass
class Sample:
    wall: float
    master_cpu: float | None      # seconds of the master process (tunneld / ssh -M)
    client_cpu: float             # seconds of the reaped ssh/scp/rsync processes


@dataclass
class Results:
    true: dict[str, list[Sample]] = field(default_factory=lambda: {p: [] for p in PATHS})
    xfer: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)
    verified: dict[tuple[str, str], str] = field(default_factory=dict)
    ciphers: dict[str, str] = field(default_factory=dict)
    idle: dict[str, float] = field(default_factory=dict)   # CPU seconds per second
    notes: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, p: Params, keep: bool, profile: str | None, profile_dir: Path,
                 rev: str | None = None):
        self.p, self.keep, self.profile, self.profile_dir = p, keep, profile, profile_dir
        self.rev = rev
        self.tree = REPO
        if profile:
            profile_dir.mkdir(parents=True, exist_ok=True)
        self.base = Path(tempfile.mkdtemp(prefix="tunneld-mux-bench-"))
        self.stack = contextlib.ExitStack()
        self.res = Results()
        self.versions: dict[str, str] = {}
        self.load_start = os.getloadavg()
        self.load_end: tuple[float, float, float] | None = None
        self.wall_true = 0.0
        self.wall_xfer = 0.0

    # -- setup -------------------------------------------------------------------------------

    def export_rev(self) -> None:
        """``--rev``: tunneld and tunnelctl as committed at REV (``git archive``, into the
        temp dir), whatever the working tree holds meanwhile."""
        self.tree = self.base / "tree"
        self.tree.mkdir()
        arch = subprocess.run(["git", "archive", self.rev, "tunneld", "tunnelctl"], cwd=REPO,
                              capture_output=True, timeout=60)
        if arch.returncode != 0:
            raise RuntimeError(f"git archive {self.rev}: {short(arch.stderr)}")
        subprocess.run(["tar", "-x", "-C", str(self.tree)], input=arch.stdout, check=True,
                       timeout=60)
        log(f"tunneld from git archive {self.rev} in {self.tree}")

    def setup(self) -> None:
        if self.rev:
            self.export_rev()
        self.sshd = S.SSHD(self.base)
        self.stack.callback(self.sshd.close)
        self.server_home = self.base / "server-home"
        self.server_home.mkdir(mode=0o700)
        # scp speaks SFTP by default; the commands sshd runs get a throw-away HOME (the
        # server side is this machine: its real HOME must not see bench files or rc output)
        with (self.sshd.workdir / "sshd_config").open("a") as f:
            f.write(f"Subsystem sftp internal-sftp\nSetEnv HOME={self.server_home}\n")
        self.sshd.add_alias(HOST, Ciphers=GCM)
        self.sshd.start()
        log(f"sshd on 127.0.0.1:{self.sshd.port} (temp dir {self.base})")
        self.ssh = self.sshd.ssh_path
        self.env = self.sshd.env
        self.collect_versions()

        self.data = self.base / "data"
        self.remote = self.base / "remote"
        self.down = self.base / "down"
        for d in (self.data, self.remote, self.down):
            d.mkdir()
        self.blob = self.data / "blob"
        t = time.monotonic()
        h = hashlib.sha256()
        with self.blob.open("wb") as f:
            left = self.p.mb * MB
            while left:
                chunk = os.urandom(min(left, 4 * 1024 * 1024))
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        self.blob_sha = h.hexdigest()
        self.remote_src = self.remote / "src"
        shutil.copyfile(self.blob, self.remote_src)
        log(f"{self.p.mb} MB of random bytes in {self.blob} ({time.monotonic() - t:.1f}s), "
            f"sha256 {self.blob_sha[:16]}…")

        self.master = Master(self.ssh, self.sshd.config, self.env,
                             self.sshd.runtime / "m.sock", self.base / "master.log")
        self.stack.callback(self.master.stop)
        self.master.start()
        log(f"OpenSSH master: pid {self.master.pid}, socket {self.master.sock}")

        self.daemon = Tunneld(self.env, self.base, self.profile, self.tree)
        self.stack.callback(self.daemon.stop)
        self.daemon.start()
        self.daemon.ctl("login", HOST, timeout=READY_TIMEOUT * 2)
        self.tsock = self.daemon.mux_socket(HOST)
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.tsock.is_socket():
            if time.monotonic() > deadline:
                raise RuntimeError(f"tunneld's control socket {self.tsock} did not appear")
            time.sleep(0.05)
        # `tunnelctl login` of a host with no forwards checks the login and releases it; the
        # first passenger connects it again and it stays (mux_persist): one warm-up command
        # on each path, not measured
        for path in PATHS:
            r = subprocess.run([*self.opts(path), HOST, "true"], env=self.env,
                               stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=CMD_TIMEOUT)
            if r.returncode != 0:
                raise RuntimeError(f"{path}: warm-up ssh true exited {r.returncode}: "
                                   f"{short(r.stderr)}")
        h = self.daemon.host(HOST)
        if h.get("state") != "connected":
            raise RuntimeError(f"tunneld's {HOST} is {h.get('state')}: {h.get('last_error')}")
        self.res.ciphers["tunneld"] = h.get("cipher") or "?"
        log(f"tunneld: pid {self.daemon.pid}, socket {self.tsock}, "
            f"cipher {self.res.ciphers['tunneld']}")
        self.res.ciphers["plain"] = self.negotiated_cipher()
        self.res.ciphers["master"] = self.master_cipher()
        log(f"ciphers: {self.res.ciphers}")
        if len(set(self.res.ciphers.values())) != 1:
            self.res.notes.append("**The three paths did not negotiate the same cipher** "
                                  f"({self.res.ciphers}).")

    def collect_versions(self) -> None:
        v = self.versions
        v["python"] = platform.python_version()
        with contextlib.suppress(ImportError):
            import asyncssh
            v["asyncssh"] = asyncssh.__version__
        r = subprocess.run([self.ssh, "-V"], capture_output=True, text=True)
        v["openssh"] = (r.stderr or r.stdout).strip()
        r = subprocess.run(["rsync", "--version"], capture_output=True, text=True)
        v["rsync"] = (r.stdout.splitlines() or ["?"])[0].replace("  ", " ")
        try:
            rev = subprocess.run(["git", "rev-parse", "--short", self.rev or "HEAD"], cwd=REPO,
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "tunneld",
                                    "tunnelctl"], cwd=REPO, capture_output=True, text=True,
                                   timeout=10).stdout.strip()
            v["tunneld"] = (f"{rev} (git archive; the working tree not used)" if self.rev
                            else rev + (" + uncommitted changes" if dirty else ""))
        except (OSError, subprocess.SubprocessError):
            v["tunneld"] = "?"

    def negotiated_cipher(self) -> str:
        """The cipher of a plain login with the plain path's options (one ``ssh -v true``)."""
        r = subprocess.run([*self.opts("plain"), "-v", HOST, "true"], env=self.env,
                           capture_output=True, text=True, timeout=CMD_TIMEOUT)
        for ln in r.stderr.splitlines():
            if "kex: client->server cipher:" in ln:
                return ln.split("cipher:")[1].split()[0]
        return "?"

    def master_cipher(self) -> str:
        """The cipher the master negotiated (its -v log)."""
        for ln in self.master.logfile.read_text(errors="replace").splitlines():
            if "kex: client->server cipher:" in ln:
                return ln.split("cipher:")[1].split()[0]
        return "?"

    # -- the three paths ---------------------------------------------------------------------

    def opts(self, path: str) -> list[str]:
        """ssh's argv up to the host for ``path`` (scp and rsync -e take the same options)."""
        base = [self.ssh, "-F", str(self.sshd.config)]
        if path == "plain":
            return base + ["-c", GCM, "-o", "ControlPath=none", "-o", "ControlMaster=no"]
        if path == "master":
            return base + ["-o", f"ControlPath={self.master.sock}", "-o", "ControlMaster=no"]
        return base + ["-o", f"ControlPath={self.tsock}", "-o", "ControlMaster=no"]

    def master_pid(self, path: str) -> int | None:
        return {"plain": None, "master": self.master.pid, "tunneld": self.daemon.pid}[path]

    def logins(self) -> int:
        try:
            return self.sshd.log.read_text(errors="replace").count("Accepted publickey")
        except OSError:
            return 0

    def measure(self, path: str, argv: list[str], timeout: float, what: str) -> Sample:
        pid = self.master_pid(path)
        if pid is not None and not alive(pid):
            raise BenchFailure(f"{path}: the master process {pid} is gone")
        logins = self.logins()
        m0 = proc_cpu(pid) if pid else None
        c0 = children_cpu()
        t0 = time.perf_counter()
        r = subprocess.run(argv, env=self.env, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=timeout)
        wall = time.perf_counter() - t0
        c1 = children_cpu()
        m1 = proc_cpu(pid) if pid else None
        if r.returncode != 0:
            raise BenchFailure(f"{path}: {what} exited {r.returncode}: "
                               f"{short(r.stderr or r.stdout)}")
        if path != "plain":
            if self.logins() != logins:
                raise BenchFailure(f"{path}: {what} logged in itself (sshd saw a new login): the "
                                   f"control socket did not carry it. stderr: "
                                   f"{short(r.stderr)}")
        return Sample(wall, None if m0 is None else m1 - m0, c1 - c0)

    # -- 1. ssh HOST true ----------------------------------------------------------------------

    def run_true(self) -> None:
        log(f"== ssh {HOST} true: {self.p.true_n} rounds, paths interleaved")
        t0 = time.monotonic()
        for i in range(self.p.true_n):
            if time.monotonic() - t0 > TRUE_BUDGET:
                self.res.notes.append(f"`ssh true`: stopped after {i} rounds "
                                      f"({TRUE_BUDGET:g} s budget)")
                break
            order = PATHS[i % 3:] + PATHS[:i % 3]
            for path in order:
                s = self.measure(path, [*self.opts(path), HOST, "true"], CMD_TIMEOUT,
                                 "ssh true")
                self.res.true[path].append(s)
            if (i + 1) % 10 == 0 or i == self.p.true_n - 1:
                log(f"  round {i + 1}: " + ", ".join(
                    f"{p} {statistics.median(x.wall for x in self.res.true[p]) * 1000:.1f} ms"
                    for p in PATHS))
        self.wall_true = time.monotonic() - t0

    # -- 2. scp / rsync ------------------------------------------------------------------------

    def xfer_argv(self, op: str, path: str) -> tuple[list[str], Path]:
        """The command and the file it writes."""
        o = self.opts(path)
        if op == "scp_up":
            dst = self.remote / f"up-{path}"
            return [shutil.which("scp") or "/usr/bin/scp", "-q", "-S", o[0], *o[1:],
                    str(self.blob), f"{HOST}:{dst}"], dst
        if op == "scp_down":
            dst = self.down / f"down-{path}"
            return [shutil.which("scp") or "/usr/bin/scp", "-q", "-S", o[0], *o[1:],
                    f"{HOST}:{self.remote_src}", str(dst)], dst
        dst = self.remote / f"rsync-{path}"
        return ["/usr/bin/rsync", "-a", "-e", " ".join(o), str(self.blob), f"{HOST}:{dst}"], dst

    def run_xfer(self) -> None:
        log(f"== scp up/down and rsync -a up of {self.p.mb} MB: {self.p.xfer_reps} rounds")
        t0 = time.monotonic()
        size = self.p.mb * MB
        k = 0
        for rep in range(self.p.xfer_reps):
            if time.monotonic() - t0 > XFER_BUDGET:
                self.res.notes.append(f"transfers: stopped after {rep} rounds "
                                      f"({XFER_BUDGET:g} s budget)")
                break
            for op in OPS:
                order = PATHS[k % 3:] + PATHS[:k % 3]
                k += 1
                for path in order:
                    argv, dst = self.xfer_argv(op, path)
                    dst.unlink(missing_ok=True)  # rsync must send it all; scp writes anew
                    s = self.measure(path, argv, XFER_TIMEOUT, OP_LABEL[op])
                    got = dst.stat().st_size if dst.exists() else -1
                    if got != size:
                        raise BenchFailure(f"{path}: {OP_LABEL[op]} wrote {got} bytes, "
                                           f"not {size}")
                    if (op, path) not in self.res.verified:
                        digest = sha256_file(dst)
                        if digest != self.blob_sha:
                            raise BenchFailure(f"{path}: {OP_LABEL[op]} moved WRONG BYTES: "
                                               f"sha256 {digest} != {self.blob_sha}")
                        self.res.verified[(op, path)] = digest
                    dst.unlink(missing_ok=True)
                    self.res.xfer.setdefault((op, path), []).append(s)
                    mc = "" if s.master_cpu is None else f", master CPU {s.master_cpu:.2f}s"
                    log(f"  {op} {path}: {size / s.wall / MB:.0f} MB/s ({s.wall:.2f}s{mc}, "
                        f"client CPU {s.client_cpu:.2f}s)")
        self.wall_xfer = time.monotonic() - t0

    def spy(self, phase: str, seconds: float) -> Spy | None:
        if self.profile != "pyspy":
            return None
        exe = shutil.which("py-spy") or os.environ.get("PY_SPY")
        if not exe:
            raise RuntimeError("--profile pyspy: no py-spy on PATH (or in $PY_SPY)")
        out = self.profile_dir / f"pyspy-{phase}.txt"
        spy = Spy(exe, self.daemon.pid, out, seconds)
        self.stack.callback(spy.stop)
        self.res.notes.append(f"py-spy sampled the daemon during {phase} (`{out.name}`, "
                              "collapsed stacks, 200 Hz).")
        return spy

    def run_idle(self) -> None:
        """CPU of each master process while nothing uses it (keepalives, tunneld's own
        background work): the floor under the per-command figures below."""
        secs = self.p.idle_s
        log(f"== idle CPU of the masters over {secs:g} s")
        pids = {"master": self.master.pid, "tunneld": self.daemon.pid}
        c0 = {k: proc_cpu(v) for k, v in pids.items()}
        time.sleep(secs)
        for k, v in pids.items():
            self.res.idle[k] = (proc_cpu(v) - c0[k]) / secs
        log("  " + ", ".join(f"{k} {v * 1000:.1f} ms/s" for k, v in self.res.idle.items()))

    def run(self) -> None:
        self.setup()
        self.run_idle()
        spy = self.spy("ssh-true", TRUE_BUDGET)
        self.run_true()
        if spy:
            spy.stop()
        spy = self.spy("transfers", XFER_BUDGET)
        self.run_xfer()
        if spy:
            spy.stop()
        self.load_end = os.getloadavg()

    def close(self) -> None:
        self.stack.close()
        if self.profile == "cprofile" and self.daemon_prof_ok():
            kept = self.profile_dir / "tunneld.cprofile"
            shutil.copyfile(self.daemon.prof_out, kept)
            log(f"daemon profile: {kept} (python -m pstats {kept})")
            self.res.notes.append(f"The daemon ran under cProfile (`{kept.name}`): its "
                                  "figures are slower than without.")
        if self.keep:
            log(f"kept {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)

    def daemon_prof_ok(self) -> bool:
        return hasattr(self, "daemon") and self.daemon.prof_out.exists()


# ------------------------------------------------------------------------------------------
# report


def fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}g}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def report(b: Bench, argv: list[str], status: str) -> str:
    res, p = b.res, b.p
    lines: list[str] = []
    out = lines.append
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu = "?"
    with contextlib.suppress(OSError):
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    v = b.versions
    out("## Your own ssh through tunneld (control socket, issue 19)")
    out("")
    wall = time.monotonic() - T_START
    out(f"`python bench/mux.py{' ' + ' '.join(argv) if argv else ''}` — {now}, wall time "
        f"{wall:.0f} s. {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}. "
        f"tunneld {v.get('tunneld')}, Python {v.get('python')}, asyncssh "
        f"{v.get('asyncssh')}, {v.get('openssh')}, {v.get('rsync')}.")
    out("")
    le = b.load_end or os.getloadavg()
    busy = b.load_start[0] > 0.5
    out(f"Load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in b.load_start)}, "
        f"at end {'/'.join(f'{x:.2f}' for x in le)}"
        + (" — the machine was not idle (other processes share these CPUs)." if busy
           else "."))
    out("")
    ntrue = min((len(x) for x in res.true.values()), default=0)
    nx = min((len(x) for x in res.xfer.values()), default=0)
    ciphers = res.ciphers
    same = len(set(ciphers.values())) == 1 and ciphers
    out(f"One sshd on 127.0.0.1, everything on loopback. Three paths to it: a fresh login "
        f"(`ssh -c {GCM} -o ControlPath=none`), OpenSSH's own master (`ssh -c {GCM} -M -S SOCK "
        f"-fN` once, then `ssh -S SOCK -o ControlMaster=no`), and tunneld's control socket "
        f"(`tunnelctl login`, then `ssh -o ControlPath=<tunneld's socket> -o "
        f"ControlMaster=no`). Cipher: "
        + (f"{next(iter(ciphers.values()))} on all three (the temp HOME's ~/.ssh/config names "
           f"it for the host; tunneld reads it there; `tunnelctl list --json` shows it)."
           if same else f"**not the same**: {', '.join(f'{k} {c}' for k, c in ciphers.items())}.")
        + f" `ssh HOST true`: {ntrue} rounds; transfers: one {p.mb} MB file of random bytes, "
        f"{nx} round(s), medians (1 MB = 10⁶ bytes); in every round the three paths run one "
        f"after the other, their order rotated. Each path's uploaded and downloaded file was "
        f"checked by sha256 ({len(res.verified)} of {len(OPS) * len(PATHS)} checked, all "
        f"equal), every transfer by size; no passenger of a socket logged in itself (sshd's "
        f"log).")
    out("")
    out("| metric | plain ssh (fresh login) | OpenSSH master | tunneld | tunneld ÷ master | "
        "plain ÷ tunneld |")
    out("|---|---:|---:|---:|---:|---:|")

    def true_row(name: str, fn) -> None:
        vals = {k: (fn([s.wall for s in res.true[k]]) * 1000 if res.true[k] else None)
                for k in PATHS}
        out(f"| {name} | " + " | ".join(fmt(vals[k]) for k in PATHS)
            + f" | {ratio(vals['tunneld'], vals['master'])} | "
              f"{ratio(vals['plain'], vals['tunneld'])} |")

    true_row("`ssh HOST true`, median (ms)", statistics.median)
    true_row("`ssh HOST true`, p90 (ms)", lambda x: pct(x, 90))
    for op in OPS:
        vals = {k: (p.mb * MB / statistics.median(s.wall for s in res.xfer[(op, k)]) / MB
                    if res.xfer.get((op, k)) else None) for k in PATHS}
        out(f"| {OP_LABEL[op]}, {p.mb} MB (MB/s) | " + " | ".join(fmt(vals[k]) for k in PATHS)
            + f" | {ratio(vals['tunneld'], vals['master'])} | "
              f"{ratio(vals['plain'], vals['tunneld'])} |")

    def cpu_row(name: str, samples: dict[str, list[Sample]], which: str, scale: float) -> None:
        vals: dict[str, float | None] = {}
        for k in PATHS:
            xs = [getattr(s, which) for s in samples.get(k, [])]
            vals[k] = (statistics.mean(xs) * scale) if xs and None not in xs else None
        out(f"| {name} | " + " | ".join(fmt(vals[k]) for k in PATHS)
            + f" | {ratio(vals['tunneld'], vals['master'])} | "
              f"{ratio(vals['plain'], vals['tunneld'])} |")

    idle = {k: res.idle.get(k) for k in PATHS}
    out(f"| CPU of the master process when idle (ms per s, over {p.idle_s:g} s) | — | "
        f"{fmt(None if idle['master'] is None else idle['master'] * 1000)} | "
        f"{fmt(None if idle['tunneld'] is None else idle['tunneld'] * 1000)} | "
        f"{ratio(idle['tunneld'], idle['master'])} | — |")
    cpu_row("CPU of the master process per `ssh HOST true` (ms, mean)", res.true,
            "master_cpu", 1000)
    cpu_row("CPU of the ssh client per `ssh HOST true` (ms, mean)", res.true,
            "client_cpu", 1000)
    for op in OPS:
        per = {k: res.xfer.get((op, k), []) for k in PATHS}
        cpu_row(f"CPU of the master process per {OP_LABEL[op]} (ms, mean)", per,
                "master_cpu", 1000)
    for op in OPS:
        per = {k: res.xfer.get((op, k), []) for k in PATHS}
        cpu_row(f"CPU of the client processes per {OP_LABEL[op]} (ms, mean)", per,
                "client_cpu", 1000)
    out(f"| cipher | {ciphers.get('plain', '?')} | {ciphers.get('master', '?')} | "
        f"{ciphers.get('tunneld', '?')} | | |")
    out("")
    out("Master process: tunneld (the whole daemon) or the backgrounded `ssh -M`; none for a "
        "fresh login, whose crypto runs in the client. Client processes: the ssh, scp, rsync "
        "processes this bench started and reaped (getrusage), i.e. the mux client for the "
        "socket paths, the whole client for a fresh login. sshd's side is the same program "
        "on all three paths and is not counted. CPU from /proc/PID/stat and getrusage, 10 ms "
        "ticks: the `ssh true` rows are means over all rounds. Ratios: times, lower is "
        "better for tunneld ÷ master; MB/s, higher is better.")
    for n in res.notes:
        out("")
        out(f"- {n}")
    if status:
        out("")
        out(f"**The run did not finish: {status}**")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK.true_n} × ssh true, {QUICK.mb} MB, {QUICK.xfer_reps} round")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temp dir (sshd, tunneld, master logs) and print its path")
    ap.add_argument("--profile", choices=["cprofile", "pyspy"],
                    help="cprofile: run the daemon under cProfile; pyspy: sample it with "
                    "py-spy (on PATH or $PY_SPY) during each phase")
    ap.add_argument("--profile-dir", type=Path, default=Path("/tmp/tunneld-mux-profile"),
                    help="where --profile writes (and the section, unless --out)")
    ap.add_argument("--rev", help="run tunneld as committed at REV (git archive into the temp "
                    "dir) instead of the working tree, e.g. HEAD")
    ap.add_argument("--out", type=Path, help="where the markdown section goes "
                    "(default bench/results-mux.md, or results-mux-quick.md with --quick)")
    args = ap.parse_args()
    argv = (["--quick"] if args.quick else []) + \
        (["--profile", args.profile] if args.profile else []) + \
        (["--rev", args.rev] if args.rev else [])
    out_file = args.out or (args.profile_dir / "results-mux-profile.md" if args.profile else
                            BENCH / ("results-mux-quick.md" if args.quick else "results-mux.md"))

    def on_term(signum, frame):  # SIGTERM: clean up as for Ctrl-C
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    bench = Bench(QUICK if args.quick else FULL, args.keep, args.profile, args.profile_dir,
                  args.rev)
    status, rc = "", 0
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        status, rc = "interrupted", 130
    except BenchFailure as e:
        log(f"FAILED: {e}")
        status, rc = f"FAILED: {e}", 1
    except Exception as e:
        import traceback
        traceback.print_exc()
        status, rc = f"aborted: {short(str(e))}", 1
    finally:
        try:
            bench.close()
        finally:
            text = report(bench, argv, status)
            out_file.write_text(text)
            sys.stdout.write(text)
            log(f"wrote {out_file} ({time.monotonic() - T_START:.0f} s)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
