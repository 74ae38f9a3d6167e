"""Race helpers: a jittery `os` for `LocalStore` (scheduling stretched on demand), claim racers for processes, and
`nst` with a counting engine (`python -m nst_testing.races run ...`) for concurrent runs.

A real scheduler rarely pauses a process between two system calls for long; `JitteryOS` makes such pauses common, so
a window between a check and an act (or a name left empty for an instant) is hit within seconds, not months.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

from nst import storage
from nst.errors import StorageError

# `python -m nst_testing.races`: the file each optimisation is logged to (one line `<pid> <pair id>`), and how long
# one pair's optimisation takes.
SPY_LOG_ENV = "NST_RACE_SPY_LOG"
PAIR_SECONDS_ENV = "NST_RACE_PAIR_SECONDS"
# The calls that change a name: a random pause before each one.
NAME_CHANGES = frozenset({"rename", "replace", "link", "unlink"})


class JitteryOS:
    """`os` for one module, with a random pause of up to `max_pause_s` before each call that changes a name."""

    def __init__(self, max_pause_s: float, seed: int) -> None:
        self._max = max_pause_s
        self._rng = random.Random(seed)

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name not in NAME_CHANGES:
            return real

        def paused(*args: Any, **kwargs: Any) -> Any:
            time.sleep(self._rng.uniform(0, self._max))
            return real(*args, **kwargs)

        return paused


def jitter_local_store(max_pause_s: float, seed: int) -> None:
    """Give `LocalStore` (in this process) a `JitteryOS` for `os`."""
    import nst.storage.local

    vars(nst.storage.local)["os"] = JitteryOS(max_pause_s, seed)


def claim_racer(output: str, pair_ids: list[str], racer: int, max_pause_s: float, barrier: Any, results: Any) -> None:
    """In a process: with a jittery `os` under `LocalStore`, claim every pair once; put (racer, claim URIs won) on
    `results`.

    All racers go through the pairs in one order, so each claim is contended by all of them at about once.
    """
    from nst.run.claims import claim_pair
    from nst.run.layout import claim_uri

    jitter_local_store(max_pause_s, seed=racer)
    barrier.wait()
    won = [claim_uri(output, i) for i in pair_ids if claim_pair(output, i, racer_run_id(racer)) is None]
    results.put((racer, won))


def delete_create_racer(
    lapsed: list[storage.ObjectInfo], racer: int, max_pause_s: float, barrier: Any, results: Any
) -> None:
    """In a process with a jittery `os` under `LocalStore`: an even racer deletes each lapsed version
    (`delete(expected=)`), an odd one `create_new`s each name as soon as it is free; put (racer, URIs created)."""
    deleter = racer % 2 == 0
    jitter_local_store(max_pause_s * (3 if deleter else 0.3), seed=racer)  # slow deleters, quick creators
    barrier.wait()
    created = []
    for info in lapsed:
        if deleter:
            storage.delete(info.uri, expected=info)
        elif _create_once_free(info, racer_run_id(racer).encode()):
            created.append(info.uri)
    results.put((racer, created))


def _create_once_free(lapsed: storage.ObjectInfo, body: bytes) -> bool:
    """Try `create_new` until it succeeds (True) or the name holds another version than `lapsed` (False)."""
    while storage.create_new(lapsed.uri, body) is None:
        with contextlib.suppress(StorageError):
            if not storage.stat(lapsed.uri).same_version(lapsed):
                return False
        time.sleep(0.0005)
    return True


def racer_run_id(racer: int) -> str:
    """The run id racer number `racer` claims with."""
    return f"racer-{racer}"


class CountingEngine:
    """Stands in for the engine's `Stylizer` in a real `nst run` process: each pair takes $NST_RACE_PAIR_SECONDS, is
    logged to $NST_RACE_SPY_LOG, and succeeds with its content image at `size` px (weights hashed, never loaded)."""

    def __init__(self, read_bytes: Any = None) -> None:
        self.read_bytes = read_bytes

    def stylize(self, jobs: Sequence[Any], **kwargs: Any) -> list[Any]:
        """One succeeded result per job, each logged once its `optimisation` is over."""
        from nst.engine.images import resize_long_side
        from nst.engine.pairs import PairResult
        from nst.engine.weights import WeightsInfo, weights_digest

        results = []
        for job in jobs:
            time.sleep(float(os.environ.get(PAIR_SECONDS_ENV, "0")))
            p = job.params
            sha = weights_digest(p.network, p.weights, read_bytes=self.read_bytes)
            weights = WeightsInfo(f"fake:{p.weights or 'default'}", sha, p.network, "caffe")
            image = resize_long_side(job.content, p.size)
            results.append(PairResult(job.id, "succeeded", p, image, {"total": 0.0}, [], p.iterations, weights=weights))
            with open(os.environ[SPY_LOG_ENV], "a") as log:  # one short append: lines of processes never interleave
                log.write(f"{os.getpid()} {job.id}\n")
        return results


def main(argv: Sequence[str]) -> int:
    """`nst ARGV` with `CountingEngine` as the engine."""
    import nst.engine.stylizer
    from nst.cli import main as nst_main

    vars(nst.engine.stylizer)["Stylizer"] = CountingEngine
    return nst_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
