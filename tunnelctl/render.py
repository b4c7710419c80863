"""What tunnelctl shows a person: sizes, ages, tables cut to the terminal's width, and the
text of `list`, `sessions`, `status` and `events`.  The daemon's JSON in, lines out.

Times on the wire are UTC (``2026-11-21T21:00:00Z``); they are shown as ages or as the local
clock.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Sequence

from tunneld.openlog import describe_age

#: a limit: a column cut to fit the terminal keeps at least this many characters
MIN_SQUEEZED = 12


def _size(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def _utc(iso: str) -> int | None:
    """A wire time as seconds since the epoch (fractions of a second dropped), None if it is
    not one."""
    import calendar  # here: only the commands that show a time pay for it
    try:
        return calendar.timegm(time.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S"))
    except (TypeError, ValueError):
        return None


def ago(since: str) -> str:
    """How long ago the wire time ``since`` was: ``42s``, ``5m``, ``3h 5m``, ``2d 4h``
    (``?``: not a time)."""
    t = _utc(since)
    return "?" if t is None else describe_age(time.time() - t)


def _clock(iso: str) -> str:
    """An event's UTC time as local HH:MM:SS."""
    t = _utc(iso)
    if t is None:
        return "--:--:--"
    return time.strftime("%H:%M:%S", time.localtime(t))


def table(rows: Sequence[tuple[str, ...]], indent: str = "", squeeze: tuple[int, ...] = (),
          width: int | None = None) -> None:
    """Columns padded to their widest cell; the last column is not padded.  The columns
    ``squeeze`` (indexes; e.g. an error, a command) are cut with "…" so that rows fit the
    terminal's width (``COLUMNS``, else the terminal; not cut into a pipe or a file);
    ``--json`` has them whole."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    if width is None:
        import os
        import shutil
        if not os.environ.get("COLUMNS") and not sys.stdout.isatty():
            width = 1 << 30   # into a pipe or a file: whole (as ps does)
        else:
            width = shutil.get_terminal_size().columns
    over = len(indent) + sum(widths) + 2 * (len(widths) - 1) - width
    for i in sorted(squeeze, key=lambda i: -widths[i]):
        if over <= 0:
            break
        floor = max(len(rows[0][i]), MIN_SQUEEZED)
        cut = min(over, max(0, widths[i] - floor))
        widths[i] -= cut
        over -= cut
    for r in rows:
        print(indent + "  ".join(_fit(c, w).ljust(w) for c, w in zip(r, widths)).rstrip())


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(0, width - 1)] + "…"


def print_list(data: dict[str, Any]) -> None:
    """`tunnelctl list`: each host with its state, then its forwards as a table."""
    hosts = data.get("hosts", [])
    if not hosts:
        print("no forwards; add one with `tunnelctl add HOST PORT`")
        return
    for h in hosts:
        rtt = h.get("rtt_ms")
        print(f"{h['name']}  {h['state']} for {ago(h.get('since', ''))}"
              + (f", round trip {rtt:g} ms" if rtt is not None and h["state"] == "connected"
                 else ""))
        if h.get("last_error"):
            print(f"  ! {h['last_error']}")
        mux = h.get("mux") or []
        if mux:
            print(f"  {len(mux)} ssh passenger{'s' if len(mux) != 1 else ''}: " + "; ".join(
                f"{p['command']} ({'pid ' + str(p['pid']) + ', ' if p.get('pid') else ''}"
                f"{ago(p.get('started', ''))})" for p in mux))
        if not h.get("forwards"):
            continue
        rows = [("SPEC", "LISTEN", "TARGET", "STATE", "ACTIVE", "TOTAL", "IN", "OUT",
                 "ORIGIN")]
        for f in h.get("forwards", []):
            listen, target = f["listen"], f["target"]
            if f.get("kind") == "remote":  # the server listens; the target is reached from here
                listen, target = f"{h['name']}:{listen}", f"here:{target}"
            elif f.get("kind") == "socks":
                target = f"SOCKS via {h['name']}"
            rows.append((f["spec"], listen, target, f["state"], str(f["active"]),
                         str(f["total"]), _size(f["bytes_in"]), _size(f["bytes_out"]),
                         f.get("origin", "")))
        table(rows, indent="  ")
        for f in h.get("forwards", []):
            if f.get("resume"):
                print(f"  {f['spec']}: {resume_line(f['resume'], f['active'])}")
            if f.get("last_error"):
                print(f"  ! {f['spec']}: {f['last_error']}")


def resume_line(r: dict[str, Any], active: int) -> str:
    """A resumable forward's link and streams, in a few words."""
    limit = r.get("suspend_limit") or 0
    if r.get("suspended"):
        since = r.get("suspended_since") or time.time()
        left = max(0.0, limit - (time.time() - since))
        return (f"{r['suspended']} stream{'s' if r['suspended'] != 1 else ''} suspended for "
                f"{time.time() - since:.0f} s (closed in {left:.0f} s unless the link "
                "comes back)")
    link = "relay linked" if r.get("link") else "relay not linked"
    return f"resumable, {link}, {active} stream{'s' if active != 1 else ''} open"


