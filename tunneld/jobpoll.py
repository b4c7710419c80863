"""Watching batch jobs: one poll command per host for all its jobs, and the parsers of the
schedulers' answers.  Pure.

A poll asks the scheduler's queue about every job (``squeue``, ``qstat -f``, ``bjobs -o``) and
prints, after a ``jobs.FILES_TAG`` line, the ``run`` and ``status`` files of each job's
session directory.  A job the queue no longer knows is asked of the accounting once
(``account_command``: ``sacct``; PBS's ``qstat -x`` and LSF's ``bjobs`` already cover ended
jobs); where that is not kept either, the job's own ``status`` file says how it ended.
"""

from __future__ import annotations

import re
import shlex

from .jobs import _SLURM_STATES, FILES_TAG, JOB_ID_RE, RUN_TAG, STATUS_TAG, JobInfo, Run, parse_run
from .remote import _dir

_SQUEUE_FORMAT = "%i|%T|%r|%N|%l|%L"
#: the line after the queue's answer: this tag and the query's exit status
QUEUE_TAG = "\x1etunneld-queue:"
#: what a query that knows none of the jobs asked about says (it exits non-zero then)
_NOT_FOUND = re.compile(r"Invalid job id|Unknown Job Id|is not found|Job has finished",
                        re.I)


def _ids(job_ids: list[str]) -> str:
    for j in job_ids:
        if not JOB_ID_RE.match(j):
            raise ValueError(f"bad job id {j!r}")
    return ",".join(job_ids)


def poll_command(scheduler: str, jobs: dict[str, str]) -> str:
    """Text that asks about ``jobs`` (job id → session id) at once: the queue's answer, then
    ``FILES_TAG`` and each job's ``run``/``status`` lines."""
    ids = _ids(sorted(jobs))
    if scheduler == "slurm":
        query = f"squeue -h -t all -j {ids} -o {shlex.quote(_SQUEUE_FORMAT)} 2>/dev/null"
    elif scheduler == "pbs":
        spaced = ids.replace(",", " ")
        # PBS Pro's -x adds finished jobs; Torque's -x means XML: then the plain form (Torque
        # keeps finished jobs listed for its keep_completed)
        query = (f"qstat -f -x {spaced} 2>/dev/null | grep -q '^<' && qstat -f {spaced} "
                 f"2>/dev/null || qstat -f -x {spaced} 2>/dev/null")
    else:
        fields = "jobid stat exec_host pend_reason runtimelimit time_left exit_code " \
                 "exit_reason delimiter='|'"
        query = f"bjobs -noheader -o {shlex.quote(fields)} {ids.replace(',', ' ')} 2>/dev/null"
    # the queue's answer and its exit status (a failed query says nothing of the jobs,
    # unless it failed because it knows none of them)
    lines = [f"q=$({query.replace(' 2>/dev/null', ' 2>&1')})", "st=$?", "printf '%s\\n' \"$q\"",
             f"printf '%s%s\\n' {shlex.quote(QUEUE_TAG)} \"$st\"",
             f"printf '%s\\n' {shlex.quote(FILES_TAG)}"]
    for job_id, session_id in sorted(jobs.items()):
        lines += [
            _dir(session_id),
            f'[ -s "$dir/run" ] && printf \'%s%s\\t%s\\n\' {shlex.quote(RUN_TAG)} '
            f'{shlex.quote(job_id)} "$(cat "$dir/run")"',
            f'[ -s "$dir/status" ] && printf \'%s%s\\t%s\\n\' {shlex.quote(STATUS_TAG)} '
            f'{shlex.quote(job_id)} "$(cat "$dir/status")"',
        ]
    return "\n".join([*lines, "exit 0"])


def account_command(scheduler: str, job_ids: list[str]) -> str | None:
    """Text that asks the accounting about jobs the queue no longer lists (Slurm's
    ``sacct``); None where the poll already covers ended jobs."""
    if scheduler != "slurm":
        return None
    return (f"sacct -n -P -X -j {_ids(job_ids)} -o JobID,State,ExitCode,NodeList,Timelimit,"
            "Reason 2>/dev/null")


class PollAnswer:
    """A poll's answer: per job id what the scheduler said (``queue``), the ``run`` file
    (``runs``) and the ``status`` file (``statuses``)."""

    def __init__(self, queue: dict[str, JobInfo], runs: dict[str, Run],
                 statuses: dict[str, int], conclusive: bool, said: str = "") -> None:
        self.queue, self.runs, self.statuses = queue, runs, statuses
        #: the queue answered (a job it does not list has left it); else what it said
        self.conclusive, self.said = conclusive, said


