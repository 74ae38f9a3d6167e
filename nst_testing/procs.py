"""Processes a test starts side by side and waits for together."""

import subprocess
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.context import ForkServerContext, SpawnContext
from typing import Any


def start(command: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[str]:
    """Start `command` with `env`, stdout and stderr together in one text pipe."""
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def outputs(procs: Sequence[subprocess.Popen[str]], timeout: float = 600) -> list[str]:
    """Each process's output once it exits (up to `timeout` s each); any still running when this returns or raises is
    killed and reaped."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def race(
    ctx: SpawnContext | ForkServerContext,
    racers: int,
    target: Callable[..., None],
    args_of: Callable[[int, Any, Any], tuple[object, ...]],
) -> dict[Any, Any]:
    """Run `target(*args_of(racer, barrier, results))` in `racers` processes sharing one barrier and one queue; the
    (key, value) pairs they put on the queue, once every process exited 0 (any left after a failure is killed)."""
    barrier, results = ctx.Barrier(racers), ctx.Queue()
    procs = [ctx.Process(target=target, args=args_of(racer, barrier, results)) for racer in range(racers)]
    try:
        for proc in procs:
            proc.start()
        got = dict(results.get(timeout=120) for _ in procs)
        for proc in procs:
            proc.join(timeout=60)
        assert [proc.exitcode for proc in procs] == [0] * racers
        return got
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
