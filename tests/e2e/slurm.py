"""A real, tiny Slurm cluster in network namespaces, for end-to-end tests of batch jobs.

Fixtures (imported into ``conftest.py``, so every e2e test can ask for them):

``slurm_cluster``
    A started :class:`SlurmCluster` (function scope).  ``@pytest.mark.parametrize(
    "slurm_cluster", [2], indirect=True)`` asks for two compute nodes instead of one.

The layout (see :class:`SlurmCluster` for the API)::

    root netns --veth 10.251.x.y/30-- login netns "td-<pid>-<n>"  (sshd :22, slurmctld, munged)
                                        |-- veth 10.252.1.0/30 -- node netns: slurmd "tdnode1"
                                        `-- veth 10.252.2.0/30 -- node netns: slurmd "tdnode2"

* The login node is an :class:`SSHServer` (alias ``cluster`` in ``login.home``'s
  ``.ssh/config``); its remote commands get ``HOME=login.server_home`` and
  ``SLURM_CONF=<this cluster's slurm.conf>`` (sshd_config ``SetEnv``), and start in
  ``server_home`` (its ``.bashrc`` does ``cd "$HOME"``: sshd itself starts them in the
  passwd home, ``/root``, where sbatch would drop ``slurm-ID.out`` otherwise).
* slurmctld runs in the login namespace under ``unshare --uts`` as host ``tdlogin``;
  each slurmd in its node's namespace under ``unshare --uts`` as host ``tdnodeN``
  (``slurmd -D -N tdnodeN -f slurm.conf``).  Node names resolve in the login namespace
  and on the nodes (``/etc/netns/<ns>/hosts``, which ``ip netns exec`` mounts over
  ``/etc/hosts``), so a job's program listening on ``0.0.0.0:PORT`` is reachable from the
  login node (its sshd: ``direct-tcpip`` to ``tdnode1:PORT``) as ``tdnode1:PORT``.  The
  nodes reach each other through the login namespace (it forwards).
* One munged (root, ``--force``, a fresh 1024-byte key) in the login namespace; everyone
  finds it through its socket in the fixture's temp dir (``AuthInfo=socket=...``).
* Jobs run as root.  ``--export=ALL`` (the default) hands the submitting environment to the
  job (``HOME``, ``SLURM_CONF``, anything exported); ``PATH`` is the submitter's.
* Partitions: ``debug`` (default, all nodes, no time limit) and ``gpu`` (the last node,
  ``MaxTime=5``; ``EnforcePartLimits=ALL``: ``-p gpu --time=6`` is refused by sbatch).
  Each node has 2 CPUs whatever the machine has (``SlurmdParameters=config_overrides``),
  ``select/cons_tres`` with ``CR_Core``: an ``--exclusive`` job keeps every other job of its
  node pending (reason ``Resources``).  No accounting: ``sacct`` fails ("Slurm accounting
  storage is disabled", exit 1).  Ended jobs stay visible to ``squeue -t all`` and
  ``scontrol show job`` for ``MinJobAge`` (600 s).  ``extra_conf`` changes global keywords.
* The fixture yields once slurmctld's scheduler has run its first cycle (it does ~3 s after
  slurmctld starts, whatever is queued); from then on a submitted job starts within ~1 s
  (``batch_sched_delay=0``; slurmctld's loop ticks once a second).

Start-up, measured on the development VM (2 CPUs): ~3.4 s, of which ~0.5 s until the node
is IDLE and ~3 s waiting for that first scheduling cycle; teardown ~0.1 s.  A module-scoped
variant is not offered: at this cost every test gets a cluster with no jobs in it.

Time limits: slurmctld looks for jobs over their limit only every 30 s (``PERIODIC_TIMEOUT``,
a compile-time constant of slurmctld's background loop, counted from slurmctld's start; no
slurm.conf setting shortens it, ``OverTimeLimit=0`` adds nothing): a job is ended at the
first check after its limit, i.e. a job with ``--time=1`` ends as TIMEOUT 60-90 s after it
started.  A job submitted as soon as the fixture yields starts ~3.5 s after slurmctld did and
times out at slurmctld's start + 90 s: measured 85.4-87.2 s over four runs (a job started
13 s later: 72-76 s, at the same check).  Tests waiting for a TIMEOUT need
``@pytest.mark.timeout`` well over 90 s.  ``--time=0:10`` is rounded up to one
minute (TimeLimit=00:01:00).  The job's output file (its stderr, i.e.
``slurm-<id>.out`` unless ``-e`` is given) gets ``slurmstepd-tdnode1: error: *** JOB <id> ON
tdnode1 CANCELLED AT <YYYY-MM-DDTHH:MM:SS> DUE TO TIME LIMIT ***`` (note the
``slurmstepd-<node>:`` prefix; ``scancel`` of a running job writes the same line without
``DUE TO TIME LIMIT``); ``KillWait=2``: SIGTERM, SIGKILL 2 s later.  Job state TIMEOUT,
reason TimeLimit, ExitCode 0:15.  Recorded outputs of every Slurm command a
session parser needs: ``tests/e2e/record_slurm_outputs.py`` writes them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import (
    KILL_TIMEOUT,
    NETNS_PREFIX,
    NetNS,
    SSHServer,
    _ip,
    _netns_counter,
    _netns_kill_all,
    _netns_lock,
    _netns_names,
    _pid_alive,
    _sweep_stale_netns,
    _tail,
)

SLURM_BINARIES = {
    "slurmctld": "/usr/sbin/slurmctld",
    "slurmd": "/usr/sbin/slurmd",
    "munged": "/usr/sbin/munged",
    "sbatch": "/usr/bin/sbatch",
}
LOGIN_NAME = "tdlogin"
NODE_PREFIX = "tdnode"
COMPUTE_NET = 252           # node i's /30 is 10.252.i.0/30: .1 login end, .2 node end
MAX_NODES = 2
START_TIMEOUT = 30.0        # until every node is IDLE and the scheduler has run once
DAEMON_TIMEOUT = 10.0       # one daemon answering (munged's socket, slurmctld's ping)
COMMAND_TIMEOUT = 30.0      # one Slurm client command
ETC_NETNS = Path("/etc/netns")


def _require_slurm() -> None:
    missing = [p for p in SLURM_BINARIES.values() if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"Slurm/munge not installed ({', '.join(missing)} missing): run "
                    "`apt-get install -y slurmctld slurmd slurm-client munge`", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the Slurm fixture needs root (namespaces, slurmd)", pytrace=False)


def _wait(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


# --------------------------------------------------------------------------
# namespaces


def _add_netns() -> str:
    """A fresh, empty namespace named by conftest's ``td-<pid>-<n>`` scheme (so that the
    stale sweep of a later run removes it if this process dies), with ``lo`` up."""
    pid = os.getpid()
    with _netns_lock():
        _sweep_stale_netns()
        _sweep_stale_etc_netns()
        existing = _netns_names()
        while True:
            name = f"{NETNS_PREFIX}{pid}-{next(_netns_counter)}"
            if name not in existing:
                break
        _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
    except BaseException:
        _ip("netns", "del", name, check=False)
        raise
    return name


def _sweep_stale_etc_netns() -> None:
    """Remove ``/etc/netns/td-<pid>-<n>`` directories of test processes that died."""
    if not ETC_NETNS.is_dir():
        return
    for entry in ETC_NETNS.iterdir():
        m = re.fullmatch(rf"{NETNS_PREFIX}(\d+)-(\d+)", entry.name)
        if m is not None and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _sweep_stale_workdirs() -> None:
    """Remove /tmp/td-slurm-<pid>-* directories of test processes that died."""
    for entry in Path("/tmp").glob("td-slurm-*-*"):
        m = re.fullmatch(r"td-slurm-(\d+)-\w+", entry.name)
        if m is not None and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _del_netns(name: str) -> None:
    """Kill everything in namespace ``name`` and delete it (its veth pairs go with it)."""
    try:
        _netns_kill_all(name)
    finally:
        r = _ip("netns", "del", name, check=False)
        if r.returncode != 0 and name in _netns_names():
            raise RuntimeError(f"ip netns del {name}: {r.stderr.strip()}")


@dataclass
class ComputeNS:
    """A namespace reachable only from ``login_ns``: a veth pair made directly inside the
    two namespaces (nothing in the root namespace), 10.252.``index``.0/30 (``login_ip`` .1
    on the login side, ``ip`` .2 on the node), a default route through the login side."""

    name: str
    login_ns: str
    index: int
    login_ip: str
    ip: str

    @classmethod
    def create(cls, login_ns: str, index: int = 1) -> ComputeNS:
        assert 1 <= index <= 255, index
        name = _add_netns()
        node = cls(name=name, login_ns=login_ns, index=index,
                   login_ip=f"10.{COMPUTE_NET}.{index}.1", ip=f"10.{COMPUTE_NET}.{index}.2")
        # interface names only need to be unique inside each namespace
        a, b = f"tdc{index}l", f"tdc{index}n"
        try:
            _ip("link", "add", a, "netns", login_ns, "type", "veth", "peer", "name", b,
                "netns", name)
            _ip("-n", login_ns, "addr", "add", f"{node.login_ip}/30", "dev", a)
            _ip("-n", name, "addr", "add", f"{node.ip}/30", "dev", b)
            _ip("-n", login_ns, "link", "set", a, "up")
            _ip("-n", name, "link", "set", b, "up")
            _ip("-n", name, "route", "add", "default", "via", node.login_ip)
        except BaseException:
            _del_netns(name)
            raise
        return node

    def exec_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def close(self) -> None:
        _del_netns(self.name)


@contextlib.contextmanager
def compute_node(login_ns: str, index: int = 1) -> Iterator[tuple[str, str]]:
    """A :class:`ComputeNS` behind ``login_ns``; yields (its namespace, its address)."""
    node = ComputeNS.create(login_ns, index)
    try:
        yield node.name, node.ip
    finally:
        node.close()


# --------------------------------------------------------------------------
# the cluster


def _slurm_conf(work: Path, nodes: dict[str, ComputeNS], login_ip: str,
                extra: dict[str, str] | None = None) -> str:
    """slurm.conf's text; ``extra`` replaces or adds global keywords (not nodes/partitions)."""
    options = {
        "ClusterName": "tunneld",
        "SlurmctldHost": f"{LOGIN_NAME}({login_ip})",
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        "AuthInfo": f"socket={work / 'munge' / 'munge.socket.2'}",
        "MpiDefault": "none",
        "MailProg": "/bin/true",
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "JobCompType": "jobcomp/none",
        "SchedulerType": "sched/backfill",
        # a batch job starts at the next tick of slurmctld's 1 s loop, not up to 3 s later
        "SchedulerParameters": "batch_sched_delay=0",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core",
        "SlurmdParameters": "config_overrides",
        # a job over a partition's limits is refused by sbatch (NO, the default, queues it
        # as PENDING with reason PartitionTimeLimit &c. for ever)
        "EnforcePartLimits": "ALL",
        "ReturnToService": "2",
        "KillWait": "2",
        "OverTimeLimit": "0",
        "MinJobAge": "600",
        "InactiveLimit": "0",
        "PropagateResourceLimits": "NONE",
        "StateSaveLocation": f"{work / 'state'}",
        "SlurmdSpoolDir": f"{work / 'spool'}/%n",
        "SlurmctldPidFile": f"{work / 'run' / 'slurmctld.pid'}",
        "SlurmdPidFile": f"{work / 'run'}/slurmd-%n.pid",
        "SlurmctldLogFile": f"{work / 'log' / 'slurmctld.log'}",
        "SlurmdLogFile": f"{work / 'log'}/slurmd-%n.log",
        "SlurmctldDebug": "info",
        "SlurmdDebug": "info",
        "PlugStackConfig": f"{work / 'plugstack.conf'}",  # not /etc/slurm's
    }
    options.update(extra or {})
    lines = [f"{k}={v}" for k, v in options.items()]
    lines += [f"NodeName={n} NodeAddr={ns.ip} NodeHostname={n} CPUs=2 Sockets=1 "
              "CoresPerSocket=2 ThreadsPerCore=1 State=UNKNOWN" for n, ns in nodes.items()]
    lines += ["PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
              f"PartitionName=gpu Nodes={list(nodes)[-1]} MaxTime=5 State=UP"]
    return "\n".join(lines) + "\n"


