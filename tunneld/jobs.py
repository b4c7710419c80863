"""Batch jobs (``run --job``): the shell text that submits, watches and cancels them, and the
parsers of what the schedulers answer.  Pure.

A job session lives in a session directory on the server like a detached session
(``remote.SESSIONS_DIR``/ID, 0700; homes are shared between login and compute nodes, so the
job on its node writes there too):

  job.sh   the job script tunneld wrote: it records where it runs (``run``), runs the command
           with the session's environment, records its exit status (``status``)
  log      the job's output, appended to (stdout and stderr), followed by the daemon
  job      the job id the scheduler gave
  run      NODE TAB PORT TAB EPOCH: written by the job when it starts on its node (PORT is
           the port chosen there for ``--port auto``, else empty)
  status   the command's exit status, when it ended by itself (absent when the scheduler
           ended it: time limit, cancel, node failure)

Schedulers: Slurm (``sbatch``/``squeue``/``sacct``/``scancel``), PBS and Torque (``qsub``/
``qstat``/``qdel``), LSF (``bsub``/``bjobs``/``bkill``).  ``JobInfo`` is what one poll says
of one job, in one vocabulary for all three (``JOB_STATES``).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

from . import remote
from .names import SCHEDULERS
from .remote import _BROWSER_HELPER, _HOSTNAME, _dir, _exports

#: the command that tells a scheduler is there (in this order: a Slurm site may have PBS
#: wrappers named qsub, an LSF site rarely anything else)
_SUBMITTERS = {"slurm": "sbatch", "lsf": "bsub", "pbs": "qsub"}
_CANCEL = {"slurm": "scancel", "pbs": "qdel", "lsf": "bkill"}

#: the line the submit command prints: this tag, job id TAB server host name TAB session dir
JOB_TAG = "\x1etunneld-job:"
#: lines of the poll command's answer about a session directory's files
RUN_TAG = "\x1etunneld-run:"
STATUS_TAG = "\x1etunneld-status:"
#: the follower's heartbeat line on stderr, every ``HEARTBEAT`` of its loops (ignored)
ALIVE_TAG = "\x1etunneld-alive"
HEARTBEAT = 20
#: the line that separates the scheduler's answer from the files in the poll's answer
FILES_TAG = "\x1etunneld-files"
#: the line a probe prints while the submission it asks about is still under way
SUBMITTING_TAG = "\x1etunneld-submitting"
#: exit status of the submit command when the scheduler refused the job (its message on
#: stderr) or the session directory could not be made
REFUSED = 124
#: a job id as schedulers give them (Slurm 81723, PBS 81723.server, LSF 81723)
JOB_ID_RE = re.compile(r"^[0-9]+(?:\.[A-Za-z0-9_.-]+)?\Z")
#: the ports a job's ``--port auto`` is chosen from on its node
NODE_PORT_RANGE = (20000, 60000)

#: a job's state, in one vocabulary: (still in the queue or running) or ended
JOB_LIVE = ("pending", "running", "suspended")
JOB_ENDED = ("completed", "failed", "timeout", "cancelled", "node failure", "out of memory",
             "preempted", "ended", "not submitted")
JOB_STATES = JOB_LIVE + JOB_ENDED

_SLURM_STATES = {
    "PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "pending",
    "REQUEUE_HOLD": "pending", "REQUEUE_FED": "pending", "RESV_DEL_HOLD": "pending",
    "RUNNING": "running", "COMPLETING": "running", "SIGNALING": "running",
    "STAGE_OUT": "running", "RESIZING": "running",
    "SUSPENDED": "suspended", "STOPPED": "suspended",
    "COMPLETED": "completed", "FAILED": "failed", "BOOT_FAIL": "failed",
    "SPECIAL_EXIT": "failed", "DEADLINE": "timeout", "TIMEOUT": "timeout",
    "CANCELLED": "cancelled", "REVOKED": "cancelled", "NODE_FAIL": "node failure",
    "OUT_OF_MEMORY": "out of memory", "PREEMPTED": "preempted",
}


@dataclass(frozen=True)
class JobInfo:
    """One job as a poll saw it."""

    state: str
    #: why it waits (Slurm's reason, PBS's comment, LSF's pending reason), or why it ended
    reason: str = ""
    node: str = ""
    #: seconds; None when unlimited or not known
    time_limit: int | None = None
    #: seconds left (a running job), as the scheduler counted them at the poll
    time_left: int | None = None
    exit_code: int | None = None


# -- the job script and its submission --------------------------------------------------------

#: the options a job may not be given: tunneld chooses the output file and submits one job
_NOT_ALLOWED = {
    "slurm": ("-o", "--output", "-e", "--error", "--open-mode", "--parsable", "--wrap",
              "-a", "--array", "-W", "--wait"),
    "pbs": ("-o", "-e", "-j", "-k", "-J", "-t", "-I"),
    "lsf": ("-o", "-oo", "-e", "-eo", "-K", "-I", "-Ip", "-Is"),
}


def job_options(text: str, scheduler: str) -> list[str]:
    """``--job``'s text as the scheduler's arguments (split as a shell would); raises
    ValueError naming an option tunneld must set itself (``check_options``)."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"--job {text!r}: {exc} (quote it as one argument, e.g. "
                         f"--job '-p gpu --time=4:00:00')") from None
    check_options(words, scheduler)
    return words


