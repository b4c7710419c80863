"""Batch jobs' pure core: the shell text (run under sh and dash with a stand-in scheduler
command on PATH: the real Slurm runs in tests/e2e/test_e2e_jobs.py) and the parsers of the
schedulers' answers (Slurm's recorded on the test cluster; PBS's and LSF's written after
their manuals' examples)."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tunneld import jobpoll, jobs, remote
from tunneld.jobs import JobInfo

SHELLS = [s for s in ("sh", "dash") if shutil.which(s)]


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)


def _run(shell: str, text: str, home: Path, bin_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin", "SHELL": "/bin/sh"}
    return subprocess.run([shell, "-c", text], capture_output=True, text=True, env=env,
                          timeout=30)


@pytest.fixture
def cluster(tmp_path):
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    return home, bin_dir


@pytest.mark.parametrize("shell", SHELLS)
def test_a_submission_writes_the_script_and_reports_the_job(cluster, shell):
    home, bin_dir = cluster
    _fake(bin_dir, "sbatch", """
        printf '%s\\n' "$@" > "$HOME/args"; pwd > "$HOME/cwd"; echo "81723;cluster"
    """)
    script = jobs.job_script("lab-1-ab12", "echo hi", {"PYTHONUNBUFFERED": "1"}, False,
                             "slurm")
    text = jobs.submit_command("lab-1-ab12", "lab-1", "slurm", ["-p", "gpu", "--time=4:00:00"],
                               script)
    r = _run(shell, text, home, bin_dir)
    assert r.returncode == 0, r.stderr
    found = jobs.parse_job_line("slurm", r.stdout)
    d = home / remote.SESSIONS_DIR / "lab-1-ab12"
    assert found is not None and found.job_id == "81723" and found.dir == str(d)
    args = (home / "args").read_text().split("\n")
    assert args[:4] == ["--parsable", "--job-name=lab-1", f"--output={d}/log",
                        "--open-mode=append"]
    assert args[4:7] == ["-p", "gpu", "--time=4:00:00"] and args[7] == f"{d}/job.sh"
    assert (home / "cwd").read_text().strip() == str(home)   # jobs start in the home, as ssh
    assert (d / "job").read_text().strip() == "81723;cluster"
    assert (d / "job.sh").read_text() == script and (d / "log").read_bytes() == b""
    assert oct(d.stat().st_mode & 0o777) == "0o700"
    assert os.access(home / remote.HELPER_PATH, os.X_OK)   # the job's BROWSER helper
    # a lost answer: the probe says the same
    r = _run(shell, jobs.probe_submit_command("lab-1-ab12"), home, bin_dir)
    assert jobs.parse_job_line("slurm", r.stdout) == found


@pytest.mark.parametrize("shell", SHELLS)
def test_a_refused_submission_says_the_schedulers_words_and_leaves_nothing(cluster, shell):
    home, bin_dir = cluster
    _fake(bin_dir, "sbatch", """
        echo "sbatch: error: invalid partition specified: nosuch" >&2
        echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
        exit 1
    """)
    text = jobs.submit_command("x-1-00aa", "x-1", "slurm", ["-p", "nosuch"],
                               jobs.job_script("x-1-00aa", "true", {}, False, "slurm"))
    r = _run(shell, text, home, bin_dir)
    assert r.returncode == jobs.REFUSED
    assert r.stderr.splitlines() == [
        "sbatch: error: invalid partition specified: nosuch",
        "sbatch: error: Batch job submission failed: Invalid partition name specified"]
    assert not (home / remote.SESSIONS_DIR / "x-1-00aa").exists()
    assert jobs.parse_job_line("slurm", r.stdout) is None


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("scheduler", jobs.SCHEDULERS)
def test_the_job_script_records_where_it_runs_its_port_and_its_status(cluster, shell,
                                                                      scheduler):
    """Run as the scheduler would, on the node: the run file, the command's output in the
    log (PBS and LSF: appended by the script itself), $PORT chosen and substituted, BROWSER
    set to the helper, the exit status."""
    home, bin_dir = cluster
    sid = "anvi-1-cafe"
    d = home / remote.SESSIONS_DIR / sid
    d.mkdir(parents=True)
    (home / ".tunneld" / "bin").mkdir(parents=True)
    helper = home / remote.HELPER_PATH
    helper.write_text(remote.HELPER_SCRIPT)
    helper.chmod(0o700)
    command = remote.shell_text(["sh", "-c", 'echo "port=$1 env=$PORT b=$BROWSER"; exit 3',
                                 "x", "{port}"], {}, {"port": "PORT"})
    script = jobs.job_script(sid, command, {"A": "b c"}, True, scheduler)
    (d / "job.sh").write_text(script)
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "SHELL": "/bin/sh",
           "SLURM_JOB_ID": "77"}
    r = subprocess.run([shell, str(d / "job.sh")], capture_output=True, text=True, env=env,
                       timeout=30)
    assert r.returncode == 3
    out = r.stdout if scheduler == "slurm" else (d / "log").read_text()
    run = jobs.parse_run((d / "run").read_text())
    assert run is not None and run.port is not None and run.started is not None
    assert f"tunneld: job {'77' if scheduler == 'slurm' else ''}" in out
    assert f"port={run.port} env={run.port} b={helper}" in out
    assert (d / "status").read_text().strip() == "3"


def test_the_job_script_says_when_the_home_is_not_shared(tmp_path):
    script = jobs.job_script("lab-1-ab12", "true", {}, False, "slurm")
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                       env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=30)
    assert r.returncode == 125
    assert "is not visible on" in r.stderr and "shared with the compute nodes" in r.stderr


@pytest.mark.parametrize("text,scheduler,words", [
    ("-p gpu --time=4:00:00 --mem=16G", "slurm", ["-p", "gpu", "--time=4:00:00", "--mem=16G"]),
    ("", "slurm", []),
    ("-q long -l walltime=2:00:00", "pbs", ["-q", "long", "-l", "walltime=2:00:00"]),
    ("-q normal -W 120 -J lab", "lsf", ["-q", "normal", "-W", "120", "-J", "lab"]),
])
def test_job_options_are_split_as_a_shell_would(text, scheduler, words):
    assert jobs.job_options(text, scheduler) == words


@pytest.mark.parametrize("text,scheduler", [
    ("--output=x.out", "slurm"), ("-o x.out", "slurm"), ("-ox.out", "slurm"),
    ("--array=1-10", "slurm"), ("--wrap 'hostname'", "slurm"), ("-j oe", "pbs"),
    ("-oo out", "lsf"), ("-Is", "lsf"),
])
def test_job_options_tunneld_sets_are_refused_by_name(text, scheduler):
    with pytest.raises(ValueError, match="is tunneld's to set"):
        jobs.job_options(text, scheduler)


def test_unbalanced_quotes_in_job_options_are_named():
    with pytest.raises(ValueError, match="No closing quotation"):
        jobs.job_options("-p 'gpu", "slurm")


@pytest.mark.parametrize("scheduler,out,job_id", [
    ("slurm", "81723\n", "81723"), ("slurm", "81723;cluster2\n", "81723"),
    ("pbs", "81723.pbs01.cluster\n", "81723.pbs01.cluster"),
    ("lsf", "Job <81723> is submitted to default queue <normal>.\n", "81723"),
    ("slurm", "sbatch: error: x\n", None), ("lsf", "Request aborted by esub.\n", None),
])
def test_job_ids_as_each_submitter_prints_them(scheduler, out, job_id):
    assert jobs.parse_job_id(scheduler, out) == job_id


def test_the_detect_command_finds_the_first_scheduler(cluster):
    home, bin_dir = cluster

    def found() -> str:   # (only bin_dir on PATH: this machine may have a real sbatch)
        return subprocess.run(["/bin/sh", "-c", jobs.detect_command()], capture_output=True,
                              text=True, env={"PATH": str(bin_dir)}, timeout=10).stdout
    assert found() == ""
    _fake(bin_dir, "qsub", "exit 0\n")
    assert found() == "pbs\n"
    _fake(bin_dir, "sbatch", "exit 0\n")
    assert found() == "slurm\n"


# -- polls -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,seconds", [
    ("4:00:00", 14400), ("1-02:03:04", 93784), ("30:00", 1800), ("5", 300), ("2-00", 172800),
    ("0:30", 30), ("UNLIMITED", None), ("NOT_SET", None), ("INVALID", None),
])
def test_slurm_times(text, seconds):
    assert jobpoll.slurm_seconds(text) == seconds


def test_a_poll_of_slurm_jobs(cluster):
    """The poll text against a stand-in squeue printing what Slurm 22.05 printed on the test
    cluster, with the jobs' files."""
    home, bin_dir = cluster
    _fake(bin_dir, "squeue", """
        echo "$@" > "$HOME/args"
        echo '12|PENDING|Resources||1:00:00|1:00:00'
        echo '11|RUNNING|None|tdnode1|4:00:00|3:52:10'
        echo '10|TIMEOUT|TimeLimit|tdnode1|1:00|0:00'
    """)
    sids = {"10": "a-1-0001", "11": "b-1-0002", "12": "c-1-0003", "13": "d-1-0004"}
    for job_id, sid in sids.items():
        (home / remote.SESSIONS_DIR / sid).mkdir(parents=True)
    (home / remote.SESSIONS_DIR / "b-1-0002" / "run").write_text("tdnode1\t20001\t1700000000\n")
    (home / remote.SESSIONS_DIR / "d-1-0004" / "status").write_text("0\n")
    r = _run("sh", jobpoll.poll_command("slurm", sids), home, bin_dir)
    assert r.returncode == 0, r.stderr
    a = jobpoll.parse_poll("slurm", r.stdout)
    assert a.conclusive
    assert a.queue == {
        "12": JobInfo("pending", "Resources", "", 3600, None),
        "11": JobInfo("running", "", "tdnode1", 14400, 13930),
        "10": JobInfo("timeout", "TimeLimit", "tdnode1", 60, None),
    }
    assert a.runs == {"11": jobs.Run("tdnode1", 20001, 1700000000.0)} and a.statuses == {"13": 0}
    assert "-j 10,11,12,13" in (home / "args").read_text()


