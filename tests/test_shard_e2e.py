"""Sharded runs on several real workers (issue 13): `prefect server start`, deploy/setup.py, `prefect deploy --all`,
three process workers on gpu-pool at `--limit 1`, one on parent-pool, 16 tiny pairs on S3 (SeaweedFS) in 4 shards.

One story, as an operator lives it: `prefect deployment run 'shard-manifest/on-demand' -p manifest=s3://...`; a GPU
worker dies mid-shard (SIGKILL of its process group and its flow run's); the parent ends Failed naming that shard's
pairs; Retry of the parent runs only those pairs; a second Retry, with everything done, runs nothing.

The dead shard is set Crashed through the API, as the heartbeat automation would ~90 s later (tests/test_zombie.py
proves the automation does it; waiting for it here would double this test's time).
"""

import json
import re
import time
from dataclasses import dataclass
from typing import Any

import pytest
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
)
from prefect.states import AwaitingRetry, Crashed

from nst_testing.paths import REPO, SAMPLES
from nst_testing.prefect import (
    PrefectServer,
    Worker,
    WorkerFactory,
    deploy_all,
    kill_process_groups,
    process_tree,
    run_setup,
    wait_for_flow_run,
)
from nst_testing.s3 import S3Server, s3_settings_of_this_process

pytestmark = pytest.mark.slow

STYLES = ("brick", "hubble", "ihc")
# 8 landscape + 8 square pairs; batches of 4 -> 2 + 2 batches -> 4 shards of one batch each, one more than the GPU
# workers (each flow run's process costs ~12 s of CPU: 6 shards proved no more).
PER_CONTENT = {"chelsea": 4, "coffee": 4, "astronaut": 8}  # chelsea and coffee share a shape (32x21); astronaut: square
PAIRS = [f"{c}-{STYLES[k % 3]}-{k}" for c, n in PER_CONTENT.items() for k in range(n)]
SHARDS = 4


def manifest_yaml() -> str:
    lines = ["version: 1", "name: shard-e2e", "output: out/", "defaults: {size: 32, iterations: 3}", "pairs:"]
    for pair_id in PAIRS:
        content, style, _ = pair_id.split("-")
        lines.append(f"  - {{id: {pair_id}, content: content/{content}.jpg, style: styles/{style}.jpg}}")
    return "\n".join(lines) + "\n"


def worker_name(worker: Worker) -> str:
    """The name nst_testing.prefect.start_process_worker gives a worker (`test-<its home>`)."""
    return f"test-{worker.log.parent.name}"


def children(server: PrefectServer, parent_id: str) -> list[Any]:
    with server.client() as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
        )


def parent_artifacts(server: PrefectServer, parent_id: str) -> dict[str, Any]:
    """The parent's own artifacts by key: table rows (a list) or markdown (a string)."""
    with server.client() as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[parent_id]))
        )
    data = {a.key: a.data for a in found if a.key}
    return {k: json.loads(v) if isinstance(v, str) and v.startswith("[") else v for k, v in data.items()}


@dataclass
class Bucket:
    """The test's S3 bucket: inputs uploaded, JSON read back, the outputs listed."""

    s3: Any
    name: str

    def upload_inputs(self) -> str:
        """The contents, the styles and the manifest; the manifest's URI."""
        files = [(f"content/{c}.jpg", SAMPLES / "content" / f"{c}.jpg") for c in PER_CONTENT]
        files += [(f"styles/{s}.jpg", SAMPLES / "styles" / f"{s}.jpg") for s in STYLES]
        for key, path in files:
            self.s3.put_object(Bucket=self.name, Key=key, Body=path.read_bytes())
        self.s3.put_object(Bucket=self.name, Key="manifest.yaml", Body=manifest_yaml().encode())
        return f"s3://{self.name}/manifest.yaml"

    def get_json(self, key: str) -> dict[str, Any]:
        return json.loads(self.s3.get_object(Bucket=self.name, Key=key)["Body"].read())

    def outputs(self) -> dict[str, tuple[str, Any]]:
        """Every object under out/ except run summaries: key -> (ETag, LastModified)."""
        found = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix="out/"):
            for obj in page.get("Contents", []):
                if not obj["Key"].startswith("out/_runs/"):
                    found[obj["Key"]] = (obj["ETag"], obj["LastModified"])
        return found

    def statuses(self, parent_id: str) -> dict[str, str]:
        """Each pair's status in the parent's run summary."""
        return {p["id"]: p["status"] for p in self.get_json(f"out/_runs/{parent_id}.json")["pairs"]}


def start_sharded_run(server: PrefectServer, manifest_uri: str) -> str:
    """The documented command, on a manifest in S3; the parent flow run's id."""
    options = ["-p", f"manifest={manifest_uri}", "-p", f"shards={SHARDS}", "-p", 'options={"max_batch_pairs": 4}']
    result = server.cli("deployment", "run", "shard-manifest/on-demand", *options)
    match = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
    assert match, result.stdout
    return match.group(1)


def kill_a_running_shard(server: PrefectServer, parent_id: str, gpu_workers: list[Worker], parent: Worker) -> list[str]:
    """The first shard seen Running loses its worker and its own process group, and is set Crashed; its pairs."""
    deadline = time.monotonic() + 300
    victim_run = None
    while victim_run is None:
        running = [c for c in children(server, parent_id) if c.state and c.state.is_running() and c.infrastructure_pid]
        if running:
            victim_run = running[0]
        else:
            assert time.monotonic() < deadline, f"no shard running\n{parent.log_tail()}"
            time.sleep(0.2)
    pid = int(str(victim_run.infrastructure_pid).rsplit(":", 1)[-1])
    victim = next(w for w in gpu_workers if pid in process_tree(w.proc.pid))
    kill_process_groups(process_tree(victim.proc.pid))
    victim.proc.wait(timeout=10)
    with server.client() as client:
        client.set_flow_run_state(victim_run.id, Crashed(message="worker killed (test)"), force=True)
    return sorted(victim_run.parameters["options"]["pair_ids"])