def check_options(words: list[str], scheduler: str) -> None:
    """Raise ValueError for an option of ``words`` that tunneld sets itself, or that makes
    the submitter wait for the job (interactive or blocking submissions)."""
    banned = _NOT_ALLOWED[scheduler]
    for i, w in enumerate(words):
        opt = w.split("=", 1)[0]
        attached = scheduler == "slurm" and re.fullmatch(r"-[oeaW].+", w)
        block = scheduler == "pbs" and (opt == "-W" and "block" in
                                        (w + " " + (words[i + 1] if i + 1 < len(words) else "")))
        if opt in banned or attached or block:
            name = w[:2] if attached else "-W block" if block else opt
            raise ValueError(f"--job: {name} is tunneld's to set (it submits one job, writes its "
                             "output to the session's log and follows it there); leave it out")


def _port_auto() -> list[str]:
    lo, hi = NODE_PORT_RANGE
    return [
        # a port nothing listens on, on the node: Python asks the kernel; without Python a
        # random one of the range
        "PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind((\"\", 0)); "
        "print(s.getsockname()[1])' 2>/dev/null)",
        'if [ -z "$PORT" ]; then',
        f"  PORT=$(awk 'BEGIN {{ srand(); print int({lo} + rand() * {hi - lo}) }}')",
        "fi",
        "export PORT",
    ]


def job_script(session_id: str, command: str, env: dict[str, str] | None,
               port_auto: bool, scheduler: str) -> str:
    """The job script for ``command`` (shell text; with ``port_auto`` its ``$PORT`` is chosen
    on the node when the job starts)."""
    lines = [
        "#!/bin/sh",
        f"# written by tunneld: session {session_id}'s batch job",
        _dir(session_id),
        'um=$(umask)',
        'umask 077',
        'if [ ! -d "$dir" ]; then',
        '  echo "tunneld: $dir is not visible on $(hostname): the job cannot report back '
        '(is the home directory shared with the compute nodes?)" >&2; exit 125',
        'fi',
    ]
    if scheduler != "slurm":   # Slurm appends to the log itself (--output, --open-mode)
        lines.append('exec >>"$dir/log" 2>&1')
    lines += _port_auto() if port_auto else []
    lines += [
        f'h="{_HOSTNAME}"',
        "printf '%s\\t%s\\t%s\\n' \"$h\" \"${PORT:-}\" \"$(date +%s)\" > \"$dir/run.tmp\" "
        '&& mv -f "$dir/run.tmp" "$dir/run"',
        'echo "tunneld: job ${SLURM_JOB_ID:-${PBS_JOBID:-$LSB_JOBID}} runs on $h'
        '${PORT:+, port $PORT}"',
        'base="$HOME"/.tunneld',
        *_BROWSER_HELPER,
        *_exports(env),
        'umask "$um"',
        f"cmd={shlex.quote(command)}",
        '"${SHELL:-/bin/sh}" -c "$cmd" </dev/null',
        "st=$?",
        "umask 077",
        "printf '%s\\n' \"$st\" > \"$dir/status.tmp\" && mv -f \"$dir/status.tmp\" "
        '"$dir/status"',
        "exit $st",
    ]
    return "\n".join(lines) + "\n"


def detect_command() -> str:
    """Text that prints the scheduler the server has (``SCHEDULERS``), or nothing."""
    tests = [f"command -v {cmd} >/dev/null 2>&1 && {{ echo {name}; exit 0; }}"
             for name, cmd in _SUBMITTERS.items()]
    return "\n".join([*tests, "exit 0"])


def _submit_argv(scheduler: str, name: str) -> str:
    if scheduler == "slurm":
        return (f'sbatch --parsable --job-name={shlex.quote(name)} --output="$dir/log" '
                '--open-mode=append')
    if scheduler == "pbs":
        return f'qsub -N {shlex.quote(name[:15])} -j oe -o "$dir/sched.out"'
    return f'bsub -J {shlex.quote(name)} -o "$dir/sched.out"'


