"""CPU seconds of every process a command starts, summed by kind (Linux): where `make test`'s CPU goes.

Usage: `python -m nst_testing.cpu_sampler [--every 0.25] [--json FILE] -- make test`. Every `--every` seconds it reads
/proc/*/stat and keeps the last CPU seconds of the command and of every process it starts, down the tree (the rest of
the machine is left out); at the end it prints one JSON line per kind (Prefect servers, flow-run processes, workers,
CLI calls, test processes, ...), most CPU first, then the total. Missed: a process that lives less than one sample, the
last sample of a process's life (at most `--every` seconds each), and one whose parent exited before it was seen.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from nst_testing.prefect import stat_fields

TICK = os.sysconf("SC_CLK_TCK")
KINDS = (  # (what the command line contains, kind): the first match names it
    ("prefect.runner._workspace_supervisor", "flow-run process"),
    ("prefect.engine", "flow-run process"),
    ("server start", "prefect server"),
    ("uvicorn", "prefect server (in-process API)"),
    ("worker start", "prefect worker"),
    ("bin/prefect", "prefect CLI"),
    ("weed server", "SeaweedFS"),
    ("chrom", "chromium"),
    ("exec(eval(sys.stdin", "pytest process (xdist worker)"),
    ("pytest", "pytest process (xdist worker)"),
    ("deploy/setup.py", "deploy/setup.py"),
    ("nst.cli", "nst CLI"),
    ("mypy", "mypy"),
    ("ruff", "ruff"),
    ("pip", "pip"),
)


def kind_of(cmdline: str) -> str:
    """The kind of a process from its command line (`other: <program>` when no rule matches)."""
    for needle, kind in KINDS:
        if needle in cmdline:
            return kind
    return "other: " + Path(cmdline.split(" ", 1)[0]).name if cmdline else "other"


def _read(pid: str) -> tuple[tuple[str, int], str, float] | None:
    """((pid, start time), parent pid, CPU seconds) of a live process, or None once it is gone."""
    if (fields := stat_fields(pid)) is None:
        return None
    return (pid, int(fields[19])), fields[1], (int(fields[11]) + int(fields[12])) / TICK


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class Sampler:
    """Keeps the last CPU seconds and command line of `root` and each descendant seen while its parent was known."""

    def __init__(self, root: int) -> None:
        self.root = str(root)
        self.ours: dict[str, tuple[str, int]] = {}  # pid -> (pid, start time) of the processes counted
        self.cpu: dict[tuple[str, int], float] = {}
        self.cmd: dict[tuple[str, int], str] = {}

    def sample(self) -> None:
        """One pass over /proc: a process is ours if it is the root or its parent is ours (to a fixed point)."""
        seen = {pid: row for pid in os.listdir("/proc") if pid.isdigit() and (row := _read(pid)) is not None}
        self.ours = {pid: key for pid, key in self.ours.items() if pid in seen and seen[pid][0] == key}
        grown = True
        while grown:
            new = {p: r[0] for p, r in seen.items() if p not in self.ours and (p == self.root or r[1] in self.ours)}
            self.ours.update(new)
            grown = bool(new)
        for pid, key in self.ours.items():
            self.cpu[key] = seen[pid][2]
            if not self.cmd.get(key):  # read again until exec has given the process its own command line
                self.cmd[key] = _cmdline(pid)

    def by_kind(self) -> list[dict[str, Any]]:
        """CPU seconds and process count per kind, most CPU first."""
        cpu: dict[str, float] = defaultdict(float)
        count: dict[str, int] = defaultdict(int)
        for key, seconds in self.cpu.items():
            kind = kind_of(self.cmd.get(key, ""))
            cpu[kind] += seconds
            count[kind] += 1
        rows = [{"kind": k, "cpu_s": round(cpu[k], 1), "processes": count[k]} for k in cpu]
        return sorted(rows, key=lambda row: -float(row["cpu_s"]))


def main(argv: list[str] | None = None) -> int:
    """Run the command, sampling; print the JSON summary; exit with the command's status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--every", type=float, default=0.25, help="seconds between samples")
    parser.add_argument("--json", type=Path, default=None, help="also write every process's row to this file")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    began, done = time.monotonic(), threading.Event()
    proc = subprocess.Popen(command)
    sampler = Sampler(proc.pid)

    def loop() -> None:
        while not done.wait(args.every):
            sampler.sample()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    status = proc.wait()
    done.set()
    thread.join()
    rows = sampler.by_kind()
    for row in rows:
        print(json.dumps(row))
    total = round(sum(float(row["cpu_s"]) for row in rows), 1)
    print(json.dumps({"total_cpu_s": total, "wall_s": round(time.monotonic() - began, 1), "status": status}))
    if args.json is not None:
        every = [{"cmd": sampler.cmd.get(k, ""), "cpu_s": c} for k, c in sampler.cpu.items()]
        args.json.write_text(json.dumps(every))
    return status


if __name__ == "__main__":
    sys.exit(main())
