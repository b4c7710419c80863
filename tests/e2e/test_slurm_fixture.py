"""The ``slurm_cluster`` fixture (tests/e2e/slurm.py) is a working cluster: batch jobs
submitted over ssh run on the compute node, ``--exclusive`` makes the next job pend,
``scancel`` ends them, a job's listener is reachable from the login node by the node's name
(also through the login node's sshd, as tunneld forwards to it), two nodes work, and
nothing is left behind, also when the start fails."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import slurm
from conftest import _alive, _netns_names, _netns_pids, _proc_table
from slurm import SlurmCluster, slurm_cluster_ctx

pytestmark = pytest.mark.timeout(120)

SQUEUE_FORMAT = "%i|%T|%r|%N|%l|%L|%S|%e"

# listens on 0.0.0.0:PORT (argv[1]), says so on stdout, answers every connection with
# "hello from <hostname>" and closes it
LISTENER = textwrap.dedent("""
    import socket, sys
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.listen(8)
    print("listening", flush=True)
    while True:
        c, _ = s.accept()
        c.sendall(("hello from %s\\n" % socket.gethostname()).encode())
        c.close()
""")


def wait_for(predicate, timeout: float, what: str, cluster: SlurmCluster):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n"
                                 f"{cluster.log_tails()}")
        time.sleep(0.1)


def squeue_rows(cluster: SlurmCluster, *job_ids: str) -> dict[str, list[str]]:
    """job id -> the fields of SQUEUE_FORMAT, from `squeue -h -t all` over ssh."""
    r = cluster.ssh(f"squeue -h -t all -o {shlex.quote(SQUEUE_FORMAT)}", check=True)
    rows = {line.split("|")[0]: line.split("|") for line in r.stdout.splitlines() if line}
    return {j: rows[j] for j in job_ids if j in rows}


def ssh_sbatch(cluster: SlurmCluster, options: str) -> str:
    r = cluster.ssh(f"sbatch --parsable {options}", check=True)
    job_id = r.stdout.strip()
    assert job_id.isdigit(), r
    return job_id


def test_a_job_submitted_over_ssh_runs_on_the_node(slurm_cluster: SlurmCluster):
    c = slurm_cluster
    assert c.nodes == ["tdnode1"] and c.host == c.login.host == "cluster"
    assert c.node_states() == {"tdnode1": "idle"}
    job = ssh_sbatch(c, "--wrap 'hostname; echo HOME=$HOME; sleep 1'")
    # squeue shows it while it is pending/running and after it ended (-t all)
    row = wait_for(lambda: squeue_rows(c, job).get(job), 10, "the job in squeue", c)
    assert row[1] in ("PENDING", "RUNNING", "COMPLETED"), row
    info = c.wait_job(job, "COMPLETED", timeout=30)
    assert info["NodeList"] == "tdnode1" and info["ExitCode"] == "0:0", info
    # sbatch ran in the remote HOME (not in /root), so the output file is there
    out = c.login.server_home / f"slurm-{job}.out"
    assert out.read_text() == f"tdnode1\nHOME={c.login.server_home}\n"
    assert not Path(f"/root/slurm-{job}.out").exists()
    assert squeue_rows(c, job)[job][:4] == [job, "COMPLETED", "None", "tdnode1"]


def test_an_exclusive_job_makes_the_next_one_pend_and_scancel_ends_both(
        slurm_cluster: SlurmCluster):
    c = slurm_cluster
    first = ssh_sbatch(c, "--exclusive --wrap 'sleep 300'")
    c.wait_job(first, "RUNNING")
    second = ssh_sbatch(c, "--time=3 --wrap 'sleep 300'")

    def pending_with_reason():
        rows = squeue_rows(c, first, second)
        return rows if rows.get(second, [""] * 3)[2] not in ("", "None") else None
    rows = wait_for(pending_with_reason, 15, "a reason for the pending job", c)
    assert rows[first][1:4] == ["RUNNING", "None", "tdnode1"], rows
    assert rows[second][1] == "PENDING" and rows[second][2] == "Resources", rows
    assert rows[second][3] == "" and rows[second][4] == "3:00", rows
    assert c.job(second)["Reason"] == "Resources"

    r = c.ssh(f"scancel {first} {second}")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    for job in (first, second):
        c.wait_job(job, "CANCELLED")
    rows = squeue_rows(c, first, second)
    assert rows[first][1] == rows[second][1] == "CANCELLED", rows
    wait_for(lambda: c.node_states() == {"tdnode1": "idle"}, 15, "the node idle again", c)


def _start_listener(c: SlurmCluster, port: int, options: str = "") -> str:
    prog = c.login.server_home / "listener.py"
    prog.write_text(LISTENER)
    job = ssh_sbatch(c, f"{options} --wrap '{sys.executable} {prog} {port}'")
    out = c.login.server_home / f"slurm-{job}.out"
    wait_for(lambda: out.exists() and "listening" in out.read_text(), 30,
             "the job's listener", c)
    return job


def _greeting_from_here(host: str, port: int) -> bytes:
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.settimeout(2)
            return s.recv(100)
    except OSError:
        return b""


def _connect_in_login(c: SlurmCluster, host: str, port: int) -> str:
    code = ("import socket, sys; s = socket.create_connection((sys.argv[1], "
            "int(sys.argv[2])), timeout=10); print(s.makefile().read(), end='')")
    r = c.run([sys.executable, "-c", code, host, str(port)], check=True)
    return r.stdout


@pytest.mark.parametrize("slurm_cluster", [1, 2], indirect=True, ids=["1node", "2nodes"])
def test_a_jobs_listener_is_reachable_from_the_login_node_by_the_nodes_name(
        slurm_cluster: SlurmCluster):
    c = slurm_cluster
    node = c.nodes[-1]  # the gpu partition's node
    job = _start_listener(c, 8765, "-p gpu --time=2")
    assert c.job(job)["NodeList"] == node
    assert _connect_in_login(c, node, 8765) == f"hello from {node}\n"
    # as tunneld reaches it: a direct-tcpip channel on the login node's sshd (ssh -W)
    r = c.ssh_w(node, 8765)
    assert (r.returncode, r.stdout) == (0, f"hello from {node}\n"), r
    # from this (the root) namespace the node is not reachable (the connect itself may
    # succeed: a sandbox's outside network can accept every address)
    assert _greeting_from_here(c.node_ip(node), 8765) == b""
    c.run(["scancel", job], check=True)
    c.wait_job(job, "CANCELLED")


@pytest.mark.parametrize("slurm_cluster", [2], indirect=True)
def test_two_nodes_take_jobs_and_reach_each_other(slurm_cluster: SlurmCluster):
    c = slurm_cluster
    assert c.nodes == ["tdnode1", "tdnode2"]
    assert c.node_states() == {"tdnode1": "idle", "tdnode2": "idle"}
    jobs = {n: c.sbatch("-w", n, "--wrap", "hostname") for n in c.nodes}
    for node, job in jobs.items():
        assert c.wait_job(job, "COMPLETED")["NodeList"] == node
        assert (c.login.server_home / f"slurm-{job}.out").read_text() == f"{node}\n"
    # tdnode1 reaches tdnode2 through the login namespace (and by name)
    job = _start_listener(c, 8766, "-w tdnode2")
    code = ("import socket; print(socket.create_connection(('tdnode2', 8766), timeout=10)"
            ".makefile().read(), end='')")
    r = subprocess.run(c.exec_on_node("tdnode1", [sys.executable, "-c", code]),
                       capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, "hello from tdnode2\n"), r
    c.run(["scancel", job], check=True)


def _leftovers(names: list[str], pids: list[int], paths: list[Path]) -> list[str]:
    """What is still there: a namespace, a live process (a zombie that pid 1 has not reaped
    yet is dead; the start time tells a reused pid apart), a path."""
    left = [f"netns {n}" for n in names if n in _netns_names()]
    table = _proc_table()
    left += [f"pid {p}" for p, start in pids if _alive(table, p, start)]
    left += [f"path {p}" for p in paths if p.exists()]
    return left


def test_teardown_leaves_nothing_behind(tmp_path: Path):
    with slurm_cluster_ctx(tmp_path) as c:
        job = _start_listener(c, 8767)  # a job still running at teardown
        names = [c.netns, *(ns.name for ns in c.node_ns.values())]
        table = _proc_table()
        pids = [(p, table[p][1]) for n in names for p in _netns_pids(n)]
        assert {p.pid for p in c._procs.values()} | {c.login.pid} <= {p for p, _ in pids}
        paths = [c.workdir, *(slurm.ETC_NETNS / n for n in names)]
        assert c.job(job)["JobState"] == "RUNNING"
        assert set(names) <= _netns_names()
        assert len(pids) > 5 and all(p.exists() for p in paths)
    assert _leftovers(names, pids, paths) == []


def test_a_failed_start_says_why_and_leaves_nothing_behind(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(slurm.SLURM_BINARIES, "slurmd", "/bin/false")
    before = set(_netns_names())
    etc_before = set(os.listdir(slurm.ETC_NETNS)) if slurm.ETC_NETNS.exists() else set()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        with slurm_cluster_ctx(tmp_path):
            pass
    assert time.monotonic() - t0 < 15
    text = str(info.value)
    assert "slurmd-tdnode1 exited with status 1" in text
    assert "--- slurmctld.log:" in text and "Running as primary controller" in text
    assert set(_netns_names()) - before == set()
    etc_after = set(os.listdir(slurm.ETC_NETNS)) if slurm.ETC_NETNS.exists() else set()
    assert etc_after - etc_before == set()
