"""How long `plan` takes to read a rerun's existing records from S3: one thread against the run path's READ_THREADS.

    python -m bench.plan_records --records 2000 --rtt-ms 15

Real SeaweedFS on localhost; `--rtt-ms` adds a sleep before each HTTP response is read, standing in for the network
round trip to a remote S3 (same-region AWS S3 GETs take ~10-20 ms). Prints one JSON line per repeat.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nst import pipeline, storage  # after the repository root is on the path
from tests.fixtures.s3 import running_seaweedfs, s3_environment


def with_round_trip(seconds: float) -> None:
    """Every HTTP response (boto3's included) waits `seconds` first, like a remote server."""
    original = http.client.HTTPConnection.getresponse

    def getresponse(self: http.client.HTTPConnection, *args: Any, **kwargs: Any) -> http.client.HTTPResponse:
        time.sleep(seconds)
        return original(self, *args, **kwargs)

    http.client.HTTPConnection.getresponse = getresponse  # type: ignore[method-assign]


def timed_read(output: str, ids: list[str], threads: int) -> tuple[float, int]:
    """Seconds for `_existing_records` with `threads` readers, and how many records it found."""
    pipeline.READ_THREADS, saved = threads, pipeline.READ_THREADS
    try:
        start = time.perf_counter()
        found, _ = pipeline._existing_records(output, ids)
        return time.perf_counter() - start, len(found)
    finally:
        pipeline.READ_THREADS = saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--rtt-ms", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    threads = pipeline.READ_THREADS
    with tempfile.TemporaryDirectory(prefix="nst-plan-records-") as scratch, running_seaweedfs(Path(scratch)) as s3:
        for name, value in s3_environment(s3, Path(scratch)).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        storage.reset_clients()
        output = f"s3://{s3.create_bucket()}/out/"
        ids = [f"pair{i:06d}" for i in range(args.records)]
        record = json.dumps({"status": "succeeded"}).encode()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda i: storage.write_bytes(pipeline.output_uris(output, i)[1], record), ids))
        with_round_trip(args.rtt_ms / 1000)
        for repeat in range(1, args.repeats + 1):
            one, found_one = timed_read(output, ids, 1)
            many, found_many = timed_read(output, ids, threads)
            assert found_one == found_many == args.records, (found_one, found_many)
            row = {
                "bench": "plan_records",
                "repeat": repeat,
                "records": args.records,
                "added_rtt_ms": args.rtt_ms,
                "one_thread_s": round(one, 2),
                "threads": threads,
                "threads_s": round(many, 2),
                "speedup": round(one / many, 1),
            }
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
