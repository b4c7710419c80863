"""Batch jobs (`run --job`) end to end, against a real Slurm in network namespaces (the
``slurm_cluster`` fixture, tests/e2e/slurm.py): the login node runs sshd and slurmctld, the
compute node tdnode1 runs slurmd in a namespace of its own that only the login node reaches.

Jobs run the test's own Python programs from this machine's filesystem (shared, as a
cluster's home is); the daemon records opened URLs instead of starting a browser.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import Daemon
from test_e2e_sessions import script, wait_opened, with_recorder

pytestmark = pytest.mark.timeout(150)

# serves on all addresses (the login node reaches it as tdnode1:PORT), prints its loopback URL
# and opens a page through the BROWSER helper; argv[1]: the port ("0": any), argv[2]: a file
# that ends it (with argv[3] as the exit status)
SERVE = textwrap.dedent("""
    import http.server, os, socket, socketserver, sys, threading, time, webbrowser
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = ("served on %s path %s" % (socket.gethostname(), self.path)).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    socketserver.TCPServer.allow_reuse_address = True
    srv = socketserver.ThreadingTCPServer(("0.0.0.0", int(sys.argv[1])), H)
    port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("serving at http://127.0.0.1:%d/lab?token=t0k" % port, flush=True)
    webbrowser.open("http://127.0.0.1:%d/page" % port)
    deadline = time.time() + 120
    while not os.path.exists(sys.argv[2]) and time.time() < deadline:
        time.sleep(0.05)
    sys.exit(int(sys.argv[3]))
""")

# numbered lines every 20 ms until the file argv[1] exists, then exit status argv[2]
COUNT = textwrap.dedent("""
    import os, sys, time
    i, deadline = 0, time.time() + 120
    while not os.path.exists(sys.argv[1]) and time.time() < deadline:
        print("line %d" % i, flush=True)
        i += 1
        time.sleep(0.02)
    print("done", flush=True)
    sys.exit(int(sys.argv[2]))
""")


@pytest.fixture
def opened(tmp_path):
    return tmp_path / "opened.txt"


@pytest.fixture
def jd(slurm_cluster, opened, tmp_path):
    """A daemon for the cluster's login node, recording the URLs it opens; a walltime
    warning 45 s before a job's limit (the shortest limit Slurm takes is a minute)."""
    d = Daemon(slurm_cluster.login)
    d.start()
    try:
        yield with_recorder(d, opened, tmp_path, "job_warning = 0.75\n")
    finally:
        d.close()


def sessions(d) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads(d.ctl("sessions", "--json").stdout)["sessions"]}


def wait_job(d, name: str, *states: str, timeout: float = 40) -> dict:
    """Until session ``name``'s job is in one of ``states`` (or, for an ended session,
    the session in one of them)."""
    got: dict = {}

    def check() -> bool:
        nonlocal got
        got = sessions(d).get(name, {})
        return (got.get("job") or {}).get("state") in states or got.get("state") in states
    d.wait_for(check, timeout=timeout, what=f"session {name}'s job to be {'/'.join(states)}")
    return got


def test_a_job_on_a_node_is_opened_forwarded_listed_and_cancelled(jd, slurm_cluster, opened,
                                                                  tmp_path):
    """`run --job --port auto`: the port is chosen on tdnode1 when the job starts, its
    marker opens the page through the login node, the URL it printed (its node's loopback)
    is forwarded to the node; `kill` is scancel and the job shows cancelled."""
    d, c = jd, slurm_cluster
    prog = script(tmp_path, SERVE)
    r = d.ctl("run", c.host, "--name", "lab", "--job", "--time=10 -J mylab", "--port", "auto",
              "--", sys.executable, str(prog), "{port}", str(tmp_path / "never"), "0")
    assert r.stdout.strip() == "lab"
    m = re.search(r"slurm job (\d+) submitted on cluster, (pending|running on tdnode1)",
                  r.stderr)
    assert m, r.stderr
    job_id = m.group(1)
    s = wait_job(d, "lab", "running")
    job = s["job"]
    assert job["id"] == job_id and job["scheduler"] == "slurm" and job["node"] == "tdnode1"
    assert job["time_limit"] == 600 and job["ends"] and job["started"]
    port = job["port"]
    assert isinstance(port, int) and s["port"] == port and s["state"] == "running"
    assert c.job(job_id)["JobName"] == "mylab"   # the user's options come after tunneld's
    # the marker: printed on tdnode1, so its loopback URL is tdnode1's
    (url,) = wait_opened(opened)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/page", url), url
    assert urllib.request.urlopen(url, timeout=10).read().decode() == \
        "served on tdnode1 path /page"
    local_port = int(url.split(":")[2].split("/")[0])
    assert d.forward(local_port, c.host)["target"] == f"tdnode1:{port}"
    # the printed URL: listed, forwarded to the node, not opened
    d.wait_for(lambda: sessions(d)["lab"]["urls"], timeout=20, what="the printed URL")
    (u,) = sessions(d)["lab"]["urls"]
    assert u["remote"] == f"http://127.0.0.1:{port}/lab?token=t0k"
    assert urllib.request.urlopen(u["local"], timeout=10).read().decode() == \
        "served on tdnode1 path /lab?token=t0k"
    table = d.ctl("sessions").stdout
    assert re.search(rf"lab +cluster +running on tdnode1 +0:(09|10):\d\d left +job {job_id}",
                     table), table
    log = d.ctl("logs", "lab").stdout
    assert f"tunneld: job {job_id} runs on tdnode1, port {port}" in log
    # kill = scancel
    r = d.ctl("kill", "lab")
    assert f"scancel {job_id}" in r.stdout
    s = wait_job(d, "lab", "killed")
    assert s["state"] == "killed" and s["job"]["state"] == "cancelled"
    assert c.job(job_id)["JobState"] == "CANCELLED"
    assert re.search(r"lab +cluster +cancelled", d.ctl("sessions").stdout)
    d.wait_for(lambda: not [f for h in d.list()["hosts"] for f in h.get("forwards", [])
                            if f["target"].startswith("tdnode1:")],
               timeout=20, what="the job's forwards to go")
    assert "lab is running on tdnode1" in d.log(tail=None)   # the notification's text


