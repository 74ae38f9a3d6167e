"""A pytest plugin that writes each test's wall and CPU seconds, its servers and subprocesses included (Linux).

Usage: `pytest -p nst_testing.cpu_report --cpu-report=PATH ...`. CPU is this process plus every live descendant
(with what they reaped) plus what this process reaped, read from /proc; idle servers count where they idle.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Generator
from pathlib import Path

import pytest

TICK = os.sysconf("SC_CLK_TCK")


def _descendants_cpu(root: int) -> float:
    """CPU seconds of the live descendants of `root`, each with the children it reaped (/proc stat fields 14-17)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        cpu[pid] = sum(int(f) for f in fields[11:15]) / TICK
    total, frontier = 0.0, {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
        total += sum(cpu[pid] for pid in frontier)
    return total


def cpu_now() -> float:
    """CPU seconds used so far by this process and everything it started."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime + _descendants_cpu(os.getpid())


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cpu-report", default=None, help="write each test's wall and CPU seconds to this file")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    path = item.config.getoption("--cpu-report")
    if not path:
        yield
        return
    wall, cpu = time.monotonic(), cpu_now()
    yield
    line = f"{time.monotonic() - wall:9.2f} {cpu_now() - cpu:9.2f} {item.nodeid}\n"
    with open(path, "a", encoding="utf-8") as report:
        report.write(line)
