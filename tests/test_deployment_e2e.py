"""End to end, as a user works: `prefect server start`, a work pool, `prefect deploy --all` from the repository,
a process worker, `prefect deployment run` on a manifest in S3 (SeaweedFS), then a failed pair fixed and retried.
"""

import json
import re
from typing import Any

import pytest
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.states import AwaitingRetry

from nst.params import StyleParams
from nst.run_options import RunOptions
from nst_testing.paths import REPO, SAMPLES
from nst_testing.prefect import PrefectServer, Worker, WorkerFactory, deploy_all, wait_for_flow_run
from nst_testing.s3 import S3Server, s3_settings_of_this_process

pytestmark = pytest.mark.slow

MANIFEST = """\
version: 1
name: e2e-s3
output: out/
defaults: {size: 32, iterations: 2}
pairs:
  - {id: cat, content: content/chelsea.jpg, style: styles/brick.jpg}
  - {id: coffee, content: content/coffee.jpg, style: styles/hubble.jpg}
  - {id: astronaut, content: content/astronaut.jpg, style: styles/ihc.jpg}
"""


IMAGES = {
    f"{kind}/{name}.jpg": SAMPLES / kind / f"{name}.jpg"
    for kind, names in (("content", ("chelsea", "coffee", "astronaut")), ("styles", ("brick", "hubble", "ihc")))
    for name in names
}


def deploy(server: PrefectServer) -> None:
    """Deploy every deployment of prefect.yaml from the repository root; the nightly one as prefect.yaml says."""
    out = deploy_all(server, REPO)
    assert "stylize-manifest/on-demand" in out and "stylize-manifest/nightly" in out, out
    with server.client() as client:
        nightly = client.read_deployment_by_name("stylize-manifest/nightly")
    assert nightly.parameters == {"manifest": "manifests/nightly.yaml"}
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]  # type: ignore[union-attr]
    assert nightly.schedules[0].schedule.timezone == "UTC"  # type: ignore[union-attr]
    assert nightly.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]


def run_deployment_cli(server: PrefectServer, *params: str) -> str:
    """`prefect deployment run 'stylize-manifest/on-demand' -p ...`; returns the flow run id it printed."""
    args = [a for p in params for a in ("-p", p)]
    out = server.cli("deployment", "run", "stylize-manifest/on-demand", *args).stdout
    match = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert match, out
    return match.group(1)


