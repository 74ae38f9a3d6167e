"""Fault suite (issue 12) on real parts: SeaweedFS, real runs in other processes, a real Prefect API.

Figures and commands: docs/reliability.md. Faults a real part cannot make on demand are the only stand-ins.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prefect.states import Crashed

import nst.run
import nst.run.batches
from flows.stylize import GPU_SHARDS_LIMIT, SLOT_LEASE_S, stylize_manifest
from nst import storage
from nst.engine.images import sha256_bytes
from nst.run import Batch
from nst.run_options import RunOptions
from nst_testing.paths import REPO, SAMPLES
from nst_testing.prefect import (
    PrefectServer,
    WorkerFactory,
    kill_process_groups,
    process_tree,
    run_setup,
    wait_for_flow_run,
)
from nst_testing.procs import outputs, start
from nst_testing.s3 import (
    S3Server,
    SeaweedFS,
    _wait_writable,
    point_boto3_at,
    s3_settings_of_this_process,
)

pytestmark = pytest.mark.slow

CONTENTS = ["chelsea.jpg", "coffee.jpg", "astronaut.jpg"]
STYLES = ["brick.jpg", "ihc.jpg"]


def put_manifest(root: str, *, iterations: int = 2, name: str = "faults") -> str:
    """Inputs and a grid manifest (3 contents x 2 styles, 32 px) under an S3 prefix; returns the manifest URI."""
    for sub, names in (("content", CONTENTS), ("styles", STYLES)):
        for file in names:
            storage.write_bytes(storage.join(root, f"{sub}/{file}"), (SAMPLES / sub / file).read_bytes())
    text = (
        f"version: 1\nname: {name}\noutput: out/\n"
        f"defaults: {{size: 32, iterations: {iterations}}}\n"
        "grid: {contents: [content/*.jpg], styles: [styles/*.jpg]}\n"
    )
    uri = storage.join(root, f"{name}.yaml")
    storage.write_bytes(uri, text.encode())
    return uri


def outputs_consistent(root: str) -> dict[str, dict[str, Any]]:
    """Every JSON under out/ describes the PNG beside it (sha256); returns the records by pair id."""
    out = storage.join(root, "out/")
    records = {}
    for info in storage.list_prefix(out):
        name = info.uri.rsplit("/", 1)[1]
        if not name.endswith(".json") or "/_runs/" in info.uri:
            continue
        record = json.loads(storage.read_bytes(info.uri))
        if record["status"] == "succeeded":
            png = storage.read_bytes(record["output"]["image"])
            assert record["output"]["image_sha256"] == sha256_bytes(png), info.uri
        records[record["id"]] = record
    leftovers = [i.uri for i in storage.list_prefix(out) if i.uri.endswith((".claim", ".nst-tmp"))]
    assert leftovers == []
    return records


def test_two_runs_of_one_manifest_at_once_with_different_parameters(s3_env: S3Server, s3_bucket: str) -> None:
    """Two `nst run --no-prefect` processes race on the same six pairs: every JSON describes its PNG."""
    root = f"s3://{s3_bucket}/race/"
    manifest = put_manifest(root)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        start([sys.executable, "-m", "nst.cli", "run", manifest, "--no-prefect", "--iterations", str(n)], env)
        for n in (2, 3)
    ]
    outs = outputs(procs)
    records = outputs_consistent(root)
    assert set(records) == {f"{c[:-4]}__{s[:-4]}" for c in CONTENTS for s in STYLES}, outs
    # Each pair ends with one run's consistent result; pairs one run found claimed are done by a rerun of it.
    for n in (2, 3):
        subprocess.run(
            [sys.executable, "-m", "nst.cli", "run", manifest, "--no-prefect", "--iterations", str(n)],
            env=env,
            check=True,
            capture_output=True,
            timeout=600,
        )
        assert {r["params"]["iterations"] for r in outputs_consistent(root).values()} == {n}


@pytest.fixture
def engine_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    """Pair ids of every batch that reached run_batch (it still runs), in order."""
    calls: list[list[str]] = []
    real = nst.run.batches.run_batch

    def run_batch(batch: Batch, **kwargs: Any) -> Any:
        calls.append([p.id for p in batch.pairs])
        if len(calls) == 2:  # write access is revoked while the second batch runs
            deny_writes_now()
        return real(batch, **kwargs)

    monkeypatch.setattr(nst.run.batches, "run_batch", run_batch)
    yield calls


_DENY: list[Any] = []


def deny_writes_now() -> None:
    for action in _DENY:
        action()


@pytest.mark.usefixtures("prefect_harness")
def test_write_access_revoked_halfway(
    s3_env: S3Server, s3_bucket: str, engine_calls: Sequence[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bucket policy denies PutObject mid-run: no batch optimises twice, the flow fails saying access denied."""
    root = f"s3://{s3_bucket}/revoke/"
    manifest = put_manifest(root, name="revoke")
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{s3_bucket}/*"}
        ],
    }
    monkeypatch.setattr(
        sys.modules[__name__],
        "_DENY",
        [lambda: s3_env.client().put_bucket_policy(Bucket=s3_bucket, Policy=json.dumps(policy))],
    )
    options = RunOptions(max_batch_pairs=1, cpu_slots=1, batch_timeout_s=300)
    state = stylize_manifest(manifest, options=options, return_state=True)
    assert state.is_failed()
    assert "access denied" in (state.message or "")
    ids = [i for call in engine_calls for i in call]
    assert len(ids) == len(set(ids)) == 6  # every batch reached run_batch once: no optimisation was retried
    s3_env.client().delete_bucket_policy(Bucket=s3_bucket)
    records = outputs_consistent(root)
    assert len(records) >= 1 and all(r["status"] == "succeeded" for r in records.values())


@pytest.fixture
def own_seaweed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SeaweedFS]:
    """A SeaweedFS of this test's own, which the test stops and restarts; boto3's chain points at it."""
    weed = SeaweedFS(tmp_path / "weed")
    weed.start(timeout=90)
    try:
        _wait_writable(weed.server, time.monotonic() + 90)
        point_boto3_at(weed.server, monkeypatch, tmp_path)
        yield weed
    finally:
        weed.stop()
        storage.reset_clients()


OUTAGE_S = 25.0


def test_s3_outage_mid_run_is_ridden_out(own_seaweed: SeaweedFS) -> None:
    """SeaweedFS is stopped for ~25 s after the first batch and restarted: no pair reported written is missing."""
    bucket = own_seaweed.server.create_bucket()
    root = f"s3://{bucket}/outage/"
    manifest = put_manifest(root, name="outage")
    outage: list[float] = []

    def batch_done(batch: Batch, records: list[nst.run.PairRecord]) -> None:
        if not outage:  # after the first batch: the endpoint goes away, then comes back
            own_seaweed.stop()
            started = time.monotonic()
            threading.Timer(OUTAGE_S, own_seaweed.start).start()
            outage.append(started)

    hooks = nst.run.local_hooks()
    hooks.batch_done = batch_done
    summary = nst.run.run(manifest, RunOptions(max_batch_pairs=1), hooks=hooks)
    assert outage
    statuses = {r.id: r.status for r in summary.records}
    failed = {r.id: (r.error or {}).get("message") for r in summary.records if r.status == "failed"}
    assert all(s in ("succeeded", "failed") for s in statuses.values()), statuses
    assert all("S3" in str(m) or "endpoint" in str(m) for m in failed.values()), failed
    records = outputs_consistent(root)
    for pair_id, status in statuses.items():
        if status == "succeeded":  # reported written: it is there, and describes its PNG
            assert records[pair_id]["status"] == "succeeded"
    assert failed == {}, failed  # the ~25 s outage is ridden out by botocore's and the write retries


def test_worker_sigkilled_mid_run_then_a_rerun_completes_every_pair_once(
    isolated_prefect_server: PrefectServer,
    isolated_process_worker: WorkerFactory,
    s3_env: S3Server,
    s3_bucket: str,
) -> None:
    """A deployment run loses its worker (SIGKILL of worker and flow run) mid-run; a new run finishes the rest once.

    The run is set Crashed through the API at once instead of waiting ~95 s for the heartbeat automation
    (tests/test_zombie.py measures that); the rerun takes over the dead run's claims because its run is final.
    """
    server = isolated_prefect_server
    root = f"s3://{s3_bucket}/kill/"
    manifest = put_manifest(root, iterations=30, name="kill")
    s3 = s3_env.client()
    run_setup(server)  # pools (gpu-pool ...), the gpu-shards limit, the zombie automation
    server.cli("--no-prompt", "deploy", "--name", "stylize-manifest/on-demand", cwd=REPO)
    env = s3_settings_of_this_process()
    worker = isolated_process_worker("gpu-pool", env=env, limit=1)
    options = '{"max_batch_pairs": 2, "cpu_slots": 1}'
    first = _deployment_run(server, manifest, options)

    def out_keys() -> dict[str, str]:
        found = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="kill/out/"):
            for obj in page.get("Contents", []):
                if "/_runs/" not in obj["Key"]:
                    found[obj["Key"].rsplit("/", 1)[1]] = obj["ETag"]
        return found

    deadline = time.monotonic() + 600
    while not any(k.endswith(".json") for k in out_keys()):  # kill once the first pair is written
        assert worker.proc.poll() is None and time.monotonic() < deadline, worker.log_tail()
        time.sleep(0.2)
    kill_process_groups(process_tree(worker.proc.pid))
    worker.proc.wait(timeout=10)
    before = out_keys()
    with server.client() as client:
        client.set_flow_run_state(first, Crashed(message="worker killed (test)"), force=True)
        # A slot the dead run held comes back when its lease lapses (+ the server's 15 s repossessor loop).
        slot_deadline = time.monotonic() + SLOT_LEASE_S + 45
        while client.read_global_concurrency_limit_by_name(GPU_SHARDS_LIMIT).active_slots:
            assert time.monotonic() < slot_deadline, "the dead run's gpu-shards slot was not given back"
            time.sleep(1)
    done_before = {k[: -len(".json")] for k in before if k.endswith(".json")}
    assert 0 < len(done_before) < 6, before

    worker2 = isolated_process_worker("gpu-pool", env=env, limit=1)
    second = _deployment_run(server, manifest, options)
    run = wait_for_flow_run(server, second, timeout=900, worker=worker2)
    assert run.state.is_completed(), run.state.message
    records = outputs_consistent(root)
    after = out_keys()
    ids = {f"{c[:-4]}__{s[:-4]}" for c in CONTENTS for s in STYLES}
    assert sorted(after) == sorted(f"{i}.{ext}" for i in ids for ext in ("json", "png"))  # each exactly once
    # Nothing done before the kill was redone. A pair is done once its JSON is written: the kill may land between a
    # pair's PNG and its JSON, and then that pair is rightly done again (PNG overwritten, a JSON written beside it).
    done_keys = {f"{i}.{ext}" for i in done_before for ext in ("json", "png")}
    assert {k: after[k] for k in done_keys} == {k: before[k] for k in done_keys}
    assert {records[i]["run_id"] for i in ids - done_before} == {str(second)}
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def _deployment_run(server: PrefectServer, manifest: str, options: str) -> str:
    result = server.cli(
        "deployment", "run", "stylize-manifest/on-demand", "-p", f"manifest={manifest}", "-p", f"options={options}"
    )
    match = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
    assert match, result.stdout
    return match.group(1)