def parse_poll(scheduler: str, text: str) -> PollAnswer:
    head, _, files = text.partition(FILES_TAG)
    runs: dict[str, Run] = {}
    statuses: dict[str, int] = {}
    for line in files.split("\n"):
        if line.startswith(RUN_TAG):
            job_id, _, rest = line[len(RUN_TAG):].partition("\t")
            run = parse_run(rest)
            if run is not None:
                runs[job_id] = run
        elif line.startswith(STATUS_TAG):
            job_id, _, rest = line[len(STATUS_TAG):].partition("\t")
            if rest.strip().isdigit():
                statuses[job_id] = int(rest.strip())
    parse = {"slurm": parse_squeue, "pbs": parse_qstat, "lsf": parse_bjobs}[scheduler]
    queue_text, _, status = head.partition(QUEUE_TAG)
    status = status.strip()
    queue = parse(queue_text)
    conclusive = status == "0" or bool(queue) or bool(_NOT_FOUND.search(queue_text))
    said = "" if conclusive else (queue_text.strip().splitlines() or [f"exit {status}"])[-1]
    return PollAnswer(queue, runs, statuses, conclusive and status != "", said[:300])


# -- time ---------------------------------------------------------------------------------------


def slurm_seconds(text: str) -> int | None:
    """Slurm's ``[D-]HH:MM:SS``, ``MM:SS``, ``MM`` as seconds; None for UNLIMITED,
    NOT_SET, INVALID and the like."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if m is None:
        return None
    days = int(m.group(1) or 0)
    parts = [int(p) for p in m.groups()[1:] if p is not None]
    if m.group(1) is not None:   # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        h, mi, s = parts
    elif len(parts) == 3:
        h, mi, s = parts
    elif len(parts) == 2:
        h, mi, s = 0, parts[0], parts[1]
    else:
        h, mi, s = 0, parts[0], 0
    return ((days * 24 + h) * 60 + mi) * 60 + s


def _hms(text: str) -> int | None:
    m = re.fullmatch(r"(\d+):(\d+)(?::(\d+))?", text.strip())
    if m is None:
        return None
    return (int(m.group(1)) * 60 + int(m.group(2))) * 60 + int(m.group(3) or 0)


# -- Slurm --------------------------------------------------------------------------------------


def _slurm_word(raw: str) -> str:
    """Slurm's state word as the table has it (``CANCELLED by 0`` → ``CANCELLED``)."""
    return raw.strip().split()[0].upper().rstrip("+") if raw.strip() else ""


def _slurm_state(raw: str, node: str) -> tuple[str, str]:
    """(our state, a reason) of a Slurm state word; a word this table does not know (a newer
    Slurm's, POWER_UP_NODE…) is a live state: running where the job has a node, else
    pending, the word as its reason (never taken for an end)."""
    word = _slurm_word(raw)
    if word in _SLURM_STATES:
        return _SLURM_STATES[word], ""
    return ("running" if node else "pending"), word.lower().replace("_", " ")


def parse_squeue(text: str) -> dict[str, JobInfo]:
    """``squeue -h -t all -o '%i|%T|%r|%N|%l|%L'`` lines."""
    out: dict[str, JobInfo] = {}
    for line in text.split("\n"):
        f = line.strip().split("|")
        if len(f) != 6 or not JOB_ID_RE.match(f[0]):
            continue
        if not f[1].strip():
            continue
        node = "" if f[3] in ("", "(null)", "None assigned") else f[3]
        state, unknown = _slurm_state(f[1], node)
        reason = unknown or ("" if f[2] in ("None", "(null)") else f[2])
        out[f[0]] = JobInfo(state, reason, _first_node(node), slurm_seconds(f[4]),
                            slurm_seconds(f[5]) if state == "running" else None)
    return out


def parse_sacct(text: str) -> dict[str, JobInfo]:
    """``sacct -n -P -X -o JobID,State,ExitCode,NodeList,Timelimit,Reason`` lines."""
    out: dict[str, JobInfo] = {}
    for line in text.split("\n"):
        f = line.strip().split("|")
        if len(f) != 6 or not JOB_ID_RE.match(f[0]):
            continue
        code = f[2].split(":", 1)[0]
        node = "" if f[3] in ("", "None assigned") else f[3]
        state = _SLURM_STATES.get(_slurm_word(f[1]), "ended")
        out[f[0]] = JobInfo(state, "" if f[5] == "None" else f[5],
                            _first_node(node), slurm_seconds(f[4]), None,
                            int(code) if code.isdigit() else None)
    return out