@pytest.mark.parametrize("said,code,conclusive", [
    ("slurm_load_jobs error: Invalid job id specified", 1, True),
    ("slurm_load_jobs error: Unable to contact slurm controller (connect failure)", 1, False),
    ("", 0, True),
])
def test_a_failed_queue_query_says_nothing_of_the_jobs(cluster, said, code, conclusive):
    home, bin_dir = cluster
    _fake(bin_dir, "squeue", f"echo '{said}' >&2; exit {code}\n")
    r = _run("sh", jobpoll.poll_command("slurm", {"10": "a-1-0001"}), home, bin_dir)
    a = jobpoll.parse_poll("slurm", r.stdout)
    assert a.conclusive is conclusive and a.queue == {}
    assert a.said == ("" if conclusive else said)


def test_sacct_lines():
    text = "10|COMPLETED|0:0|tdnode1|01:00:00|None\n11|FAILED|3:0|tdnode[1-2]|UNLIMITED|None\n" \
           "12|CANCELLED by 0|0:15|None assigned|00:10:00|None\n"
    assert jobpoll.parse_sacct(text) == {
        "10": JobInfo("completed", "", "tdnode1", 3600, None, 0),
        "11": JobInfo("failed", "", "tdnode1", None, None, 3),
        "12": JobInfo("cancelled", "", "", 600, None, 0),
    }


