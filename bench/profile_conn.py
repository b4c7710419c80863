#!/usr/bin/env python3
"""Profile tunneld's new-connection path, side by side with ``ssh -L``.

    python bench/profile_conn.py                    # 500 connections per pass
    python bench/profile_conn.py --base ../other    # also a tunneld run from another tree
    python bench/profile_conn.py --strace --perf --callgrind --json out.json

The machinery is bench/run.py's: a throw-away sshd on 127.0.0.1 (alias ``benchgcm``,
aes128-gcm), the echo target on 127.0.0.2 (bench/servers.py), tunneld in a temp HOME with one
forward added by ``tunnelctl add``, and ``ssh -N -c aes128-gcm -L`` to the same target.
``--base TREE`` starts a second tunneld whose code comes from TREE (PYTHONPATH; its own XDG
dirs, the same HOME and sshd): before/after side by side, in the same run.  One run measures:

1. timing, every path in the same run, in rounds whose order rotates (``--rounds``, each
   ``-n`` connections per path): new connection = open + 100-byte echo + close,
   sequentially (wall median and p99; CPU µs per connection of the tunnel process, from
   /proc/PID/task/*/schedstat), then ping-pong (``--ping-n`` 64-byte round trips: p50, p99,
   CPU µs each).  Figures are the medians of the rounds.  Profilers are off meanwhile.
2. a profile of each tunneld: it runs under a wrapper (this file, ``_daemon``) holding a
   ``cProfile.Profile`` that SIGUSR2 switches on (a fresh one) and off (written to a file);
   ``-n`` more connections run in between.  Only the connections are in it (not the start
   or the login).  Per connection: calls (cProfile's total ÷ N, of Python functions and of
   builtins), CPU µs with the profiler on, the top functions by tottime and by call count.
   ``--opcodes``: the same with a trace function counting each Python function's calls and
   bytecode instructions (exact and repeatable; the time per call is not).
   ``--gc``: the garbage collector's runs meanwhile (count, time, longest) and the objects
   it would free: those left in reference cycles, per connection, by type.
3. ``--strace``: system calls per connection of each path's process; ``--perf``: where its
   CPU goes (perf record, share per object file; ``-v``: top symbols).
4. ``--callgrind``: the same N connections with ``ssh -L`` and each tunneld restarted under
   ``valgrind --tool=callgrind`` (instrumentation switched on and off around them with
   ``callgrind_control -i``): user-space instructions per connection, repeatable run to run,
   split by object file (the interpreter, uvloop/libuv, OpenSSL via cryptography, libc...).

``--workload ping`` makes 2-4 measure ``-n`` ping-pong round trips on one connection instead.
Every process started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))


# ------------------------------------------------------------------------------------------
# the daemon side: tunneld with a profiler that SIGUSR2 switches on and off


def daemon_main(out: str) -> int:
    """Run tunneld (``python -m tunneld``'s main) with a profiler switched by SIGUSR2: the
    first signal starts a fresh one, the next writes its results to ``out`` and stops it.
    Which profiler: the file ``out.mode`` says, when it starts: ``cprofile`` (the default),
    or ``opcodes`` (a trace function counting the calls and the bytecode instructions run
    of each Python function: exact, the same from run to run; written as JSON)."""
    import collections
    import cProfile

    state: dict[str, Any] = {"prof": None}
    calls: collections.Counter[Any] = collections.Counter()
    ops: collections.Counter[Any] = collections.Counter()

    def local(frame: Any, event: str, _arg: Any) -> Any:
        if event == "opcode":
            ops[frame.f_code] += 1
        return local

    def each_call(frame: Any, _event: str, _arg: Any) -> Any:
        frame.f_trace_opcodes = True
        calls[frame.f_code] += 1
        return local

    import gc
    gcstat: dict[str, Any] = {}

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gcstat["t0"] = time.perf_counter()
            return
        dt = time.perf_counter() - gcstat.get("t0", time.perf_counter())
        g = gcstat.setdefault(str(info["generation"]), [0, 0.0, 0.0, 0])
        g[0] += 1
        g[1] += dt
        g[2] = max(g[2], dt)
        g[3] += info["collected"]

    gc.callbacks.append(on_gc)

    def toggle(_sig: int, _frame: Any) -> None:
        prof = state["prof"]
        if prof is None:
            try:
                mode = Path(out + ".mode").read_text().strip()
            except OSError:
                mode = "cprofile"
            if mode == "gc":
                gcstat.clear()
                state["prof"] = "gc"
            elif mode == "garbage":   # what the collector frees: objects in cycles
                gc.collect()
                gc.set_debug(gc.DEBUG_SAVEALL)
                state["prof"] = "garbage"
            elif mode == "opcodes":
                calls.clear()
                ops.clear()
                state["prof"] = "opcodes"
                sys.settrace(each_call)
            else:
                state["prof"] = prof = cProfile.Profile()
                prof.enable()
        elif prof == "garbage":
            state["prof"] = None
            gc.collect()
            kinds = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}"
                                        for o in gc.garbage)
            gc.garbage.clear()
            gc.set_debug(0)
            Path(out + ".tmp").write_text(json.dumps(dict(kinds.most_common(40))))
            os.replace(out + ".tmp", out)
        elif prof == "gc":
            state["prof"] = None
            gcstat.pop("t0", None)
            Path(out + ".tmp").write_text(json.dumps(
                {g: {"collections": v[0], "total_ms": v[1] * 1e3, "max_ms": v[2] * 1e3,
                     "collected": v[3]} for g, v in sorted(gcstat.items())} |
                {"objects_now": len(gc.get_objects())}))
            os.replace(out + ".tmp", out)
        elif prof == "opcodes":
            sys.settrace(None)
            state["prof"] = None
            table = {f"{c.co_filename}:{c.co_firstlineno}({c.co_name})": [calls[c], ops[c]]
                     for c in calls}
            Path(out + ".tmp").write_text(json.dumps(table))
            os.replace(out + ".tmp", out)
        else:
            prof.disable()
            state["prof"] = None
            prof.dump_stats(out + ".tmp")
            os.replace(out + ".tmp", out)

    signal.signal(signal.SIGUSR2, toggle)
    sys.argv = ["tunneld"]
    import tunneld
    print(f"profile_conn: tunneld from {tunneld.__file__}", file=sys.stderr, flush=True)
    from tunneld.__main__ import main
    return main()


# ------------------------------------------------------------------------------------------
# the client side


class Daemon:
    """One tunneld (code from ``tree``) with its own XDG dirs, forwarding one port."""

    def __init__(self, h: "Harness", name: str, tree: Path):
        self.h, self.name, self.tree = h, name, tree
        self.dir = h.base / f"daemon-{name}"
        self.dir.mkdir()
        runtime = Path(tempfile.mkdtemp(prefix=f"tdp-{name[:4]}-", dir="/tmp"))
        h.stack.callback(shutil.rmtree, runtime, True)
        self.env = dict(h.sshd.env, TUNNELD_NO_AUTOSTART="1", PYTHONUNBUFFERED="1",
                        PYTHONPATH=str(tree), XDG_RUNTIME_DIR=str(runtime),
                        XDG_CONFIG_HOME=str(self.dir / "config"),
                        XDG_STATE_HOME=str(self.dir / "state"),
                        XDG_DATA_HOME=str(self.dir / "data"),
                        XDG_CACHE_HOME=str(self.dir / "cache"))
        self.env.pop("TUNNELD_SOCKET", None)
        self.env.pop("TUNNELD_CONFIG", None)
        self.prof_out = self.dir / "tunneld.prof"
        self.stderr = self.dir / "tunneld.stderr"
        self.proc: subprocess.Popen | None = None
        self.port = h.S.free_port()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "tunnelctl", *args], cwd=self.tree,
                           env=self.env, capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            raise RuntimeError(f"{self.name}: tunnelctl {' '.join(args)} exited "
                               f"{r.returncode}: {r.stderr or r.stdout}")
        return r

    def start(self, prefix: list[str] | None = None) -> None:
        R = self.h.R
        cmd = [*(prefix or []), sys.executable, str(Path(__file__).resolve()), "_daemon",
               str(self.prof_out)]
        with self.stderr.open("ab") as err:
            self.proc = subprocess.Popen(cmd, cwd=self.tree, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True)
        self.h.stack.callback(self.stop)
        deadline = time.monotonic() + (300 if prefix else 30)
        while self.ctl("status", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start: {R.tail(self.stderr)}")
            time.sleep(0.1)
        self.ctl("add", "benchgcm", f"{self.port}:{R.TARGET_HOST}:{self.h.echo_port}")
        while True:
            hosts = json.loads(self.ctl("list", "--json").stdout)["hosts"]
            if any(x["name"] == "benchgcm" and x["state"] == "connected" for x in hosts):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: benchgcm not connected: {hosts}")
            time.sleep(0.1)
        R.echo_once(R.LOCAL, self.port, 60)
        src = [ln for ln in self.stderr.read_text().splitlines() if "profile_conn:" in ln]
        self.code = src[-1].split(" from ", 1)[1] if src else "?"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        self.ctl("stop", check=False)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.h.S.stop_process(proc)


class Harness:
    def __init__(self, args: argparse.Namespace):
        import run as R  # bench/run.py's helpers
        import servers as S
        self.S, self.R = S, R
        self.args = args
        self.base = Path(tempfile.mkdtemp(prefix="tunneld-prof-"))
        self.stack = contextlib.ExitStack()
        self.ssh: subprocess.Popen | None = None
        self.daemons: dict[str, Daemon] = {}

    # -- setup ----------------------------------------------------------------------------

    def setup(self) -> None:
        S, R = self.S, self.R
        self.sshd = S.SSHD(self.base)
        self.stack.callback(self.sshd.close)
        self.sshd.add_alias("benchgcm", Ciphers=R.GCM)
        self.sshd.start()
        tproc = subprocess.Popen([sys.executable, str(BENCH / "servers.py"), "targets",
                                  R.TARGET_HOST], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=(self.base / "targets.stderr").open("ab"),
                                 start_new_session=True)
        self.stack.callback(S.stop_process, tproc)
        self.target_pid = tproc.pid
        line = R._readline(tproc, 20)
        if not line:
            raise RuntimeError("target servers did not start")
        self.echo_port = json.loads(line)["echo"]
        self.daemons["tunneld"] = Daemon(self, "tunneld", REPO)
        if self.args.base:
            self.daemons["base"] = Daemon(self, "base", Path(self.args.base).resolve())
        for d in self.daemons.values():
            d.start()
        self.ssh_port = self.start_ssh()

    def start_ssh(self, prefix: list[str] | None = None) -> int:
        R = self.R
        port = self.S.free_port()
        cmd = [self.sshd.ssh_path, "-F", str(self.sshd.config), "-N", "-c", R.GCM,
               "-o", "ExitOnForwardFailure=yes", "-o", "ControlMaster=no",
               "-L", f"{R.LOCAL}:{port}:{R.TARGET_HOST}:{self.echo_port}", "benchgcm"]
        with (self.base / "ssh.stderr").open("ab") as err:
            self.ssh = subprocess.Popen([*(prefix or []), *cmd], env=self.sshd.env,
                                        stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=err,
                                        start_new_session=True)
        self.stack.callback(self.S.stop_process, self.ssh)
        R.wait_accepts(port, self.ssh, 120 if prefix else 30, "ssh -L")
        R.echo_once(R.LOCAL, port, 10)
        return port

    def paths(self) -> dict[str, tuple[int, int]]:
        """name -> (pid, port) of every path: ssh first."""
        out = {"ssh": (self.ssh.pid, self.ssh_port)}
        out.update({k: (d.pid, d.port) for k, d in self.daemons.items()})
        return out

    # -- measurements ---------------------------------------------------------------------

    def timing(self) -> dict[str, Any]:
        """Rounds of new connections, then of ping-pong, on every path, the order rotating."""
        R, n = self.R, self.args.n
        paths = self.paths()
        names = list(paths)
        for pid, port in paths.values():   # warm-up
            R.new_conn_latency(R.LOCAL, port, 50)
        conn: dict[str, list[dict[str, Any]]] = {k: [] for k in paths}
        ping: dict[str, list[dict[str, Any]]] = {k: [] for k in paths}
        target: list[float] = []   # the echo target's CPU µs per connection, each round
        for rnd in range(self.args.rounds):
            k = rnd % len(names)
            for key in names[k:] + names[:k]:
                pid, port = paths[key]
                c0, t0 = R.cpu_seconds([pid]), R.cpu_seconds([self.target_pid])
                r = R.new_conn_latency(R.LOCAL, port, n)
                r["cpu_us"] = (R.cpu_seconds([pid]) - c0) * 1e6 / r["n"]
                target.append((R.cpu_seconds([self.target_pid]) - t0) * 1e6 / r["n"])
                conn[key].append(r)
        for rnd in range(self.args.rounds):
            k = rnd % len(names)
            for key in names[k:] + names[:k]:
                pid, port = paths[key]
                c0 = R.cpu_seconds([pid])
                q = R.ping_pong(R.LOCAL, port, self.args.ping_n)
                q["cpu_us"] = (R.cpu_seconds([pid]) - c0) * 1e6 / q["n"]
                ping[key].append(q)
        med = statistics.median
        out: dict[str, Any] = {}
        for key in paths:
            out[key] = {
                "conn_median_ms": med(r["median_ms"] for r in conn[key]),
                "conn_p99_ms": med(r["p99_ms"] for r in conn[key]),
                "conn_cpu_us": med(r["cpu_us"] for r in conn[key]),
                "ping_p50_ms": med(q["p50_ms"] for q in ping[key]),
                "ping_p99_ms": med(q["p99_ms"] for q in ping[key]),
                "ping_cpu_us": med(q["cpu_us"] for q in ping[key]),
                "conn_rounds": [{k: r[k] for k in ("median_ms", "p99_ms", "cpu_us", "n")}
                                for r in conn[key]],
                "ping_rounds": [{k: q[k] for k in ("p50_ms", "p99_ms", "cpu_us", "n")}
                                for q in ping[key]],
                "errors": sum(sum(r["errors"].values()) for r in conn[key])}
        out["_target_cpu_us"] = med(target)
        return out

    def workload(self, port: int, n: int) -> dict[str, Any]:
        """What the profiles measure: ``n`` new connections, or (``--workload ping``) ``n``
        round trips on one connection (opened before, after 20 warm-up round trips)."""
        R = self.R
        if self.args.workload == "ping":
            r = R.ping_pong(R.LOCAL, port, n)
            r.update(median_ms=r["p50_ms"])
            return r
        return R.new_conn_latency(R.LOCAL, port, n)

    def profile(self, d: Daemon, mode: str = "cprofile") -> dict[str, Any]:
        R, n = self.R, self.args.n
        with contextlib.suppress(FileNotFoundError):
            d.prof_out.unlink()
        Path(f"{d.prof_out}.mode").write_text(mode)
        R.new_conn_latency(R.LOCAL, d.port, 20)   # warm
        os.kill(d.pid, signal.SIGUSR2)
        time.sleep(0.3)                           # the handler runs on the loop's wakeup
        c0 = R.cpu_seconds([d.pid])
        r = self.workload(d.port, n)
        c1 = R.cpu_seconds([d.pid])
        time.sleep(0.2)   # the last connection's CLOSE reaches tunneld
        os.kill(d.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not d.prof_out.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{d.name}: no profile written")
            time.sleep(0.05)
        if mode == "opcodes":
            return opcodes(json.loads(d.prof_out.read_text()), r["n"], self.args.top)
        if mode == "garbage":
            return {k: v / r["n"] for k, v in json.loads(d.prof_out.read_text()).items()}
        if mode == "gc":
            return {"n": r["n"], "median_ms": r["median_ms"], "p99_ms": r["p99_ms"],
                    "cpu_us": (c1 - c0) * 1e6 / r["n"],
                    "gc": json.loads(d.prof_out.read_text())}
        if self.args.prof:
            shutil.copyfile(d.prof_out, f"{self.args.prof}.{d.name}.prof")
        return summarize(pstats.Stats(str(d.prof_out)), r["n"],
                         cpu_us=(c1 - c0) * 1e6 / r["n"], top=self.args.top)

    def traced(self, tool: str) -> dict[str, Any]:
        """``strace``: system calls per connection of each path's process (strace -c -f);
        ``perf``: where each process's CPU time goes (perf record, share per object)."""
        R, n = self.R, self.args.n
        out: dict[str, Any] = {}
        for key, (pid, port) in self.paths().items():
            R.new_conn_latency(R.LOCAL, port, 20)
            data = self.base / f"{tool}-{key}.out"
            if tool == "strace":
                cmd = ["strace", "-c", "-f", "-o", str(data), "-p", str(pid)]
            else:
                cmd = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "2000", "-o",
                       str(data), "-p", str(pid)]
            tracer = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)   # attached
            c0 = R.cpu_seconds([pid])
            r = self.workload(port, n)
            c1 = R.cpu_seconds([pid])
            time.sleep(0.2)
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=60)
            res: dict[str, Any] = {"n": r["n"], "cpu_us_traced": (c1 - c0) * 1e6 / r["n"]}
            if tool == "strace":
                calls = {}
                for line in data.read_text().splitlines():
                    parts = line.split()
                    if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                        calls[parts[-1]] = int(parts[3]) / r["n"]
                res["syscalls_per_conn"] = dict(sorted(calls.items(), key=lambda kv: -kv[1]))
                res["total_per_conn"] = sum(calls.values())
            else:
                shares: dict[str, float] = {}
                rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio",
                                      "--sort", "dso", "-q"], capture_output=True, text=True)
                for line in rep.stdout.splitlines():
                    parts = line.split()
                    if len(parts) >= 2 and parts[0].endswith("%"):
                        shares[" ".join(parts[1:])] = float(parts[0].rstrip("%"))
                res["share_by_dso_pct"] = shares
                rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio",
                                      "--sort", "dso,sym", "-q"], capture_output=True,
                                     text=True)
                res["top_symbols_pct"] = [" ".join(ln.split()) for ln in
                                          rep.stdout.splitlines() if ln.strip()][:30]
            out[key] = res
        return out

    def callgrind(self, d: Daemon | None) -> dict[str, Any]:
        """Instructions per connection (user space) with ``d`` (None: ``ssh -L``)
        restarted under callgrind, then restarted normally."""
        R, n = self.R, self.args.n
        outdir = d.dir if d is not None else self.base
        prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                  f"--callgrind-out-file={outdir}/callgrind.out.%p"]
        if d is not None:
            d.stop()
            d.start(prefix)
            pid, port = d.pid, d.port   # valgrind runs the program in its own process
        else:
            self.S.stop_process(self.ssh)
            self.ssh_port = port = self.start_ssh(prefix)
            pid = self.ssh.pid
        R.new_conn_latency(R.LOCAL, port, 20)
        ctl = ["callgrind_control"]
        subprocess.run([*ctl, "-z", str(pid)], check=True, capture_output=True)
        subprocess.run([*ctl, "-i", "on", str(pid)], check=True, capture_output=True)
        r = self.workload(port, n)
        time.sleep(1.0)   # the last connection's EOF and CLOSE
        subprocess.run([*ctl, "-i", "off", str(pid)], check=True, capture_output=True)
        subprocess.run([*ctl, "-d", str(pid)], check=True, capture_output=True)
        dumps = sorted(outdir.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
        if d is not None:
            d.stop()
            d.start()   # back to normal, for whatever follows
        else:
            self.S.stop_process(self.ssh)
            self.ssh_port = self.start_ssh()
        res = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100",
                              str(dumps[-1])], capture_output=True, text=True)
        total, by_obj = _callgrind_split(res.stdout)
        if self.args.callgrind_out:
            shutil.copyfile(dumps[-1], f"{self.args.callgrind_out}.{d.name if d else 'ssh'}")
        return {"n": r["n"], "instructions_per_conn": total / r["n"],
                "by_object_per_conn": {k: v / r["n"] for k, v in by_obj.items()}}

    def close(self) -> None:
        self.stack.close()
        shutil.rmtree(self.base, ignore_errors=True)


