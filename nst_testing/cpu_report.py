"""A pytest plugin that writes each test's wall and CPU seconds, its servers and subprocesses included (Linux).

Usage: `pytest -p nst_testing.cpu_report --cpu-report=PATH ...`. CPU is this process plus every live descendant
(with what they reaped) plus what this process reaped, read from /proc; idle servers count where they idle.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Generator

import pytest

from nst_testing.prefect import process_tree, stat_fields

TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """CPU seconds of a live process with the children it reaped (/proc stat fields 14-17); 0 once it is gone."""
    fields = stat_fields(pid)
    return 0.0 if fields is None else sum(int(f) for f in fields[11:15]) / TICK


def cpu_now() -> float:
    """CPU seconds used so far by this process and everything it started."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    live = sum(_cpu(pid) for pid in process_tree(os.getpid())[1:])
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime + live


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