def session_line(r: dict[str, Any]) -> str:
    """How a session ended, in a few words (``exit status 3``, ``killed``…)."""
    if r.get("state") == "killed":   # by `tunnelctl kill`: its exit status is the signal's
        return "killed"
    if r.get("exit_status") is not None:
        return f"exit status {r['exit_status']}"
    if r.get("exit_signal"):
        return f"killed by signal {r['exit_signal']}"
    return r.get("error") or r.get("state", "?")


def job_phrase(x: dict[str, Any]) -> str:
    """A batch job's state for a person: ``pending (Priority)``, ``running on gpu012``,
    ``failed (exit 3)``, ``timeout``…; the session's own while it is disconnected."""
    job = x.get("job") or {}
    state = job.get("state") or x["state"]
    if x["state"] in ("failed", "lost") and state in ("pending", "running", "suspended"):
        return x["state"]   # the session ended without the job's end known (`error`: why)
    if x["state"] == "disconnected":
        return f"disconnected (job {state}{' on ' + job['node'] if job.get('node') else ''})"
    if state == "pending":
        return f"pending ({job['reason']})" if job.get("reason") else "pending"
    if state in ("running", "suspended") and job.get("node"):
        return f"{state} on {job['node']}"
    if state == "failed" and x.get("exit_status") is not None:
        return f"failed (exit {x['exit_status']})"
    return state


def time_left(job: dict[str, Any]) -> str:
    """``3:52:10 left`` of a running job with a known end; else empty."""
    end = _utc(job.get("ends") or "")
    if end is None:
        return ""
    s = max(0, int(end - time.time()))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d} left"


def print_sessions(sessions: list[dict[str, Any]]) -> None:
    """`tunnelctl sessions`: a table cut to the terminal's width."""
    if not sessions:
        print("no sessions; start one with `tunnelctl run HOST -- COMMAND`")
        return
    # the newest URL each printed, at its local end (a column only when one did)
    live = ("starting", "pending", "running", "disconnected")   # an ended one's forwards went
    newest = [(x.get("urls") or [{}])[-1].get("local") or "" if x["state"] in live else ""
              for x in sessions]
    jobs = any(x.get("job") for x in sessions)
    rows: list[tuple[str, ...]] = [
        ("NAME", "HOST", "STATE", "EXIT", "MODE", "PORT", "STARTED", "URL", "COMMAND")]
    for x, url in zip(sessions, newest):
        job = x.get("job")
        if job:
            state, mode = job_phrase(x), f"job {job.get('id') or '-'}"
            left = time_left(job) if x["state"] in live else ""
            ex = "" if x["state"] in live else (
                f"exit status {x['exit_status']}" if x.get("exit_status") is not None else "")
            ex = left or ex
        else:
            state = x["state"]
            ex = "" if x["state"] in live else session_line(x)
            mode = "detached" if x.get("detached", False) else "attached"
        rows.append((x["name"], x["host"], state, ex, mode, str(x["port"] or ""),
                     ago(x["started"]) + " ago", url, x["command"]))
    if jobs:
        rows[0] = ("NAME", "HOST", "STATE", "EXIT/LEFT", "MODE/JOB") + rows[0][5:]
    if not any(newest):
        rows = [r[:7] + r[8:] for r in rows]
        table(rows, squeeze=(7, 3))
    else:
        table(rows, squeeze=(8, 7, 3))