QSTAT = """Job Id: 81723.pbs01
    Job_Name = lab-1
    job_state = R
    exec_host = gpu012/0*4+gpu013/0*4
    Resource_List.walltime = 04:00:00
    resources_used.walltime = 00:07:50
    comment = Job run at Wed Dec 02 at 09:00 on (gpu012:ncpus=4)+(gpu013:ncpus=4)

Job Id: 81724.pbs01
    job_state = Q
    Resource_List.walltime = 01:00:00
    comment = Not Running: Insufficient amount of resource: ngpus (R: 1 A: 0 T:
\t 8)

Job Id: 81725.pbs01
    job_state = F
    exec_host = cpu001/0
    Exit_status = -29
    Resource_List.walltime = 00:10:00

Job Id: 81726.pbs01
    job_state = F
    Exit_status = 3

Job Id: 81727.pbs01
    job_state = F
    Exit_status = 271
"""


def test_qstat_blocks():
    q = jobpoll.parse_qstat(QSTAT)
    assert q["81723.pbs01"] == JobInfo("running", "", "gpu012", 14400, 14400 - 470)
    assert q["81724.pbs01"].state == "pending"
    assert q["81724.pbs01"].reason == ("Not Running: Insufficient amount of resource: ngpus "
                                       "(R: 1 A: 0 T: 8)")
    assert q["81725.pbs01"].state == "timeout"
    assert q["81726.pbs01"] == JobInfo("failed", "", "", None, None, 3)
    assert q["81727.pbs01"].state == "cancelled"


