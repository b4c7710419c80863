"""Record what Slurm's commands print on the fixture's cluster (tests/e2e/slurm.py), for the
parsers of batch-job sessions: exact stdout, stderr and exit status, run over ssh on the login
node as tunneld runs them.  Not a test (takes ~2 minutes: it waits for jobs to hit their time
limit).  Run as root:

    .venv/bin/python tests/e2e/record_slurm_outputs.py /work/notes/slurm-outputs.md
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conftest  # noqa: E402, F401  (slurm imports from it)
from slurm import SlurmCluster, slurm_cluster_ctx  # noqa: E402

FMT = "%i|%T|%r|%N|%l|%L|%S|%e"
OFMT = ("JobID:|,State:|,Reason:|,NodeList:|,TimeLimit:|,TimeLeft:|,StartTime:|,EndTime:|,"
        "ExitCode:|")
# what 22.05 does know (man squeue): exit_code ("status:signal") and DerivedEC
OFMT_EXIT = "JobID:|,State:|,exit_code:|,DerivedEC:|"
SACCT = "sacct -n -P -X -j {} -o JobID,State,ExitCode,NodeList,Start,End,Timelimit"


SUMMARY = """\
# Slurm 22.05 outputs on the test cluster (tests/e2e/slurm.py)

## What a parser has to know (from the records below)

- `sbatch --parsable`: the job id alone on stdout (`3\\n`; no `;cluster` part without
  federation), exit 0, stderr empty. Refusals: exit 1 with `sbatch: error: ...` lines on
  stderr (bad partition: two lines, the second `sbatch: error: Batch job submission failed:
  Invalid partition name specified`); a bad option exits **255**
  (`sbatch: unrecognized option '--bogus-option'` + `Try "sbatch --help" for more
  information`). Over a partition's MaxTime: refused only with EnforcePartLimits=ALL/ANY
  (the fixture's); with Slurm's default NO the job is accepted and pends for ever with
  reason `PartitionTimeLimit` (last section).
- `squeue -h -t all -j IDS -o '%i|%T|%r|%N|%l|%L|%S|%e'`: one line per known job, in
  squeue's own order (neither the order asked nor by id: match lines by their id).
  Unknown ids among known ones are left out silently (exit 0). **Only unknown ids: a
  single id -> exit 1, `slurm_load_jobs error: Invalid job id specified` on stderr; two or
  more unknown ids -> exit 0, nothing printed.** Pending: NodeList empty,
  StartTime/EndTime `N/A`; running: EndTime `NONE` when unlimited, else the expected end;
  `%l`/`%L` are `UNLIMITED` or `M:SS`/`H:MM:SS`/`D-HH:MM:SS`, `%L` of an ended job with a
  limit is `INVALID`. States: PENDING, RUNNING, COMPLETED, FAILED (reason
  `NonZeroExitCode`), CANCELLED (reason `None`), TIMEOUT (reason `TimeLimit`). The `-o`
  letters have no exit code (see `-O exit_code` below).
- `squeue -O ...ExitCode:|`: `ExitCode` is not a 22.05 field: stderr `squeue: error:
  Invalid job format specification: ExitCode`, exit status still 0, and the lines end in
  an empty field (`...|2026-...||`). The 22.05 name is `exit_code`: the raw wait status
  (`0` completed, `768` = exit 3 << 8, `15` = killed by SIGTERM: cancelled and timed-out
  jobs; `0` pending/running); `DerivedEC` is `0` for all of these batch jobs.
- A pending job's reason can change between polls: over a partition limit it was
  `PartitionConfig` first and `PartitionTimeLimit` a second later.
- `scontrol show job ID`: `Key=Value` words, several per line, 3-space indented, a blank
  line (3 spaces) at the end; `-o`: all on one line, ending with `Power= `. ExitCode is
  `status:signal`: `0:0` completed, `3:0` failed with exit 3, `0:15` cancelled and timed
  out. EndTime=`Unknown` while pending/running without limit. Unknown id: exit 1,
  `slurm_load_jobs error: Invalid job id specified` (stderr).
- `scancel ID` prints nothing and exits 0 for a running job, an ended job and an unknown
  id alike.
- `sacct`: `Slurm accounting storage is disabled` on stderr, exit 1.
- A job's stdout and stderr both go to `slurm-<id>.out` in the submit directory. A time
  limit adds `slurmstepd-<node>: error: *** JOB <id> ON <node> CANCELLED AT <ISO time> DUE
  TO TIME LIMIT ***` to it (stderr side); `scancel` of a running job adds `slurmstepd-<node>:
  error: *** JOB <id> ON <node> CANCELLED AT <ISO time> ***`.
- Environment of a batch job (--export=ALL): the submitter's environment (HOME,
  SLURM_CONF, PATH, SSH_CLIENT..., exported variables; not unexported shell variables)
  plus SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURMD_NODENAME, SLURM_SUBMIT_DIR, ...;
  `ENVIRONMENT=BATCH`; PWD = the submit directory.