def print_opens(r: dict[str, Any]) -> None:
    """`tunnelctl opens`: the recent requests (oldest first), then how each spool is read."""
    from tunneld.urls import redact
    reqs = r.get("requests") or []
    if not reqs:
        print("no browser-open requests yet")
    else:
        rows: list[tuple[str, ...]] = [("N", "SEEN", "HOST", "NODE", "SOURCE", "OUTCOME",
                                        "URL", "WHY")]
        for q in reqs:
            rows.append((str(q["n"]), ago(q["seen"]) + " ago", q["host"], q.get("node") or "",
                         q["source"], q["outcome"], redact(q["url"]), q.get("reason") or ""))
        table(rows, squeeze=(7, 6))
    for sp in r.get("spools") or []:
        print(f"spool of {sp['host']}: {sp['state']} (since {ago(sp['since'])} ago)")


def print_setup(r: dict[str, Any]) -> None:
    """`tunnelctl setup-remote HOST [--apply]`: the line, the file and what was done."""
    host, path = r["host"], r["path"]
    print(f"{host}: the line for {path}:\n\n    {r['line']}\n\n({r['why']})")
    if r.get("already"):
        print(f"{host}: already set up: {path} sets BROWSER to tunneld's helper; nothing "
              "changed")
    if r.get("helper"):
        print(f"{host}: the BROWSER helper is installed: {r['helper']}")
    elif r.get("helper_failed"):
        print(f"tunnelctl: warning: {host}: the BROWSER helper could not be written in "
              "~/.tunneld/bin (a read-only or full home?)", file=sys.stderr)
    if r.get("added"):
        print(f"--- {path}" + (f"  (backup: {r['backup']})" if r.get("backup") else
                               "  (new file)"))
        print(f"+++ {path}")
        for line in r.get("lines") or []:
            print(f"+{line}")
        print(f"{host}: added; new logins use it (this one: `source {path}`)")
    elif not r.get("apply") and not r.get("already"):
        print(f"nothing was changed; `tunnelctl setup-remote {host} --apply` adds it")


def status_line(r: dict[str, Any]) -> str:
    """`tunnelctl status`: one line.  The fast path's state is a part of it when the daemon
    reports one (``fastpath``; a daemon older than that key gets no such part)."""
    line = (f"tunneld {r['version']} running, pid {r['pid']}, up {r['uptime']:.0f}s, "
            f"socket {r['socket']}, {r['hosts']} host(s), {r['forwards']} forward(s)")
    fast = r.get("fastpath")
    if isinstance(fast, dict):
        if fast.get("active"):
            line += ", fast path: on"
        else:
            line += ", fast path: off" + (f" ({fast['reason']})" if fast.get("reason") else "")
    return line


def format_event(ev: dict[str, Any]) -> str:
    """One event as one line for a person: ``21:00:03 barhal: connecting -> connected``."""
    kind, host = ev.get("kind"), ev.get("host")
    head = f"{_clock(ev.get('time', ''))} {host or 'tunneld'}:"
    if kind == "host":
        why = f" ({ev['error']})" if ev.get("error") else ""
        return f"{head} {ev.get('old')} -> {ev.get('new')}{why}"
    if kind == "forward":
        if ev.get("event") == "state":
            return f"{head} forward {ev.get('spec')}: {ev.get('old')} -> {ev.get('new')}"
        return f"{head} forward {ev.get('spec')} {ev.get('event')} ({ev.get('origin')})"
    if kind == "session":
        if ev.get("event") == "ended":
            how = ev.get("state")
            if ev.get("exit_status") is not None:
                how = f"{how}, exit status {ev['exit_status']}"
            return f"{head} session {ev.get('name')} ended ({how})"
        if ev.get("event") == "job" and isinstance(ev.get("job"), dict):
            return f"{head} session {ev.get('name')}: job {job_phrase(ev)}"
        return f"{head} session {ev.get('name')} {ev.get('event')}"
    if kind == "open":
        src = f" ({ev['source']})" if ev.get("source") else ""
        return f"{head} opened {ev.get('url')}{src}"
    if kind == "daemon":
        if ev.get("event") == "reloaded":
            return (f"{head} config reloaded (added {' '.join(ev.get('added') or []) or '-'}"
                    f"; removed {' '.join(ev.get('removed') or []) or '-'})")
        return f"{head} {ev.get('event')}"
    return f"{head} {kind} " + json.dumps({k: v for k, v in ev.items()
                                           if k not in ("time", "kind", "host")})