def _callgrind_split(text: str) -> tuple[int, dict[str, int]]:
    """Total Ir and Ir per object file from callgrind_annotate's output (functions inlined
    from a header have no object named: "(inlined)")."""
    total = 0
    by_obj: dict[str, int] = {}
    for line in text.splitlines():
        s = line.strip()
        if s.endswith("PROGRAM TOTALS"):
            total = int(s.split()[0].replace(",", ""))
            continue
        parts = s.split(None, 2)
        if len(parts) < 3 or not parts[0].replace(",", "").isdigit() or ":" not in parts[-1]:
            continue
        ir = int(parts[0].replace(",", ""))
        obj = os.path.basename(parts[-1].rsplit(" [", 1)[-1].rstrip("]")) \
            if parts[-1].endswith("]") else "(inlined)"
        by_obj[obj] = by_obj.get(obj, 0) + ir
    return total, dict(sorted(by_obj.items(), key=lambda kv: -kv[1]))


def _name(func: tuple[str, int, str]) -> str:
    file, line, name = func
    if file == "~":
        return name
    if "site-packages/" in file:
        file = file.split("site-packages/", 1)[1]
    elif "/lib/python3" in file:
        file = "stdlib/" + file.split("/lib/python3", 1)[1].split("/", 1)[1]
    elif "/tunneld/" in file:
        file = "tunneld/" + file.rsplit("/tunneld/", 1)[1]
    return f"{file}:{line}({name})"