def _first_node(nodelist: str) -> str:
    """The first node of a Slurm node list (``gpu[012-014],cpu1`` → ``gpu012``)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]\-,]+))?", nodelist)
    if m is None:
        return ""
    return m.group(1) + (m.group(2) or "")


# -- PBS / Torque -------------------------------------------------------------------------------

_PBS_STATES = {"Q": "pending", "H": "pending", "W": "pending", "T": "pending", "B": "running",
               "R": "running", "E": "running", "S": "suspended", "U": "suspended",
               "F": "completed", "C": "completed", "X": "completed"}


def parse_qstat(text: str) -> dict[str, JobInfo]:
    """``qstat -f [-x]`` blocks (``Job Id: ID`` then ``key = value`` lines, long values
    continued on lines that start with a tab)."""
    out: dict[str, JobInfo] = {}
    blocks = re.split(r"^Job Id:\s*", text, flags=re.M)
    for block in blocks[1:]:
        first, _, rest = block.partition("\n")
        job_id = first.strip()
        rest = re.sub(r"\n\t", "", rest)
        attrs: dict[str, str] = {m.group(1): m.group(2) for m in
                                 re.finditer(r"^\s+([\w.]+) = (.*)$", rest, re.M)}
        state = _PBS_STATES.get(attrs.get("job_state", "").strip(), "")
        if not state or not JOB_ID_RE.match(job_id):
            continue
        code_text = attrs.get("Exit_status", "").strip()
        code = int(code_text) if re.fullmatch(r"-?\d+", code_text) else None
        if state == "completed" and code is not None:
            # PBS Pro: -29 walltime, -28 CPU time, -27/-26 memory; Torque: -11 walltime,
            # -12 CPU time, -10 memory; 256+N: killed by signal N (qdel sends TERM, the
            # comment says whether for the walltime); other negatives: it could not run there
            comment = attrs.get("comment", "").lower()
            state = ("timeout" if code in (-29, -28, -11, -12) or "walltime" in comment else
                     "out of memory" if code in (-27, -26, -10) else
                     "cancelled" if code in (271, 265) else
                     "node failure" if code < 0 else
                     "failed" if code != 0 else "completed")
        limit = _hms(attrs.get("Resource_List.walltime", ""))
        used = _hms(attrs.get("resources_used.walltime", ""))
        left = limit - used if state == "running" and limit is not None and used is not None \
            else None
        node = attrs.get("exec_host", "").split("/", 1)[0].split("+", 1)[0].strip()
        out[job_id] = JobInfo(state, attrs.get("comment", "").strip() if state == "pending"
                              else "", node, limit, left,
                              code if code is not None and code >= 0 else None)
    return out


# -- LSF ----------------------------------------------------------------------------------------

_LSF_STATES = {"PEND": "pending", "PSUSP": "pending", "WAIT": "pending", "RUN": "running",
               "PROV": "running", "UNKWN": "running", "USUSP": "suspended",
               "SSUSP": "suspended", "DONE": "completed", "EXIT": "failed",
               "ZOMBI": "node failure"}


def parse_bjobs(text: str) -> dict[str, JobInfo]:
    """``bjobs -noheader -o 'jobid stat exec_host pend_reason runtimelimit time_left
    exit_code exit_reason delimiter="|"'`` lines (``-`` for an empty field)."""
    out: dict[str, JobInfo] = {}
    for line in text.split("\n"):
        f = [x.strip() for x in line.strip().split("|")]
        if len(f) != 8 or not JOB_ID_RE.match(f[0]):
            continue
        f = ["" if x == "-" else x for x in f]
        state = _LSF_STATES.get(f[1], "")
        if not state:
            continue
        why = f[7].upper()
        if state == "failed":
            state = ("timeout" if "RUNLIMIT" in why else
                     "cancelled" if "TERM_OWNER" in why or "TERM_ADMIN" in why else
                     "out of memory" if "MEMLIMIT" in why else "failed")
        node = re.sub(r"^\d+\*", "", f[2].split(":", 1)[0])
        limit = re.match(r"[\d.]+", f[4])   # minutes, "240.0/hostA"
        left = re.match(r"(\d+):(\d+)", f[5])   # "3:52 L"
        out[f[0]] = JobInfo(
            state, f[3].rstrip(";") if state == "pending" else "", node,
            int(float(limit.group()) * 60) if limit else None,
            (int(left.group(1)) * 60 + int(left.group(2))) * 60
            if left and state == "running" else None,
            int(f[6]) if f[6].isdigit() else (0 if state == "completed" else None))
    return out