def submit_command(session_id: str, name: str, scheduler: str, options: list[str],
                   script: str) -> str:
    """Text that makes the session directory, writes the job script there and submits it
    with ``options`` from the home directory; prints one ``JOB_TAG`` line (see
    ``parse_job_line``), or the scheduler's message on stderr and exits ``REFUSED``."""
    opts = " ".join(shlex.quote(o) for o in options)
    # LSF reads the script from stdin (bsub < script); the others take its path
    script_arg = '< "$dir/job.sh"' if scheduler == "lsf" else '"$dir/job.sh"'
    return "\n".join([
        "um=$(umask)",   # the job gets the user's umask (schedulers pass the submitter's on)
        "umask 077",
        'base="$HOME"/.tunneld',
        _dir(session_id),
        'mkdir -p "$base/bin" "$base/sessions" && chmod 700 "$base" "$base/bin" '
        '"$base/sessions" && mkdir "$dir" || { echo "cannot create $dir" >&2; '
        f'exit {REFUSED}; }}',
        'echo $$ > "$dir/submitting"',   # (a probe after a lost answer: still submitting?)
        *_BROWSER_HELPER,   # (the job's script uses the helper the submission installed)
        ': > "$dir/log"',
        f'printf %s {shlex.quote(script)} > "$dir/job.sh" && chmod 700 "$dir/job.sh"',
        'cd "$HOME" || exit 1',
        f'out=$(umask "$um"; {_submit_argv(scheduler, name)} {opts} {script_arg} '
        '2>"$dir/submit.err")',
        "st=$?",
        'if [ $st -ne 0 ]; then',
        f'  cat "$dir/submit.err" >&2; rm -rf -- "$dir"; exit {REFUSED}',
        'fi',
        'printf \'%s\\n\' "$out" > "$dir/job"; rm -f "$dir/submitting"',
        f"printf '%s%s\\t%s\\t%s\\n' {shlex.quote(JOB_TAG)} \"$out\" \"{_HOSTNAME}\" \"$dir\"",
    ])


def probe_submit_command(session_id: str) -> str:
    """Text that prints the ``JOB_TAG`` line of a submission whose answer was lost (the
    connection dropped, the daemon stopped); ``SUBMITTING_TAG`` while its submitter still
    runs; nothing if no job id was recorded."""
    return "\n".join([
        _dir(session_id),
        'p=$(cat "$dir/submitting" 2>/dev/null)',
        f'[ -s "$dir/job" ] || {{ [ -n "$p" ] && kill -0 "$p" 2>/dev/null && '
        f"printf '%s\\n' {shlex.quote(SUBMITTING_TAG)}; exit 0; }}",
        f"printf '%s%s\\t%s\\t%s\\n' {shlex.quote(JOB_TAG)} \"$(cat \"$dir/job\")\" "
        f"\"{_HOSTNAME}\" \"$dir\"",
    ])


@dataclass(frozen=True)
class Submitted:
    job_id: str
    server: str
    dir: str


def parse_job_id(scheduler: str, out: str) -> str | None:
    """The job id in what the submitter printed: sbatch --parsable ``81723[;cluster]``,
    qsub ``81723.server``, bsub ``Job <81723> is submitted to queue <normal>.``"""
    out = out.strip()
    if scheduler == "lsf":
        m = re.search(r"Job <([0-9]+)>", out)
        found = m.group(1) if m else None
    elif scheduler == "slurm":
        found = out.split(";", 1)[0].strip()
    else:
        found = out.splitlines()[-1].strip() if out else None
    return found if found and JOB_ID_RE.match(found) else None


def parse_job_line(scheduler: str, text: str) -> Submitted | None:
    for line in text.split("\n"):   # not splitlines(): it splits at the tag's \x1e
        if line.startswith(JOB_TAG):
            fields = line[len(JOB_TAG):].split("\t")
            if len(fields) >= 3:
                job_id = parse_job_id(scheduler, "\t".join(fields[:-2]))
                if job_id is not None:
                    return Submitted(job_id, fields[-2], fields[-1])
    return None


def cancel_command(scheduler: str, job_id: str) -> str:
    if not JOB_ID_RE.match(job_id):
        raise ValueError(f"bad job id {job_id!r}")
    return f"{_CANCEL[scheduler]} {shlex.quote(job_id)}"