def summarize(st: pstats.Stats, n: int, cpu_us: float, top: int) -> dict[str, Any]:
    rows = []
    for func, (cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"func": _name(func), "calls": nc / n, "prim": cc / n,
                     "tottime_us": tt * 1e6 / n, "cumtime_us": ct * 1e6 / n,
                     "python": func[0] != "~"})
    total_calls = sum(r["calls"] for r in rows)
    py_calls = sum(r["calls"] for r in rows if r["python"])
    return {
        "n": n,
        "calls_per_conn": total_calls,
        "python_function_calls_per_conn": py_calls,
        "builtin_calls_per_conn": total_calls - py_calls,
        "profiled_cpu_us_per_conn": cpu_us,
        "top_tottime": sorted(rows, key=lambda r: -r["tottime_us"])[:top],
        "top_calls": sorted(rows, key=lambda r: -r["calls"])[:top],
        "all": sorted(rows, key=lambda r: -r["calls"]),
    }


def opcodes(table: dict[str, list[int]], n: int, top: int) -> dict[str, Any]:
    rows = [{"func": _name(tuple(_split(k))), "calls": c / n, "opcodes": o / n}  # type: ignore
            for k, (c, o) in table.items()]
    return {"n": n, "calls_per_conn": sum(r["calls"] for r in rows),
            "opcodes_per_conn": sum(r["opcodes"] for r in rows),
            "top_opcodes": sorted(rows, key=lambda r: -r["opcodes"])[:top],
            "all": sorted(rows, key=lambda r: -r["opcodes"])}