def test_a_job_pending_behind_an_exclusive_one_shows_why_then_runs(jd, slurm_cluster):
    d, c = jd, slurm_cluster
    blocker = c.sbatch("--exclusive", "--wrap", "sleep 300")
    c.wait_job(blocker, "RUNNING")
    d.ctl("run", c.host, "--name", "waiter", "--job", "--time=5", "--", "echo started; sleep 300")
    s = wait_job(d, "waiter", "pending")
    d.wait_for(lambda: (sessions(d)["waiter"]["job"] or {}).get("reason") == "Resources",
               timeout=30, what="the pending reason")
    s = sessions(d)["waiter"]
    assert s["state"] == "pending" and s["job"]["node"] is None and s["job"]["ends"] is None
    assert re.search(r"waiter +cluster +pending \(Resources\) +job \d+", d.ctl("sessions").stdout)
    r = d.ctl("logs", "waiter")
    assert "is pending (Resources); its output comes when it runs" in r.stderr
    assert r.stdout == ""
    # the next daemon takes the waiting job up
    assert d.stop() == 0
    d.start()
    s = wait_job(d, "waiter", "pending")
    assert s["job"]["reason"] == "Resources" and s["state"] == "pending"
    c.run(["scancel", blocker], check=True)
    s = wait_job(d, "waiter", "running", timeout=60)
    assert s["job"]["node"] == "tdnode1" and s["state"] == "running"
    d.wait_for(lambda: "started" in d.ctl("logs", "waiter").stdout, timeout=20,
               what="the job's output")
    log = d.log(tail=None)
    assert log.count("waiter is running on tdnode1") == 1   # the notification, once
    assert "session waiter: pending -> running (job" in log
    d.ctl("kill", "waiter")
    wait_job(d, "waiter", "killed")


def test_a_rejected_submission_is_runs_error_in_the_schedulers_words(jd, slurm_cluster):
    d, c = jd, slurm_cluster
    r = d.ctl("run", c.host, "--name", "bad", "--job", "-p nosuch", "--", "true", check=False)
    assert r.returncode == 1, r
    assert "sbatch: error: invalid partition specified: nosuch" in r.stderr
    s = sessions(d)["bad"]
    assert s["state"] == "failed" and s["job"]["id"] is None
    sess_dirs = c.login.server_home / ".tunneld" / "sessions"
    assert not [p for p in sess_dirs.iterdir() if p.name.startswith("bad-")]
    # over a limit (the gpu partition's MaxTime is 5 minutes)
    r = d.ctl("run", c.host, "--name", "long", "--job", "-p gpu --time=6", "--", "true",
              check=False)
    assert r.returncode == 1 and "sbatch: error: Batch job submission failed: Requested " \
        "time limit is invalid (missing or exceeds some limit)" in r.stderr, r.stderr
    # an option tunneld must set itself is refused before anything reaches the server
    r = d.ctl("run", c.host, "--job", "--output=x.out", "--", "true", check=False)
    assert r.returncode == 1 and "--output is tunneld's to set" in r.stderr
    r = d.ctl("run", c.host, "--job", "", "--no-detach", "--", "true", check=False)
    assert r.returncode == 1 and "leave out --no-detach" in r.stderr


def test_a_job_reaching_its_time_limit_is_warned_of_then_shown_as_timeout(jd, slurm_cluster):
    """--time=1 (Slurm's shortest; slurmctld ends it 60–90 s after its start); the warning
    comes job_warning (here 0.75 min) before the end, once; then `timeout`."""
    d, c = jd, slurm_cluster
    d.ctl("run", c.host, "--name", "short", "--job", "--time=1", "--",
          "echo up; sleep 300")
    s = wait_job(d, "short", "running")
    assert s["job"]["time_limit"] == 60
    d.wait_for(lambda: "short on tdnode1 ends in 1 min: save your work" in d.log(tail=None),
               timeout=60, what="the walltime warning")
    wait_job(d, "short", "timeout", timeout=100)
    s = wait_job(d, "short", "failed", timeout=20)   # (the session, once the log is fetched)
    assert s["state"] == "failed" and s["job"]["state"] == "timeout"
    assert s["error"] == f"job {s['job']['id']} reached its time limit"
    assert re.search(r"short +cluster +timeout", d.ctl("sessions").stdout)
    assert "DUE TO TIME LIMIT" in d.ctl("logs", "short").stdout   # slurmstepd's line, fetched
    assert d.log(tail=None).count("ends in 1 min: save your work") == 1