BJOBS = """81723|RUN|4*gpu012:4*gpu013|-|240.0/gpu012|3:52 L|-|-
81724|PEND|-|Job's resource requirements not satisfied;|60.0|-|-|-
81725|EXIT|cpu001|-|10.0|-|140|TERM_RUNLIMIT: job killed after reaching LSF run time limit
81726|EXIT|cpu001|-|-|-|3|-
81727|DONE|cpu001|-|-|-|-|-
81728|EXIT|cpu001|-|-|-|130|TERM_OWNER: job killed by owner
"""


def test_bjobs_lines():
    q = jobpoll.parse_bjobs(BJOBS)
    assert q["81723"] == JobInfo("running", "", "gpu012", 14400, 13920)
    assert q["81724"] == JobInfo("pending", "Job's resource requirements not satisfied", "",
                                 3600, None)
    assert q["81725"].state == "timeout"
    assert q["81726"] == JobInfo("failed", "", "cpu001", None, None, 3)
    assert q["81727"].state == "completed" and q["81727"].exit_code == 0
    assert q["81728"].state == "cancelled"


@pytest.mark.parametrize("scheduler,text", [
    ("slurm", "scancel 81723"), ("pbs", "qdel 81723.pbs01"), ("lsf", "bkill 81723"),
])
def test_cancel_commands(scheduler, text):
    assert jobs.cancel_command(scheduler, text.split()[1]) == text


def test_job_ids_are_checked_before_they_reach_a_shell():
    with pytest.raises(ValueError):
        jobs.cancel_command("slurm", "1; rm -rf ~")
    with pytest.raises(ValueError):
        jobpoll.poll_command("slurm", {"1 2": "a-1-0001"})


def test_a_job_record_is_checked_when_taken_up():
    job = jobs.checked_record({"id": "81723", "scheduler": "slurm", "node": "gpu012",
                               "port": 8888, "notified": ["running", "bogus"],
                               "state": "running", "ends": 1.5e9, "time_limit": True})
    assert job["node"] == "gpu012" and job["port"] == 8888 and job["notified"] == ["running"]
    assert job["time_limit"] is None and job["ends"] == 1.5e9 and job["state"] == "running"
    assert jobs.checked_record({"node": "a;b", "state": "weird"})["node"] is None
    for bad in ({"id": "1; rm -rf ~", "scheduler": "slurm"}, {"id": "1", "scheduler": "x"},
                ["not", "a", "dict"]):
        with pytest.raises(ValueError):
            jobs.checked_record(bad)