def check_one_report(server: PrefectServer, bucket: Bucket, parent_id: str, victim_pairs: list[str]) -> None:
    """One report for the whole run: every pair in the table; the markdown names the dead shard's pairs, all shards."""
    reports = parent_artifacts(server, parent_id)
    assert sorted(row["id"] for row in reports["shard-e2e-pairs"]) == sorted(PAIRS)
    markdown = str(reports["shard-e2e-report"]).replace("\\", "")  # ids as text, markdown escapes removed
    failed_section = markdown.split("## Failed pairs", 1)[1].split("##", 1)[0]
    assert all(p in failed_section for p in victim_pairs), failed_section
    assert markdown.count("| shard-e2e-shard-") == SHARDS
    assert bucket.s3.head_object(Bucket=bucket.name, Key=f"out/_runs/{parent_id}-losses.png")["ContentLength"] > 0


def test_sharded_run_survives_a_killed_worker_and_retry_redoes_nothing_done(
    isolated_prefect_server: PrefectServer,
    isolated_process_worker: WorkerFactory,
    s3_env: S3Server,
    s3_bucket: str,
) -> None:
    server = isolated_prefect_server
    bucket = Bucket(s3_env.client(), s3_bucket)
    manifest_uri = bucket.upload_inputs()
    run_setup(server, "--gpu-shards", "3")  # pools, the gpu-shards limit, the zombie automation
    out = deploy_all(server, REPO)
    assert "shard-manifest/on-demand" in out, out
    env = s3_settings_of_this_process()
    gpu_workers = [isolated_process_worker("gpu-pool", env=env, limit=1) for _ in range(3)]
    parent_worker = isolated_process_worker("parent-pool", env=env)

    # 1-2. The documented command; a GPU worker dies mid-shard; the parent ends Failed naming that shard's pairs.
    parent_id = start_sharded_run(server, manifest_uri)
    victim_pairs = kill_a_running_shard(server, parent_id, gpu_workers, parent_worker)
    run = wait_for_flow_run(server, parent_id, timeout=600, worker=parent_worker)
    first = children(server, parent_id)
    assert len(first) == SHARDS
    assert all({"nst", "shard"} <= set(c.tags) for c in first)  # the zombie automation watches `nst` runs
    assert sorted(len(c.parameters["options"]["pair_ids"]) for c in first) == [4] * SHARDS
    assert run.state.is_failed(), run.state.message
    assert all(p in (run.state.message or "") for p in victim_pairs), run.state.message
    statuses = bucket.statuses(parent_id)
    assert sorted(statuses) == sorted(PAIRS)
    assert sorted(p for p, s in statuses.items() if s != "succeeded") == victim_pairs
    shards = bucket.get_json(f"out/_runs/{parent_id}.json")["shards"]
    assert {s["state"] for s in shards} == {"Completed", "Crashed"} and len(shards) == SHARDS
    check_one_report(server, bucket, parent_id, victim_pairs)
    before = bucket.outputs()
    done_keys = {k for k in before if k.rsplit("/", 1)[1].rsplit(".", 1)[0] not in victim_pairs}
    assert len(done_keys) == 2 * (len(PAIRS) - len(victim_pairs))

    # 3. Retry of the parent (what the UI's Retry sends): one new shard, with only the dead shard's pairs.
    with server.client() as client:
        assert client.set_flow_run_state(parent_id, AwaitingRetry()).status.value == "ACCEPT"
    run = wait_for_flow_run(server, parent_id, timeout=600, after_run_count=run.run_count, worker=parent_worker)
    assert run.state.is_completed(), run.state.message
    second = [c for c in children(server, parent_id) if c.id not in {f.id for f in first}]
    assert [sorted(c.parameters["options"]["pair_ids"]) for c in second] == [victim_pairs]
    assert second[0].state.is_completed()
    after = bucket.outputs()
    assert {k: after[k] for k in done_keys} == {k: before[k] for k in done_keys}  # not one done pair redone
    assert sorted(after) == sorted(f"out/{p}.{ext}" for p in PAIRS for ext in ("json", "png"))  # each exactly once
    statuses = bucket.statuses(parent_id)
    assert sorted(statuses) == sorted(PAIRS)
    assert sorted(p for p, s in statuses.items() if s == "succeeded") == victim_pairs
    records = {p: bucket.get_json(f"out/{p}.json") for p in PAIRS}
    assert all(r["status"] == "succeeded" and r["host"] for r in records.values())
    assert {records[p]["run_id"] for p in victim_pairs} == {str(second[0].id)}
    used = {r["worker"] for r in records.values()}
    assert used <= {worker_name(w) for w in gpu_workers} and len(used) >= 2, used

    # 4. Retry of a parent whose shards all succeeded: no child run, nothing written.
    with server.client() as client:
        assert client.set_flow_run_state(parent_id, AwaitingRetry(), force=True).status.value == "ACCEPT"
    run = wait_for_flow_run(server, parent_id, timeout=300, after_run_count=run.run_count, worker=parent_worker)
    assert run.state.is_completed(), run.state.message
    assert len(children(server, parent_id)) == SHARDS + 1
    assert bucket.outputs() == after
    assert bucket.get_json(f"out/_runs/{parent_id}.json")["counts"] == {"skipped": len(PAIRS)}
    # 5. The parent ended Failed in step 2 by our own hand: its worker logged that message, not an engine traceback.
    assert "Traceback" not in parent_worker.log.read_text(errors="replace"), parent_worker.log_tail()