def test_output_is_followed_across_a_drop_and_a_daemon_restart(jd, slurm_cluster, tmp_path):
    """Nothing lost or repeated: the local log is the job's output file, byte for byte;
    the job's exit status 3 is `failed (exit 3)`."""
    d, c = jd, slurm_cluster
    prog = script(tmp_path, COUNT)
    stop = tmp_path / "stop"
    d.ctl("run", c.host, "--name", "count", "--job", "", "--", sys.executable, str(prog),
          str(stop), "3")
    s = wait_job(d, "count", "running")
    log_path = Path(s["log"])
    d.wait_for(lambda: log_path.exists() and b"line 20" in log_path.read_bytes(), timeout=30,
               what="some output")
    c.login.stop()
    c.login.kill_connections()
    wait_job(d, "count", "disconnected")
    time.sleep(0.5)   # the job goes on writing while nobody follows
    c.login.start()
    d.ctl("reconnect", c.host, check=False)
    wait_job(d, "count", "running")
    assert d.stop() == 0
    d.start()
    s = wait_job(d, "count", "running")
    stop.touch()
    s = wait_job(d, "count", "exited", timeout=60)
    assert s["exit_status"] == 3 and s["job"]["state"] == "failed"
    assert re.search(r"count +cluster +failed \(exit 3\)", d.ctl("sessions").stdout)
    local = log_path.read_bytes()
    assert local == (Path(s["remote_dir"]) / "log").read_bytes()
    lines = local.decode().splitlines()
    assert lines[0].startswith("tunneld: job ") and lines[-1] == "done"
    numbers = [int(x.split()[1]) for x in lines[1:-1]]
    assert numbers == list(range(len(numbers))) and len(numbers) > 40


def test_jupyter_server_in_a_job_opens_in_the_browser(jd, slurm_cluster, opened, tmp_path):
    """The issue's line: `run --job … -- jupyter … --no-browser --ip=0.0.0.0`; with
    printed_urls = "open" the first URL it prints opens here, with its token."""
    d, c = jd, slurm_cluster
    with_recorder(d, opened, tmp_path, 'job_warning = 0.75\nprinted_urls = "open"\n')
    d.ctl("run", c.host, "--name", "jl", "--job", "--time=5", "--port", "auto", "--",
          sys.executable, "-m", "jupyter_server", "--no-browser", "--ip=0.0.0.0", "--allow-root",
          "--port={port}", f"--ServerApp.root_dir={tmp_path}")
    (url,) = wait_opened(opened, timeout=60)
    m = re.fullmatch(r"http://127\.0\.0\.1:\d+/(?:lab|tree)?\?token=([0-9a-f]{16,})", url)
    assert m, url   # the token jupyter made and printed
    status = url.split("?")[0].rstrip("/") + f"/api/status?token={m.group(1)}"
    body = json.loads(urllib.request.urlopen(status, timeout=10).read())
    assert "started" in body
    s = sessions(d)["jl"]
    assert s["job"]["node"] == "tdnode1" and s["urls"]
    d.ctl("kill", "jl")
    wait_job(d, "jl", "killed", timeout=60)


def test_a_marker_of_a_job_submitted_with_plain_sbatch_arrives_through_the_spool(
        jd, slurm_cluster, opened, tmp_path):
    """Not a tunneld session: the user's own `sbatch` of a job whose program opens the
    browser (BROWSER set as `tunnelctl setup-remote` says); its request reaches the local
    browser through the spool in the shared home, routed to the job's node."""
    d, c = jd, slurm_cluster
    r = d.ctl("setup-remote", c.host, "--apply")
    assert "export BROWSER=$HOME/.tunneld/bin/open-on-local" in r.stdout, r.stdout
    d.ctl("add", c.host, "18999:localhost:1")   # the host is connected: its spool is read
    prog = script(tmp_path, SERVE)
    wrap = f"export BROWSER=$HOME/.tunneld/bin/open-on-local; exec {sys.executable} {prog} " \
           f"0 {tmp_path / 'never'} 0"
    r = c.ssh(f"sbatch --parsable --wrap {shlex.quote(wrap)}", check=True)
    job_id = r.stdout.strip()
    (url,) = wait_opened(opened, timeout=40)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/page", url), url
    assert urllib.request.urlopen(url, timeout=10).read().decode() == \
        "served on tdnode1 path /page"
    reqs = json.loads(d.ctl("opens", "--json").stdout)["requests"]
    assert [(q["source"], q["node"], q["outcome"]) for q in reqs] == \
        [("spool", "tdnode1", "opened")]
    c.run(["scancel", job_id], check=True)