@pytest.mark.parametrize("line,state,reason", [
    ("9|POWER_UP_NODE|None||10:00|10:00", "pending", "power up node"),
    ("9|LAUNCH_FAILED|None|tdnode1|10:00|10:00", "running", "launch failed"),
])
def test_a_slurm_state_this_table_does_not_know_is_never_an_end(line, state, reason):
    (info,) = jobpoll.parse_squeue(line).values()
    assert (info.state, info.reason) == (state, reason)


def test_options_that_block_or_interact_are_refused_for_each_scheduler():
    for words, sched in ((["-K"], "lsf"), (["-Is", "bash"], "lsf"), (["-I"], "pbs"),
                         (["-W", "block=true"], "pbs"), (["-j", "oe"], "pbs")):
        with pytest.raises(ValueError, match="is tunneld's to set"):
            jobs.check_options(words, sched)
    jobs.check_options(["-W", "depend=afterok:12"], "pbs")


def test_qstat_exit_codes_name_the_limit():
    text = ("Job Id: 1.s\n    job_state = F\n    Exit_status = -27\n"
            "Job Id: 2.s\n    job_state = C\n    Exit_status = 271\n"
            "    comment = Job exceeded its walltime limit and was killed\n")
    q = jobpoll.parse_qstat(text)
    assert q["1.s"].state == "out of memory" and q["2.s"].state == "timeout"


@pytest.mark.parametrize("shell", SHELLS)
def test_the_job_gets_the_users_umask_and_a_lost_answer_is_told_from_none(cluster, shell):
    home, bin_dir = cluster
    _fake(bin_dir, "sbatch", 'umask > "$HOME/umask"; echo 5\n')
    text = jobs.submit_command("u-1-0000", "u-1", "slurm", [],
                               jobs.job_script("u-1-0000", "true", {}, False, "slurm"))
    r = _run(shell, "umask 022\n" + text, home, bin_dir)
    assert r.returncode == 0 and (home / "umask").read_text().strip() in ("0022", "022")
    d = home / remote.SESSIONS_DIR / "u-1-0000"
    assert not (d / "submitting").exists()
    # a submitter still running (its pid alive): the probe says so; a dead one: nothing
    (d / "job").unlink()
    (d / "submitting").write_text(f"{os.getpid()}\n")
    r = _run(shell, jobs.probe_submit_command("u-1-0000"), home, bin_dir)
    assert jobs.SUBMITTING_TAG in r.stdout
    (d / "submitting").write_text("999999999\n")
    r = _run(shell, jobs.probe_submit_command("u-1-0000"), home, bin_dir)
    assert r.stdout == "" and r.returncode == 0


@pytest.mark.timeout(30)
def test_a_follower_nobody_reads_ends_itself(cluster, monkeypatch):
    """Its parent may live on (or be a zombie init never reaps): once its stderr is closed,
    the next heartbeat ends the follower and its tail."""
    home, bin_dir = cluster
    monkeypatch.setattr(jobs, "HEARTBEAT", 1)
    (home / remote.SESSIONS_DIR / "f-1-0000").mkdir(parents=True)
    (home / remote.SESSIONS_DIR / "f-1-0000" / "log").write_text("x\n")
    proc = subprocess.Popen(["sh", "-c", jobs.follow_command("f-1-0000", 0)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={"HOME": str(home), "PATH": "/usr/bin:/bin"})
    assert proc.stderr is not None
    proc.stderr.readline()   # it runs (a heartbeat came)
    log = str(home / remote.SESSIONS_DIR / "f-1-0000" / "log")
    assert _tails_of(log), "the follower's tail is not running"
    proc.stderr.close()
    assert proc.wait(timeout=20) is not None
    deadline = time.monotonic() + 10
    while _tails_of(log) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _tails_of(log), "the follower ended, its tail lives on"


def _tails_of(path: str) -> list[int]:
    """pids of the processes running ``tail`` on ``path``."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"tail") and path.encode() in argv:
            found.append(int(d.name))
    return found