def task_runs(server: PrefectServer, flow_run_id: str) -> list[Any]:
    with server.client() as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_deployed_flow_on_s3_then_fix_and_retry_the_failed_pair(
    prefect_server: PrefectServer, process_worker: WorkerFactory, s3_env: S3Server, s3_bucket: str
) -> None:
    s3 = s3_env.client()
    for key, path in IMAGES.items():
        s3.put_object(Bucket=s3_bucket, Key=key, Body=path.read_bytes())
    s3.put_object(Bucket=s3_bucket, Key="manifest.yaml", Body=MANIFEST.encode())
    manifest_uri = f"s3://{s3_bucket}/manifest.yaml"

    def get_json(key: str) -> dict[str, Any]:
        return json.loads(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())

    deploy(prefect_server)
    worker = process_worker("gpu-pool", env=s3_settings_of_this_process())

    # 1. A clean run: every pair written to the bucket.
    first = run_deployment_cli(prefect_server, f"manifest={manifest_uri}")
    run = wait_for_flow_run(prefect_server, first, worker=worker)
    assert run.state.is_completed(), run.state.message
    for pair in ("cat", "coffee", "astronaut"):
        rec = get_json(f"out/{pair}.json")
        assert rec["status"] == "succeeded" and rec["run_id"] == first
        assert rec["inputs"]["content"]["uri"].startswith(f"s3://{s3_bucket}/content/")
        assert s3.head_object(Bucket=s3_bucket, Key=f"out/{pair}.png")["ContentLength"] > 0
    assert get_json(f"out/_runs/{first}.json")["counts"] == {"succeeded": 3}

    # 2. One input goes bad: the next run skips the unchanged pairs, and fails on that one.
    s3.put_object(Bucket=s3_bucket, Key="content/astronaut.jpg", Body=b"truncated upload")
    second = run_deployment_cli(prefect_server, f"manifest={manifest_uri}")
    run = wait_for_flow_run(prefect_server, second, worker=worker)
    assert run.state.is_failed() and "astronaut" in (run.state.message or "")
    assert get_json("out/astronaut.json")["status"] == "failed"
    assert get_json(f"out/_runs/{second}.json")["counts"] == {"skipped": 2, "failed": 1}

    # 3. Fixed, then retried (what the UI's Retry button sends): only that pair runs; the same run ends Completed.
    s3.put_object(Bucket=s3_bucket, Key="content/astronaut.jpg", Body=IMAGES["content/astronaut.jpg"].read_bytes())
    with prefect_server.client() as client:
        assert client.set_flow_run_state(second, AwaitingRetry()).status.value == "ACCEPT"
    run = wait_for_flow_run(prefect_server, second, worker=worker, after_run_count=run.run_count)
    assert run.state.is_completed(), run.state.message
    assert run.run_count == 2
    fixed = get_json("out/astronaut.json")
    assert fixed["status"] == "succeeded" and fixed["run_id"] == second
    assert get_json("out/cat.json")["run_id"] == first and get_json("out/coffee.json")["run_id"] == first
    summary = get_json(f"out/_runs/{second}.json")
    assert {p["id"]: p["status"] for p in summary["pairs"]} == {
        "cat": "skipped",
        "coffee": "skipped",
        "astronaut": "succeeded",
    }
    batches = sorted((t.name, t.state.name) for t in task_runs(prefect_server, second))  # type: ignore[union-attr]
    assert batches == [("batch-1of1", "Completed"), ("batch-1of1", "Failed")], batches

    # 4. Engine parameters and run options from the command line, as JSON: the overrides rank above the manifest's
    #    defaults (size 32, iterations 2) and below its pairs' own values; a changed parameter is new work.
    fourth = run_deployment_cli(
        prefect_server,
        f"manifest={manifest_uri}",
        'overrides={"iterations": 3, "style_weight": 7}',
        'options={"pair_ids": ["cat"]}',
    )
    run = wait_for_flow_run(prefect_server, fourth, worker=worker)
    assert run.state.is_completed(), run.state.message
    cat = get_json("out/cat.json")
    assert cat["run_id"] == fourth and cat["iterations"] == 3
    assert (cat["params"]["iterations"], cat["params"]["style_weight"], cat["params"]["size"]) == (3, 7, 32)
    assert get_json("out/coffee.json")["run_id"] == first  # not in pair_ids: untouched
    assert_a_user_error_logs_no_traceback(prefect_server, worker, f"s3://{s3_bucket}/missing.yaml")


def assert_a_user_error_logs_no_traceback(prefect_server: PrefectServer, worker: Worker, manifest: str) -> None:
    """A user error (no such manifest) fails the run with its message; the worker logs no traceback (a Failed state
    whose data Prefect cannot resolve into an exception, or Prefect's engine re-raising ours, made it log one)."""
    failed = run_deployment_cli(prefect_server, f"manifest={manifest}")
    run = wait_for_flow_run(prefect_server, failed, worker=worker)
    assert run.state is not None and run.state.is_failed() and manifest in (run.state.message or "")
    log = worker.log.read_text(errors="replace")
    assert "Traceback" not in log and "cannot be resolved into an exception" not in log, worker.log_tail()


def test_prefect_yaml_deploys_without_network(prefect_server: PrefectServer) -> None:
    """Both deployments, their pool and entrypoint, from `prefect deploy --all` (no push steps, local pull)."""
    deploy(prefect_server)
    with prefect_server.client() as client:
        for name in ("on-demand", "nightly"):
            dep = client.read_deployment_by_name(f"stylize-manifest/{name}")
            assert dep.entrypoint == "flows/stylize.py:stylize_manifest"
            assert dep.work_pool_name == "gpu-pool"
            schema = dep.parameter_openapi_schema
            assert set(schema["properties"]) == {"manifest", "overrides", "options"}
            assert schema["required"] == ["manifest"]
            assert "manifest URI" in schema["properties"]["manifest"]["description"]
            # The form's sub-forms: every run option and every engine parameter, with its description.
            definitions = schema["definitions"]
            options = definitions["RunOptions"]["properties"]
            assert set(RunOptions.model_fields) == set(options)
            assert options["max_batch_pairs"]["default"] == 8 and options["force"]["description"]
            engine = definitions["ParamOverrides"]["properties"]
            assert set(StyleParams.model_fields) == set(engine)
            assert engine["style_weight"]["description"] == StyleParams.model_fields["style_weight"].description
