"""nst_testing/cpu_sampler.py: the per-kind CPU meter behind docs/bench/test-durations.txt."""

import json
import subprocess
import sys
import threading

import pytest

from nst_testing.cpu_sampler import kind_of, main

BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6:\n    pass\n"


def test_kinds_are_named_from_the_command_line() -> None:
    assert kind_of("/v/bin/python /v/bin/prefect server start --host 127.0.0.1") == "prefect server"
    assert kind_of("/v/bin/python -m prefect.runner._workspace_supervisor s.json") == "flow-run process"
    assert kind_of("/v/bin/python /v/bin/prefect worker start --pool gpu-pool") == "prefect worker"
    assert kind_of("/v/bin/python /v/bin/prefect --no-prompt deploy --all") == "prefect CLI"
    assert kind_of("/usr/bin/make test") == "other: make" and kind_of("") == "other"


def test_the_cpu_of_what_the_command_starts_is_counted(capsys: pytest.CaptureFixture[str]) -> None:
    """The command and its grandchild are counted; a process started beside it (here by this test) is not."""
    beside = threading.Timer(0.1, subprocess.run, args=([sys.executable, "-c", BUSY],))
    beside.start()
    assert (
        main(
            [
                "--every",
                "0.05",
                "--",
                sys.executable,
                "-c",
                f"import subprocess, sys; subprocess.run([sys.executable, '-c', {BUSY!r}])",
            ]
        )
        == 0
    )
    beside.join()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    total = rows[-1]
    assert total["status"] == 0 and 0.4 <= total["total_cpu_s"] <= 5.0, rows
    assert sum(row["processes"] for row in rows[:-1]) == 2  # the command and the grandchild it started


def test_the_commands_exit_status_is_passed_on(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--", sys.executable, "-c", "raise SystemExit(3)"]) == 3
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["status"] == 3