def _split(key: str) -> tuple[str, int, str]:
    file, rest = key.rsplit(":", 1)
    line, name = rest.split("(", 1)
    return file, int(line), name[:-1]


_METRICS = (("conn_median_ms", "new connection median (ms)"),
            ("conn_p99_ms", "new connection p99 (ms)"),
            ("conn_cpu_us", "CPU per new connection (µs)"),
            ("ping_p50_ms", "ping-pong p50 (ms)"),
            ("ping_p99_ms", "ping-pong p99 (ms)"),
            ("ping_cpu_us", "CPU per round trip (µs)"))


def report(res: dict[str, Any], verbose: bool = False) -> str:
    out = []
    unit = "round trips" if res.get("workload") == "ping" else "new connections"
    t = dict(res.get("timing") or {})
    target_cpu = t.pop("_target_cpu_us", None)
    if t:
        names = list(t)
        out.append(f"## Timing ({res['n']} connections and {res['ping_n']} round trips × "
                   f"{res['rounds']} rounds per path, order rotating; medians of rounds)\n")
        head = ["metric", *names] + [f"{k} ÷ ssh" for k in names[1:]]
        if "base" in t:
            head.append("tunneld ÷ base")
        out.append("| " + " | ".join(head) + " |\n|---|" + "---:|" * (len(head) - 1))
        for key, label in _METRICS:
            row = [label] + [f"{t[k][key]:.3f}" for k in names]
            row += [f"{t[k][key] / t['ssh'][key]:.2f}×" for k in names[1:]]
            if "base" in t:
                row.append(f"{t['tunneld'][key] / t['base'][key]:.2f}×")
            out.append("| " + " | ".join(row) + " |")
        errs = {k: t[k]["errors"] for k in names if t[k]["errors"]}
        out.append(f"\nconnection errors: {errs or 'none'}")
        if target_cpu is not None:
            out.append(f"\nfor scale, the echo target (a uvloop asyncio.Protocol: accept, one "
                       f"read and write, EOF, close) used {target_cpu:.1f} µs of CPU per "
                       "connection\n")
    for name, p in res.get("profile", {}).items():
        out.append(f"## cProfile of {name}, {p['n']} {unit}\n")
        out.append(f"- calls per {unit[:-1]}: {p['calls_per_conn']:.1f} "
                   f"(Python functions {p['python_function_calls_per_conn']:.1f}, "
                   f"builtins/C {p['builtin_calls_per_conn']:.1f})")
        out.append(f"- CPU per {unit[:-1]} with the profiler on: "
                   f"{p['profiled_cpu_us_per_conn']:.0f} µs\n")
        for key, label in (("top_tottime", "by tottime"), ("top_calls", "by calls")):
            out.append(f"### {name}: top {label} (per {unit[:-1]})\n")
            out.append("| calls | tottime µs | cumtime µs | function |\n|---:|---:|---:|---|")
            for r in p[key]:
                out.append(f"| {r['calls']:.2f} | {r['tottime_us']:.2f} | "
                           f"{r['cumtime_us']:.2f} | `{r['func']}` |")
            out.append("")
    for name, g in res.get("gc", {}).items():
        out.append(f"## garbage collector in {name}, {g['n']} {unit} (median "
                   f"{g['median_ms']:.3f} ms, p99 {g['p99_ms']:.3f} ms, "
                   f"{g['cpu_us']:.0f} µs CPU each)\n")
        out.append(json.dumps(g["gc"]) + "\n")
        garbage = res.get("garbage", {}).get(name)
        if garbage is not None:
            out.append(f"objects in cycles (freed only by the collector), per {unit[:-1]}: "
                       f"{sum(garbage.values()):.1f}: " +
                       ", ".join(f"{k} {v:.2f}" for k, v in garbage.items() if v >= 0.01)
                       + "\n")
    for name, p in res.get("opcodes", {}).items():
        out.append(f"## bytecode instructions of {name}, {p['n']} {unit}\n")
        out.append(f"- per {unit[:-1]}: {p['opcodes_per_conn']:.0f} instructions in "
                   f"{p['calls_per_conn']:.1f} Python function calls\n")
        out.append("| calls | instructions | function |\n|---:|---:|---|")
        for r in p["top_opcodes"]:
            out.append(f"| {r['calls']:.2f} | {r['opcodes']:.1f} | `{r['func']}` |")
        out.append("")
    for tool in ("strace", "perf"):
        for key, r in res.get(tool, {}).items():
            if tool == "strace":
                out.append(f"## system calls per {unit[:-1]}, {key} ({r['n']} {unit}): "
                           f"{r['total_per_conn']:.1f}\n")
                out.append(", ".join(f"{k} {v:.2f}" for k, v in r["syscalls_per_conn"].items()
                                     if v >= 0.05) + "\n")
            else:
                out.append(f"## perf: {key}'s CPU by object ({r['n']} {unit}, "
                           f"{r['cpu_us_traced']:.0f} µs each while sampled)\n")
                out.append(", ".join(f"{k} {v:.1f}%" for k, v in
                                     list(r["share_by_dso_pct"].items())[:10]) + "\n")
                if verbose:
                    out.append("\n".join(f"    {x}" for x in r["top_symbols_pct"]) + "\n")
    for name, c in res.get("callgrind", {}).items():
        out.append(f"## callgrind, {name}, {c['n']} {unit}\n")
        out.append(f"- instructions per {unit[:-1]}: {c['instructions_per_conn']:,.0f}")
        for obj, ir in list(c["by_object_per_conn"].items())[:10]:
            out.append(f"  - {obj}: {ir:,.0f}")
        out.append("")
    return "\n".join(out)


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "_daemon":
        return daemon_main(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=500, help="connections per pass (default 500)")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds per path")
    ap.add_argument("--ping-n", type=int, default=2000, help="round trips per ping-pong round")
    ap.add_argument("--base", help="also run a tunneld from this tree (side by side)")
    ap.add_argument("--workload", choices=("conn", "ping"), default="conn",
                    help="what profiles, traces and callgrind measure: -n new connections "
                         "(default), or -n ping-pong round trips on one connection")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--gc", action="store_true",
                    help="the garbage collector's runs during -n connections (no profiler)")
    ap.add_argument("--opcodes", action="store_true",
                    help="bytecode instructions per connection, by function (exact)")
    ap.add_argument("--strace", action="store_true", help="system calls per connection")
    ap.add_argument("--perf", action="store_true", help="CPU share by object (perf record)")
    ap.add_argument("--callgrind", action="store_true", help="instructions per connection")
    ap.add_argument("--callgrind-out", help="copy the callgrind dumps to PREFIX.NAME")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--prof", help="copy the .prof files to PREFIX.NAME.prof")
    ap.add_argument("-v", "--verbose", action="store_true", help="perf: top symbols too")
    args = ap.parse_args()
    h = Harness(args)
    res: dict[str, Any] = {"n": args.n, "rounds": args.rounds, "ping_n": args.ping_n,
                           "workload": args.workload,
                           "load_start": os.getloadavg()}
    try:
        h.setup()
        res["code"] = {k: d.code for k, d in h.daemons.items()}
        if not args.no_timing:
            res["timing"] = h.timing()
        if not args.no_profile:
            res["profile"] = {k: h.profile(d) for k, d in h.daemons.items()}
        if args.gc:
            res["gc"] = {k: h.profile(d, "gc") for k, d in h.daemons.items()}
            res["garbage"] = {k: h.profile(d, "garbage") for k, d in h.daemons.items()}
        if args.opcodes:
            res["opcodes"] = {k: h.profile(d, "opcodes") for k, d in h.daemons.items()}
        if args.strace:
            res["strace"] = h.traced("strace")
        if args.perf:
            res["perf"] = h.traced("perf")
        if args.callgrind:
            res["callgrind"] = {"ssh": h.callgrind(None)}
            res["callgrind"].update({k: h.callgrind(d) for k, d in h.daemons.items()})
    finally:
        h.close()
    res["load_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(report(res, args.verbose))
    print(f"tunneld code: {res.get('code')}")
    print(f"load average (1 min) at start {res['load_start'][0]:.2f}, "
          f"at end {res['load_end'][0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