def _hosts(login_ip: str, nodes: dict[str, ComputeNS]) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             f"{login_ip}\t{LOGIN_NAME}"]
    lines += [f"{ns.ip}\t{name}" for name, ns in nodes.items()]
    return "\n".join(lines) + "\n"


def parse_scontrol_one_line(text: str) -> dict[str, str]:
    """``scontrol show job -o`` / ``show node -o`` -> {key: value} (values with spaces,
    e.g. ``Command=``, are cut at the first space: use it for the simple fields)."""
    return dict(re.findall(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(\S*)", text))


@dataclass
class SlurmCluster:
    """A started cluster (see the module docstring).  Use :func:`slurm_cluster_ctx`.

    ``login``: the :class:`SSHServer` of the login node (``login.host`` the ssh alias,
    ``login.home`` the local temp HOME, ``login.server_home`` the remote HOME,
    ``login.netns`` its namespace, ``login.exec_in_ns(argv)``); ``nodes``: node names;
    ``conf``: slurm.conf; ``env``: the environment of Slurm commands run here (``os.environ``
    with ``SLURM_CONF`` and ``HOME=server_home``); ``remote_env``: what sshd adds for
    remote commands (``SLURM_CONF``); ``workdir``: the daemons' state, spool and logs.
    """

    login: SSHServer
    workdir: Path
    conf: Path
    env: dict[str, str]
    remote_env: dict[str, str]
    login_name: str = LOGIN_NAME
    node_ns: dict[str, ComputeNS] = field(default_factory=dict)
    startup_seconds: float = 0.0
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    # ---- where things are ------------------------------------------------
    @property
    def nodes(self) -> list[str]:
        return list(self.node_ns)

    @property
    def host(self) -> str:
        """The ssh alias of the login node (``login.host``)."""
        return self.login.host

    @property
    def netns(self) -> str:
        """The login node's namespace."""
        assert self.login.netns is not None
        return self.login.netns

    def node_ip(self, name: str) -> str:
        return self.node_ns[name].ip

    def login_ip(self, node: str | None = None) -> str:
        """The login node's address on ``node``'s veth (the first node's by default)."""
        return self.node_ns[node or self.nodes[0]].login_ip

    @property
    def logdir(self) -> Path:
        return self.workdir / "log"

    # ---- running things --------------------------------------------------
    def exec_in_login(self, argv: list[str]) -> list[str]:
        return self.login.exec_in_ns(argv)

    def exec_on_node(self, node: str, argv: list[str]) -> list[str]:
        """``argv`` in ``node``'s namespace (not in its UTS namespace: hostname is this
        machine's there)."""
        return self.node_ns[node].exec_argv(argv)

    def run(self, argv: list[str], *, timeout: float = COMMAND_TIMEOUT,
            input: str | None = None, check: bool = False,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """A Slurm command (or anything) in the login namespace with ``env``, in
        ``server_home`` (where sbatch puts ``slurm-ID.out``)."""
        r = subprocess.run(self.exec_in_login(list(argv)), env=self.env, text=True,
                           capture_output=True, timeout=timeout, input=input,
                           cwd=cwd or self.login.server_home,
                           stdin=None if input is not None else subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise AssertionError(f"{shlex.join(argv)} exited {r.returncode}\n"
                                 f"stdout: {r.stdout}\nstderr: {r.stderr}\n"
                                 f"{self.log_tails()}")
        return r

    def ssh(self, command: str, *, timeout: float = COMMAND_TIMEOUT,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """``command`` through the login node's sshd (as tunneld would run it)."""
        r = subprocess.run(["ssh", "-F", str(self.login.ssh_config), self.login.host,
                            command], env=self.login.env, text=True, capture_output=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise AssertionError(f"ssh {self.login.host} {command!r} exited "
                                 f"{r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
        return r

    def ssh_w(self, host: str, port: int, *, input: str = "",
              timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """``ssh -W host:port``: a ``direct-tcpip`` channel opened on the login node's sshd,
        as tunneld's forwards are; ``input`` is sent, the reply is the stdout."""
        return subprocess.run(["ssh", "-F", str(self.login.ssh_config), "-W",
                               f"{host}:{port}", self.login.host], env=self.login.env,
                              text=True, capture_output=True, timeout=timeout, input=input)

    def sbatch(self, *args: str) -> str:
        """``sbatch --parsable ARGS`` in the login namespace; returns the job id."""
        r = self.run(["sbatch", "--parsable", *args], check=True)
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o ID`` as a dict ({} for an unknown or purged job)."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        return parse_scontrol_one_line(r.stdout) if r.returncode == 0 else {}

    def wait_job(self, job_id: str, *states: str, timeout: float = 30.0) -> dict[str, str]:
        """Poll until the job's JobState is one of ``states``; returns ``job()``."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() >= deadline:
                raise AssertionError(f"job {job_id} not in {states} within {timeout:g} s "
                                     f"(last: {info})\n{self.log_tails()}")
            time.sleep(0.2)

    def node_states(self) -> dict[str, str]:
        r = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=10)
        states = {}
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        return states

    def log_tails(self, limit: int = 3000) -> str:
        """The last ``limit`` characters of every daemon's log, for failure messages."""
        parts = []
        for path in sorted(self.logdir.glob("*")):
            parts.append(f"--- {path.name}:\n{_tail(path, limit)}")
        parts.append(f"--- sshd.log:\n{_tail(self.login.sshd_log, limit)}")
        return "\n".join(parts)

    # ---- start and stop --------------------------------------------------
    def _spawn(self, key: str, argv: list[str]) -> subprocess.Popen:
        with (self.logdir / f"{key}.stderr").open("ab") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    start_new_session=True, close_fds=True)
        self._procs[key] = proc
        return proc

    def _check_alive(self) -> None:
        for key, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{key} exited with status {proc.returncode}")

    def _start_munged(self) -> None:
        mdir = self.workdir / "munge"
        key = mdir / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        socket_path = mdir / "munge.socket.2"
        self._spawn("munged", self.exec_in_login([
            SLURM_BINARIES["munged"], "--foreground", "--force", "--num-threads=2",
            f"--key-file={key}", f"--socket={socket_path}",
            f"--pid-file={mdir / 'munged.pid'}", f"--log-file={self.logdir / 'munged.log'}",
            f"--seed-file={mdir / 'munged.seed'}",
            # the login namespace's hosts file does not name this machine
            f"--origin={self.login_ip()}"]))

        def up() -> bool:
            self._check_alive()
            import socket
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(socket_path))
                except OSError:
                    return False
            return True
        _wait(up, DAEMON_TIMEOUT, "munged accepting on its socket")

    def _in_uts(self, hostname: str, argv: list[str]) -> list[str]:
        """``argv`` in a new UTS namespace whose host name is ``hostname`` (exec'd in place:
        the Popen pid is the daemon's)."""
        return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname,
                *argv]

    def _start_slurmctld(self) -> None:
        self._spawn("slurmctld", self.exec_in_login(self._in_uts(LOGIN_NAME, [
            SLURM_BINARIES["slurmctld"], "-D", "-f", str(self.conf)])))

        def up() -> bool:
            self._check_alive()
            return self.run(["scontrol", "ping"], timeout=10).returncode == 0
        _wait(up, DAEMON_TIMEOUT, "slurmctld answering `scontrol ping`", interval=0.1)

    def _start_slurmd(self, name: str) -> None:
        """slurmd in the node's network namespace, but not through ``ip netns exec``: that
        mounts a fresh /sys without /sys/fs/cgroup, and slurmd 22.05 refuses to start
        without a cgroup hierarchy ("Unable to initialize cgroup plugin") even with
        proctrack/linuxproc and task/none.  ``nsenter --net`` keeps this machine's /sys;
        the node's hosts file is bind-mounted in a private mount namespace instead."""
        (self.workdir / "spool" / name).mkdir(parents=True, exist_ok=True)
        ns = self.node_ns[name]
        hosts = ETC_NETNS / ns.name / "hosts"
        self._spawn(f"slurmd-{name}", [
            "nsenter", f"--net=/run/netns/{ns.name}", "unshare", "--mount", "--uts",
            "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"',
            str(hosts), name,
            SLURM_BINARIES["slurmd"], "-D", "-N", name, "-f", str(self.conf)])

    def _wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            self._check_alive()
            states = self.node_states()
            return all(states.get(n) == "idle" for n in self.nodes)
        _wait(idle, timeout, f"nodes {', '.join(self.nodes)} IDLE", interval=0.1)

    def _wait_scheduler(self, timeout: float) -> None:
        """Until slurmctld's main scheduler has run once (``sdiag``): it first runs ~3 s
        after slurmctld started, whatever is queued; then a job starts within ~1 s."""
        def ran() -> bool:
            self._check_alive()
            out = self.run(["sdiag"], timeout=10).stdout
            m = re.search(r"Main schedule statistics.*?Total cycles:\s*(\d+)", out, re.S)
            return m is not None and int(m.group(1)) > 0
        _wait(ran, timeout, "slurmctld's first scheduling cycle (sdiag)", interval=0.1)

    def stop(self) -> None:
        """Kill the daemons this cluster started (then the namespaces go: see the ctx)."""
        for proc in self._procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
        for key, proc in self._procs.items():
            try:
                proc.wait(timeout=KILL_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{key} (pid {proc.pid}) survived SIGKILL") from None


@contextlib.contextmanager
def slurm_cluster_ctx(base: Path, *, nodes: int = 1, alias: str = "cluster",
                      extra_conf: dict[str, str] | None = None) -> Iterator[SlurmCluster]:
    """Start a :class:`SlurmCluster`: SSH files under ``base``, the daemons' files in a short
    /tmp/td-slurm-<pid>-* directory (Unix socket paths are limited to 108 bytes).
    ``extra_conf`` replaces or adds global slurm.conf keywords (e.g. ``{"MinJobAge": "5"}``).
    On exit, also after a failure, kill every process in its namespaces, delete the
    namespaces (and with them the veth pairs), ``/etc/netns/<ns>`` and the temp dir."""
    _require_slurm()
    assert 1 <= nodes <= MAX_NODES, nodes
    t0 = time.monotonic()
    _sweep_stale_workdirs()
    work = Path(tempfile.mkdtemp(prefix=f"td-slurm-{os.getpid()}-", dir="/tmp"))
    work.chmod(0o755)  # munged wants its socket's directories searchable by all
    for sub in ("munge", "state", "spool", "log", "run"):
        (work / sub).mkdir(mode=0o755)
    (work / "plugstack.conf").write_text("")
    login_ns: NetNS | None = None
    node_ns: dict[str, ComputeNS] = {}
    etc_dirs: list[Path] = []
    cluster: SlurmCluster | None = None
    server: SSHServer | None = None
    try:
        login_ns = NetNS.create()
        for i in range(1, nodes + 1):
            node_ns[f"{NODE_PREFIX}{i}"] = ComputeNS.create(login_ns.name, i)
        # the nodes reach each other (and answer each other's slurmd) through the login
        subprocess.run(["ip", "netns", "exec", login_ns.name, "sysctl", "-qw",
                        "net.ipv4.ip_forward=1"], check=True, capture_output=True, timeout=10)
        login_ip = node_ns[f"{NODE_PREFIX}1"].login_ip
        hosts = _hosts(login_ip, node_ns)
        for ns_name in [login_ns.name, *(ns.name for ns in node_ns.values())]:
            d = ETC_NETNS / ns_name
            d.mkdir(parents=True, exist_ok=False)
            etc_dirs.append(d)
            (d / "hosts").write_text(hosts)
        conf = work / "slurm.conf"
        conf.write_text(_slurm_conf(work, node_ns, login_ip, extra_conf))
        remote_env = {"SLURM_CONF": str(conf)}
        server = SSHServer.create(base, host=alias, netns=login_ns.name,
                                  listen_host=login_ns.ns_ip, server_env=remote_env)
        server.ns = login_ns
        # sshd starts commands in the passwd home (/root); a login shell of bash reads
        # $HOME/.bashrc for a command from sshd: start them in the throw-away HOME instead
        (server.server_home / ".bashrc").write_text('cd "$HOME" || exit 1\n')
        env = dict(os.environ, HOME=str(server.server_home), **remote_env)
        env.pop("SSH_AUTH_SOCK", None)
        cluster = SlurmCluster(login=server, workdir=work, conf=conf, env=env,
                               remote_env=remote_env, node_ns=node_ns)
        try:
            cluster._start_munged()
            server.start()
            cluster._start_slurmctld()
            for name in node_ns:
                cluster._start_slurmd(name)
            cluster._wait_idle(max(1.0, START_TIMEOUT - (time.monotonic() - t0)))
            cluster._wait_scheduler(max(1.0, START_TIMEOUT - (time.monotonic() - t0)))
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"Slurm cluster did not start: {e}\n"
                               f"{cluster.log_tails()}") from e
        cluster.startup_seconds = time.monotonic() - t0
        yield cluster
    finally:
        errors: list[str] = []

        def step(what: str, fn, *args) -> None:
            try:
                fn(*args)
            except Exception as e:  # go on with the rest of the teardown
                errors.append(f"{what}: {e}")
        if server is not None:
            step("sshd", server.close)
        if cluster is not None:
            step("daemons", cluster.stop)
        for ns in node_ns.values():
            step(f"node netns {ns.name}", ns.close)
        if login_ns is not None:
            step(f"login netns {login_ns.name}", login_ns.close)
        for d in etc_dirs:
            step(f"rm {d}", shutil.rmtree, d)
        step(f"rm {work}", shutil.rmtree, work)
        if errors:
            raise RuntimeError("Slurm cluster teardown: " + "; ".join(errors))


def _nodes_param(request: pytest.FixtureRequest) -> int:
    return int(getattr(request, "param", 1))


@pytest.fixture
def slurm_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SlurmCluster]:
    """A started :class:`SlurmCluster` for this test (login alias ``cluster``; one node,
    ``tdnode1``, or as many as an indirect parameter asks for).  Start-up takes ~0.5 s, so
    there is no module-scoped variant: every test gets a cluster with no jobs in it."""
    with slurm_cluster_ctx(tmp_path, nodes=_nodes_param(request)) as cluster:
        yield cluster