- Time limits are enforced every 30 s: a `--time=1` job runs 60-90 s.
"""


class Recorder:
    def __init__(self, cluster: SlurmCluster) -> None:
        self.c = cluster
        self.out: list[str] = []

    def text(self, *lines: str) -> None:
        self.out.extend(lines)
        self.out.append("")

    def cmd(self, title: str, command: str) -> tuple[int, str, str]:
        r = self.c.ssh(command, timeout=60)
        self.out += [f"### {title}", "", "```", f"$ {command}", "```",
                     f"exit status: **{r.returncode}**", ""]
        for name, value in (("stdout", r.stdout), ("stderr", r.stderr)):
            if value:
                self.out += [f"{name}:", "", "```", value.rstrip("\n"), "```", ""]
                if not value.endswith("\n"):
                    self.out += [f"({name} has no final newline)", ""]
            else:
                self.out += [f"{name}: (empty)", ""]
        return r.returncode, r.stdout, r.stderr

    def file(self, title: str, path: Path) -> None:
        self.out += [f"### {title}", "", f"`{path}`:", "", "```",
                     path.read_text().rstrip("\n"), "```", ""]


def sbatch(c: SlurmCluster, options: str) -> str:
    r = c.ssh(f"sbatch --parsable {options}", check=True)
    return r.stdout.strip()


def wait_state(c: SlurmCluster, job: str, *states: str, timeout: float = 150) -> float:
    """Poll (0.2 s) until the job is in one of ``states``; return time.monotonic() then."""
    c.wait_job(job, *states, timeout=timeout)
    return time.monotonic()


def main(dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="td-record-") as base, \
            slurm_cluster_ctx(Path(base), nodes=2) as c:
        rec = Recorder(c)
        home = c.login.server_home
        rec.text("## How this was recorded", "",
                 f"Recorded by `tests/e2e/record_slurm_outputs.py` on {time.strftime('%F')}, "
                 "slurm-wlm " + c.run(["sinfo", "-V"]).stdout.strip().split()[-1] + " "
                 "(Debian bookworm). Every command ran over ssh on the login node "
                 "(`ssh -F ... cluster 'COMMAND'`, HOME and SLURM_CONF from sshd's SetEnv), "
                 "as tunneld runs them. Two nodes: tdnode1 (partition `debug`, default), "
                 "tdnode2 (`debug` and `gpu`, `gpu` has MaxTime=5). Times are the VM's "
                 "local time (UTC). Job ids are this run's.", "",
                 "slurm.conf:", "", "```", c.conf.read_text().rstrip(), "```")

        # jobs that hit their time limit: started first, they take 60-90 s
        t_submit = {}
        timeout_jobs = []
        for opts in ("-w tdnode2 --time=1", "-w tdnode2 --time=0:10"):
            j = sbatch(c, f"{opts} --wrap 'echo started; sleep 300'")
            timeout_jobs.append((j, opts))
        for j, _ in timeout_jobs:
            t_submit[j] = wait_state(c, j, "RUNNING")

        rec.text("## sbatch")
        _, out, _ = rec.cmd("success", "sbatch --parsable --wrap 'hostname; sleep 1'")
        done = out.strip()
        rec.cmd("bad partition", "sbatch --parsable -p nosuch --wrap 'hostname'")
        rec.cmd("--time over the partition's MaxTime (gpu: MaxTime=5; EnforcePartLimits=ALL)",
                "sbatch --parsable -p gpu --time=6 --wrap 'hostname'")
        rec.cmd("bad option", "sbatch --parsable --bogus-option --wrap 'hostname'")
        rec.cmd("no command (neither script nor --wrap), stdin not a terminal",
                "sbatch --parsable < /dev/null")

        failed = sbatch(c, "--wrap 'echo failing; echo to-stderr >&2; exit 3'")
        env_job = sbatch(c, "--wrap 'env | sort'")
        # the environment: an exported variable and a shell one
        env_job2 = c.ssh("export TD_EXPORTED=from-the-submitting-shell; "
                         "TD_NOT_EXPORTED=shell-only; "
                         "sbatch --parsable --wrap 'env | sort'", check=True).stdout.strip()
        for j in (done, failed, env_job, env_job2):
            wait_state(c, j, "COMPLETED", "FAILED", timeout=30)

        # pending behind an exclusive job, then cancelled while running
        excl = sbatch(c, "-w tdnode1 --exclusive --wrap 'sleep 300'")
        wait_state(c, excl, "RUNNING")
        pend = sbatch(c, "-w tdnode1 --time=10 --wrap 'sleep 300'")
        deadline = time.monotonic() + 15
        while c.job(pend).get("Reason") in (None, "None") and time.monotonic() < deadline:
            time.sleep(0.2)

        rec.text("## squeue", "",
                 f"Jobs: {done} completed, {failed} failed (exit 3), {excl} running "
                 f"(--exclusive), {pend} pending behind it, {timeout_jobs[0][0]} and "
                 f"{timeout_jobs[1][0]} running (they time out later).")
        rec.cmd("pending and running", f"squeue -h -t all -j {excl},{pend} -o '{FMT}'")
        rec.cmd("pending and running, default format (no -h, no -o)",
                f"squeue -t all -j {excl},{pend}")
        rec.cmd("completed and failed", f"squeue -h -t all -j {done},{failed} -o '{FMT}'")
        rec.cmd("an unknown id among known ones",
                f"squeue -h -t all -j {done},99999,{failed} -o '{FMT}'")
        rec.cmd("only unknown ids", f"squeue -h -t all -j 99998,99999 -o '{FMT}'")
        rec.cmd("one unknown id", f"squeue -h -t all -j 99999 -o '{FMT}'")
        rec.cmd("without -t all (ended jobs are left out)",
                f"squeue -h -j {done},{excl} -o '{FMT}'")
        rec.cmd("-O with ExitCode (pending, running, completed, failed)",
                f"squeue -h -t all -j {pend},{excl},{done},{failed} -O '{OFMT}'")

        rec.cmd("scontrol show job of the pending job", f"scontrol show job {pend}")
        rec.cmd("scontrol show job -o of the pending job", f"scontrol show job -o {pend}")
        rec.cmd("scontrol show job -o of the running job", f"scontrol show job -o {excl}")

        rec.text("## scancel")
        rec.cmd("a running job", f"scancel {excl}")
        wait_state(c, excl, "CANCELLED")
        wait_state(c, pend, "RUNNING")
        rec.cmd("an ended job (completed)", f"scancel {done}")
        rec.cmd("an ended job (cancelled)", f"scancel {excl}")
        rec.cmd("an unknown id", "scancel 99999")
        rec.cmd("after the cancel, the job that was pending runs",
                f"squeue -h -t all -j {excl},{pend} -o '{FMT}'")
        c.ssh(f"scancel {pend}", check=True)
        wait_state(c, pend, "CANCELLED")
        rec.cmd("cancelled jobs", f"squeue -h -t all -j {excl},{pend} -o '{FMT}'")

        rec.text("## scontrol show job")
        for j, what in ((done, "completed"), (failed, "failed, exit 3"),
                        (excl, "cancelled while running")):
            rec.cmd(f"{what}", f"scontrol show job {j}")
            rec.cmd(f"{what}, one line (-o)", f"scontrol show job -o {j}")
        rec.cmd("unknown id", "scontrol show job 99999")

        rec.text("## sacct (accounting_storage/none)")
        rec.cmd("a completed job", SACCT.format(done))

        rec.text("## the job's environment and output files")
        rec.file(f"`env | sort` in job {env_job} (submitted with nothing exported)",
                 home / f"slurm-{env_job}.out")
        rec.file(f"`env | sort` in job {env_job2} (submitted after `export "
                 "TD_EXPORTED=from-the-submitting-shell; TD_NOT_EXPORTED=shell-only`)",
                 home / f"slurm-{env_job2}.out")
        rec.file(f"failed job {failed} (stdout and stderr both go to slurm-ID.out)",
                 home / f"slurm-{failed}.out")

        # a third --time=1 job, started at another moment relative to slurmctld's 30 s check
        t3 = sbatch(c, "-w tdnode1 --time=1 --wrap 'echo started; sleep 300'")
        t_submit[t3] = wait_state(c, t3, "RUNNING")
        timeout_jobs.append((t3, "-w tdnode1 --time=1"))

        rec.text("## time limits", "",
                 "slurmctld checks time limits every 30 s (PERIODIC_TIMEOUT, fixed at compile "
                 "time): a job is ended at the first check after its limit. Measured here "
                 "(RUNNING seen -> TIMEOUT seen, polled every 0.2 s; and EndTime-StartTime):", "")
        seen: dict[str, float] = {}
        while len(seen) < len(timeout_jobs):
            for j, _ in timeout_jobs:
                if j not in seen and c.job(j).get("JobState") == "TIMEOUT":
                    seen[j] = time.monotonic()
            if time.monotonic() - min(t_submit.values()) > 200:
                raise RuntimeError("the timeout jobs did not time out in 200 s")
            time.sleep(0.2)
        rows = ["| job | options | TimeLimit | RUNNING -> TIMEOUT | StartTime | EndTime |",
                "|---|---|---|---|---|---|"]
        for j, opts in timeout_jobs:
            info = c.job(j)
            rows.append(f"| {j} | `{opts}` | {info['TimeLimit']} | "
                        f"{seen[j] - t_submit[j]:.1f} s | {info['StartTime']} | "
                        f"{info['EndTime']} |")
        rec.text(*rows)
        first = timeout_jobs[0][0]
        rec.cmd("a timed-out job", f"squeue -h -t all -j {first} -o '{FMT}'")
        rec.cmd("a timed-out job, -O with ExitCode", f"squeue -h -t all -j {first} -O '{OFMT}'")
        rec.cmd("a timed-out job", f"scontrol show job {first}")
        rec.cmd("a timed-out job, one line", f"scontrol show job -o {first}")
        rec.cmd("scancel of a timed-out job", f"scancel {first}")
        time.sleep(3)  # KillWait=2: let slurmstepd write everything (just for the record)
        for j, _ in timeout_jobs:
            rec.file(f"output of timed-out job {j}", home / f"slurm-{j}.out")
        rec.cmd("all jobs of this run", f"squeue -h -t all -o '{FMT}'")
        all_ids = ",".join([done, failed, excl, pend, *(j for j, _ in timeout_jobs)])
        rec.cmd("-O with exit_code and DerivedEC (the names 22.05 knows), every kind of job",
                f"squeue -h -t all -j {all_ids} -O '{OFMT_EXIT}'")
        rec.cmd("-O with exit_code, a pending and a running job",
                "sbatch --parsable -w tdnode1 --exclusive --wrap 'sleep 30' >/dev/null; "
                "sbatch --parsable -w tdnode1 --wrap 'sleep 30' >/dev/null; sleep 2; "
                f"squeue -h -t pending,running -O '{OFMT_EXIT}'")
        rec.file(f"output of job {excl}, cancelled while running", home / f"slurm-{excl}.out")
        rec.out[:0] = [*SUMMARY.splitlines(), ""]
    # with Slurm's default EnforcePartLimits=NO, a job over a partition's limit is queued
    with tempfile.TemporaryDirectory(prefix="td-record-") as base, \
            slurm_cluster_ctx(Path(base), extra_conf={"EnforcePartLimits": "NO"}) as c:
        rec.c = c
        rec.text("## EnforcePartLimits=NO (Slurm's default; the fixture sets ALL)")
        _, out, _ = rec.cmd("--time over the gpu partition's MaxTime=5",
                            "sbatch --parsable -p gpu --time=6 --wrap 'hostname'")
        job = out.strip()
        deadline = time.monotonic() + 15
        while c.job(job).get("Reason") in (None, "None") and time.monotonic() < deadline:
            time.sleep(0.2)
        t0 = time.monotonic()
        _, first, _ = rec.cmd("it stays pending", f"squeue -h -t all -j {job} -o '{FMT}'")
        deadline = time.monotonic() + 60
        while c.job(job).get("Reason") == first.split("|")[2] and time.monotonic() < deadline:
            time.sleep(0.5)
        rec.cmd(f"the same job {time.monotonic() - t0:.0f} s later (the reason changed, or "
                "60 s passed)", f"squeue -h -t all -j {job} -o '{FMT}'")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(rec.out) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/work/notes/slurm-outputs.md"))
