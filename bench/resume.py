#!/usr/bin/env python3
"""What a resumable forward (``--resume``) costs: bulk throughput both ways, new-connection
time, ping-pong round trips and CPU, through ``ssh -L``, a plain tunneld forward and a
resumable one, side by side in one run against the same sshd and targets (bench/run.py's
machinery, aes128-gcm).  Writes bench/results-resume.md (and .json).

    python bench/resume.py [--mb 100] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run as R  # noqa: E402  (bench/run.py: the paths, the measurements)


class ResumePath(R.TunneldPath):
    """tunneld's resumable forwards to the same targets."""

    def __init__(self, bench: R.Bench, daemon: R.Tunneld) -> None:
        super().__init__(bench, daemon, "gcm")
        self.key = "tunneld-resume"

    def start(self) -> None:
        t = self.b.targets
        if not self.ports:
            self.ports = {k: R.S.free_port() for k in t}
        self.d.ctl("add", self.alias, "--resume",
                   *(f"{self.ports[k]}:{R.TARGET_HOST}:{t[k]}" for k in t))
        self.d.wait_connected([self.alias])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:   # the relay starts with the first link
            try:
                R.echo_once(R.LOCAL, self.ports["echo"], 10)
                return
            except OSError:
                time.sleep(0.2)
        R.echo_once(R.LOCAL, self.ports["echo"], 10)


def measure(path: R.Path_, mb: int, conn_n: int, ping_n: int) -> dict[str, float]:
    host, ports = R.LOCAL, path.ports
    pids = path.pids() or []
    relays: list[int] = []
    if isinstance(path, ResumePath):   # the keeper works here too; the relay on the server
        keepers, relays = _resume_pids(path)
        pids = pids + keepers
    cpu0, rcpu0 = R.cpu_seconds(pids), R.cpu_seconds(relays) if relays else 0.0
    down = R.bulk_download(host, ports["source"], mb * R.MB)
    up = R.bulk_upload(host, ports["sink"], mb * R.MB)
    cpu1, rcpu1 = R.cpu_seconds(pids), R.cpu_seconds(relays) if relays else 0.0
    conn = R.new_conn_latency(host, ports["echo"], conn_n)
    ping = R.ping_pong(host, ports["echo"], ping_n)
    return {"down": down, "up": up, "conn_ms": conn["median_ms"],
            "conn_p99_ms": conn["p99_ms"], "ping_p99_ms": ping["p99_ms"],
            "cpu_per_100mb": (cpu1 - cpu0) / (2 * mb) * 100 if cpu0 is not None and
            cpu1 is not None else float("nan"),
            "relay_cpu_per_100mb": (rcpu1 - rcpu0) / (2 * mb) * 100
            if rcpu0 is not None and rcpu1 is not None else float("nan")}


def _resume_pids(path: ResumePath) -> tuple[list[int], list[int]]:
    """The keepers' pids (this machine) and the relays' (the server: here, the same one)."""
    keepers, relays = set(), set()
    for h in json.loads(path.d.ctl("list", "--json").stdout)["hosts"]:
        for f in h["forwards"]:
            r = f.get("resume") or {}
            if r.get("keeper_pid"):
                keepers.add(int(r["keeper_pid"]))
            rp = r.get("relay_path")
            if rp:
                try:
                    relays.add(int((Path(rp).parent / "pid").read_text()))
                except (OSError, ValueError):
                    pass
    return sorted(keepers), sorted(relays)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--conn", type=int, default=300)
    ap.add_argument("--ping", type=int, default=1000)
    a = ap.parse_args()
    b = R.Bench(R.QUICK, quick=True, keep=False, long_only=True)
    rows: dict[str, list[dict[str, float]]] = {}
    try:
        b.setup()
        paths: list[R.Path_] = [R.SshL(b, "gcm"), R.TunneldPath(b, b.daemon, "gcm"),
                                ResumePath(b, b.daemon)]
        for p in paths:
            p.start()
        for rep in range(a.reps):   # interleaved: each round measures every path
            for p in paths:
                R.log(f"round {rep + 1}/{a.reps}: {p.key}")
                rows.setdefault(p.key, []).append(measure(p, a.mb, a.conn, a.ping))
        for p in paths:
            p.stop()
    finally:
        b.stack.close()
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()}
    (BENCH / "results-resume.json").write_text(json.dumps({"rows": rows, "median": med},
                                                          indent=1))
    ssh, plain, res = med["ssh-gcm"], med["tunneld-gcm"], med["tunneld-resume"]
    lines = [
        "# Resumable forwards: what the relay costs", "",
        f"`python bench/resume.py --mb {a.mb} --reps {a.reps}` on {time.strftime('%Y-%m-%d')}: "
        f"loopback, aes128-gcm, medians of {a.reps} interleaved rounds. CPU: the seconds this "
        "machine's processes of the path spend per 100 MB moved (ssh; tunneld; tunneld and the "
        "keeper), sshd not counted; the relay's, on the server, is its own row.",
        "", "| | ssh -L | tunneld | tunneld --resume | resume ÷ tunneld | resume ÷ ssh -L |",
        "|---|---:|---:|---:|---:|---:|"]
    for m, label in (("down", "download MB/s"), ("up", "upload MB/s"),
                     ("conn_ms", "new connection, median ms"),
                     ("conn_p99_ms", "new connection, p99 ms"),
                     ("ping_p99_ms", "ping-pong p99 ms"),
                     ("cpu_per_100mb", "CPU s per 100 MB, here")):
        lines.append(f"| {label} | {ssh[m]:.3g} | {plain[m]:.3g} | {res[m]:.3g} | "
                     f"{res[m] / plain[m]:.2f}× | {res[m] / ssh[m]:.2f}× |")
    lines.append(f"| the relay's CPU s per 100 MB, on the server | | | "
                 f"{res['relay_cpu_per_100mb']:.3g} | | |")
    (BENCH / "results-resume.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
