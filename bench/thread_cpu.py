"""CPU per thread of a running worker, from /proc: what py-spy cannot tell apart.

py-spy counts a thread waiting for the GIL as busy, so its samples do not say how much CPU faust's
consumer thread really uses. This reads ``/proc/PID/task/*/stat`` and ``status`` every
``--interval`` seconds and prints, per thread with CPU in the interval, the cores it used (user and
system) and its voluntary and involuntary context switches per second, until the process exits.
Without ``--pid`` it waits for a ``python -m streams worker`` process to appear, so it can be
started before a benchmark:

    python bench/thread_cpu.py > threads.txt &
    python bench/end_to_end.py --model artifacts/taobao-slice --rates 1000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from worker_throughput import cpu_times


class Sample(NamedTuple):
    name: str
    user: float  # seconds
    system: float
    voluntary: int  # context switches
    involuntary: int


def find_worker() -> int | None:
    """The pid of a ``python -m streams worker`` process, if one runs."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"streams" in args and b"worker" in args:
            return int(cmdline.parent.name)
    return None


def sample(pid: int) -> dict[int, Sample]:
    """Each thread's CPU and context switches so far (threads that end meanwhile are skipped)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            user, system = cpu_times(task / "stat")
            name = (task / "comm").read_text().strip()
            status = (task / "status").read_text().splitlines()
        except OSError:
            continue
        switches = {k: int(v) for k, _, v in (line.partition(":") for line in status) if "ctxt_switches" in k}
        out[int(task.name)] = Sample(
            name,
            user,
            system,
            switches.get("voluntary_ctxt_switches", 0),
            switches.get("nonvoluntary_ctxt_switches", 0),
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pid", type=int, help="the process to watch (default: the first worker to start)")
    ap.add_argument("--interval", type=float, default=5.0)
    args = ap.parse_args()
    pid = args.pid
    while pid is None:
        pid = find_worker()
        if pid is None:
            time.sleep(0.5)
    print(f"pid {pid}: per thread, cores used (user + system) and context switches per second", flush=True)
    start = time.monotonic()
    before = sample(pid)
    while Path(f"/proc/{pid}").exists():
        time.sleep(args.interval)
        try:
            now = sample(pid)
        except OSError:  # the process ended between the check and the read
            break
        cells = []
        for tid, s in sorted(now.items()):
            b = before.get(tid, Sample(s.name, 0.0, 0.0, 0, 0))
            user, system = (s.user - b.user) / args.interval, (s.system - b.system) / args.interval
            if user + system < 0.01:
                continue
            who = "main" if tid == pid else f"{s.name}/{tid}"
            cells.append(
                f"{who} {user + system:.2f} (user {user:.2f}, sys {system:.2f}; "
                f"switches {(s.voluntary - b.voluntary) / args.interval:.0f} vol, "
                f"{(s.involuntary - b.involuntary) / args.interval:.0f} invol)"
            )
        print(f"{time.monotonic() - start:6.0f} s  " + "; ".join(cells), flush=True)
        before = now


if __name__ == "__main__":
    main()