def checked_record(job: Any) -> dict[str, Any]:
    """A job session's ``job`` record (the sessions file), every field checked: a bad id or
    scheduler raises ValueError, anything else malformed takes its default."""
    if not isinstance(job, dict):
        raise ValueError("bad job record")
    job_id, sched = job.get("id"), job.get("scheduler")
    if job_id is not None and not (isinstance(job_id, str) and JOB_ID_RE.match(job_id)):
        raise ValueError(f"bad job id {job_id!r}")
    if sched not in SCHEDULERS and not (sched is None and job_id is None):
        raise ValueError(f"bad scheduler {sched!r}")

    def num(key: str, kind: type = float) -> Any:
        v = job.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
        return kind(v) if ok else None
    state, reason, node = job.get("state"), job.get("reason"), job.get("node")
    return {
        "id": job_id, "scheduler": sched,
        "options": [o for o in job.get("options") or [] if isinstance(o, str)],
        "port_auto": job.get("port_auto") is True,
        "state": state if isinstance(state, str) and state in JOB_STATES else "pending",
        "reason": reason if isinstance(reason, str) else "",
        "node": node if isinstance(node, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,253}", node)
        else None,
        "time_limit": num("time_limit", int), "started": num("started"), "ends": num("ends"),
        "port": num("port", int),
        "notified": [n for n in job.get("notified") or [] if n in ("running", "warning")],
    }


# -- following the job's output -------------------------------------------------------------------


def follow_command(session_id: str, offset: int) -> str:
    """Text that writes the job's log from byte ``offset`` to stdout, prints the ``run``
    file on stderr (``RUN_TAG``) once the job starts, and ends with ``remote.END_TAG`` once
    the job's ``status`` is written (see ``remote.parse_end_line``).  A job the scheduler
    ends writes no status: the daemon learns of that end from a poll and stops this."""
    if offset < 0:
        raise ValueError("negative offset")
    return "\n".join([
        _dir(session_id),
        f'[ -d "$dir" ] || {{ printf \'%sgone\\n\' {shlex.quote(remote.END_TAG)} >&2; exit 0; }}',
        f'tail -c +{offset + 1} -F "$dir/log" 2>/dev/null &',
        't=$!',
        # a write to a reader that is gone fails (EPIPE) instead of killing this shell
        # (SIGPIPE) before it can end its tail, which would then outlive it on the server
        "trap '' PIPE",
        'said= hb=0',
        'while [ ! -e "$dir/status" ]; do',
        '  kill -0 $PPID 2>/dev/null || { kill $t 2>/dev/null; exit 0; }',
        # a line now and then: once nobody reads (the connection is gone, whoever the
        # parent now is) the write ends this follower and its tail
        '  hb=$((hb + 1))',
        f"  if [ $hb -ge {HEARTBEAT} ]; then printf '%s\\n' {shlex.quote(ALIVE_TAG)} >&2 || "
        '{ kill $t 2>/dev/null; exit 0; }; hb=0; fi',
        '  if [ -z "$said" ] && [ -s "$dir/run" ]; then',
        f"    printf '%s%s\\n' {shlex.quote(RUN_TAG)} \"$(cat \"$dir/run\")\" >&2; said=1",
        '  fi',
        f'  sleep {remote.FOLLOW_POLL} 2>/dev/null || sleep 1',
        'done',
        '[ -n "$said" ] || [ ! -s "$dir/run" ] || '
        f"printf '%s%s\\n' {shlex.quote(RUN_TAG)} \"$(cat \"$dir/run\")\" >&2",
        'sleep 0.5 2>/dev/null || sleep 1',
        'kill $t 2>/dev/null; wait $t 2>/dev/null',
        "size=$(wc -c < \"$dir/log\" | tr -d ' ')",
        'st=$(cat "$dir/status" 2>/dev/null)',
        f"printf '%s%s %s\\n' {shlex.quote(remote.END_TAG)} \"$size\" \"${{st:--}}\" >&2",
    ])


@dataclass(frozen=True)
class Run:
    """The job's ``run`` file: where it runs."""

    node: str
    port: int | None
    started: float | None


def parse_run(text: str) -> Run | None:
    """The ``run`` file's fields (after its tag, or bare)."""
    if text.startswith(RUN_TAG):
        text = text[len(RUN_TAG):]
    fields = text.strip("\n").split("\t")
    if len(fields) != 3 or not re.fullmatch(r"[A-Za-z0-9_.-]{1,253}", fields[0]):
        return None
    port = int(fields[1]) if fields[1].isdigit() and 0 < int(fields[1]) < 65536 else None
    started = float(fields[2]) if fields[2].isdigit() else None
    return Run(fields[0], port, started)
