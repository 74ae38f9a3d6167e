"""Scale-out infrastructure (issue 13), declared in prefect.yaml and deploy/, checked against a real Prefect server.

- deploy/setup.py: pools gpu-pool and parent-pool, the gcl gpu-shards, a Kubernetes GPU pool; idempotent.
- prefect.yaml: stylize-manifest deployments on gpu-pool, shard-manifest parents on parent-pool (never a GPU slot).
- deploy/k8s-gpu-job-template.json: accepted by `prefect work-pool create --type kubernetes`, and the Job it renders
  for a flow run (prefect-kubernetes' own job configuration) is a valid batch/v1 Job (kubernetes client models) with
  one GPU, our image, the shared results volume and the worker settings. No cluster is needed (none is here).
- A run on a pool with no worker says so (issue 20): the late-run automation of deploy/automations.yaml puts the
  pool's name and the command that starts a worker in its state; a worker started later still runs it.
"""

import asyncio
import json
import re
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonpatch  # type: ignore[import-untyped]
import pytest
import yaml

from deploy.setup import load_pool_automations
from nst_testing.paths import REPO, SAMPLES
from nst_testing.prefect import PrefectServer, WorkerFactory, run_setup, wait_for_flow_run

TEMPLATE = REPO / "deploy" / "k8s-gpu-job-template.json"
# Paths prefect-kubernetes' worker insists on (its base manifest has them in the pod spec) though batch/v1 has no
# such PodSpec fields: the API server drops them; everything else must be a real field at its place.
WORKER_QUIRKS = {"/spec/template/spec/completions", "/spec/template/spec/parallelism"}


def render_job(server: PrefectServer, job_variables: dict[str, Any]) -> dict[str, Any]:
    """The Job manifest the Kubernetes worker would submit for a flow run of a deployment with these job variables."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(TEMPLATE.read_text())
    flow_run = FlowRun(id=uuid.uuid4(), name="gentle-otter", flow_id=uuid.uuid4())

    async def render() -> dict[str, Any]:
        config = await KubernetesWorkerJobConfiguration.from_template_and_values(template, job_variables)
        config.prepare_for_flow_run(flow_run)
        return config.job_manifest

    with server.settings():
        return asyncio.run(render())


def kubernetes_round_trip(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Differences after parsing the manifest into the kubernetes client's V1Job and serialising it back."""
    from kubernetes_asyncio.client import ApiClient

    async def round_trip() -> Any:
        api = ApiClient()
        try:
            response: Any = SimpleNamespace(data=json.dumps(manifest))  # what deserialize reads of an HTTP response
            job = api.deserialize(response, "V1Job")
            return api.sanitize_for_serialization(job)
        finally:
            await api.close()

    back = asyncio.run(round_trip())
    return list(jsonpatch.JsonPatch.from_diff(manifest, back))


@pytest.mark.slow
def test_setup_declares_pools_and_gpu_limit_idempotently(isolated_prefect_server: PrefectServer) -> None:
    server = isolated_prefect_server
    first = run_setup(server, "--gpu-shards", "3")
    assert "work pool gpu-pool: created (process)" in first and "work pool parent-pool: created (process)" in first
    second = run_setup(server, "--gpu-shards", "2", "--k8s-pool", "gpu-k8s")
    assert "gpu-pool: exists" in second and "parent-pool: exists" in second
    third = run_setup(server, "--gpu-shards", "2", "--k8s-pool", "gpu-k8s")
    assert "work pool gpu-k8s: base job template updated" in third
    with server.client() as client:
        assert client.read_work_pool("gpu-pool").type == "process"
        assert client.read_work_pool("parent-pool").type == "process"
        k8s = client.read_work_pool("gpu-k8s")
        assert k8s.type == "kubernetes"
        assert k8s.base_job_template == json.loads(TEMPLATE.read_text())
        limit = client.read_global_concurrency_limit_by_name("gpu-shards")
        assert limit.limit == 2 and limit.active
        assert len(client.read_automations_by_name("crash-zombie-flow-runs")) == 1


@pytest.mark.slow
def test_prefect_yaml_keeps_shard_parents_off_the_gpu_pool(isolated_prefect_server: PrefectServer) -> None:
    server = isolated_prefect_server
    run_setup(server)
    out = server.cli("--no-prompt", "deploy", "--all", cwd=REPO).stdout
    expected = {
        "stylize-manifest/on-demand": ("flows/stylize.py:stylize_manifest", "gpu-pool"),
        "stylize-manifest/nightly": ("flows/stylize.py:stylize_manifest", "gpu-pool"),
        "shard-manifest/on-demand": ("flows/shard.py:shard_manifest", "parent-pool"),
        "shard-manifest/nightly": ("flows/shard.py:shard_manifest", "parent-pool"),
    }
    with server.client() as client:
        for name, (entrypoint, pool) in expected.items():
            assert name in out, out
            dep = client.read_deployment_by_name(name)
            assert (dep.entrypoint, dep.work_pool_name) == (entrypoint, pool), name
            assert "nst" in dep.tags, name  # the zombie automation's scope
            assert dep.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30", name
        # One nightly schedule active at a time: the sharded one waits to be switched on.
        nightly = client.read_deployment_by_name("stylize-manifest/nightly")
        sharded = client.read_deployment_by_name("shard-manifest/nightly")
        assert [s.active for s in nightly.schedules] == [True]
        assert [s.active for s in sharded.schedules] == [False]
        assert [s.schedule.cron for s in sharded.schedules] == [s.schedule.cron for s in nightly.schedules]  # type: ignore[union-attr]
        assert sharded.parameters["manifest"] == nightly.parameters["manifest"]


@pytest.mark.slow
def test_k8s_gpu_template_is_accepted_and_renders_a_valid_gpu_job(isolated_prefect_server: PrefectServer) -> None:
    server = isolated_prefect_server
    server.cli("work-pool", "create", "gpu-k8s-cli", "--type", "kubernetes", "--base-job-template", str(TEMPLATE))
    with server.client() as client:
        assert client.read_work_pool("gpu-k8s-cli").base_job_template == json.loads(TEMPLATE.read_text())

    # What a deployment on that pool passes (docs/scaling.md): a newer image tag and one more variable.
    manifest = render_job(server, {"image": "registry.example.com/nst-batch:0.1.1", "env": {"NST_EXTRA": "x"}})
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    assert manifest["metadata"]["namespace"] == "nst"
    assert manifest["spec"]["backoffLimit"] == 0
    pod = manifest["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"] is True
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    [container] = pod["containers"]
    assert container["image"] == "registry.example.com/nst-batch:0.1.1"
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert container["workingDir"] == "/opt/nst"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"  # worker settings survive a deployment's own env
    assert env["NST_EXTRA"] == "x"
    assert env["PREFECT__FLOW_RUN_ID"]
    # Shared result storage: persisted task results on the claim mounted in every job.
    [volume] = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == "nst-results"
    [mount] = container["volumeMounts"]
    assert mount["name"] == volume["name"]
    assert env["PREFECT_LOCAL_STORAGE_PATH"].startswith(mount["mountPath"] + "/")
    assert container["envFrom"] == [{"secretRef": {"name": "nst-s3", "optional": True}}]

    # Every other key is a real batch/v1 field at its place (the kubernetes client's models keep it).
    diff = kubernetes_round_trip(manifest)
    unexpected = [
        op
        for op in diff
        if not (op["op"] == "remove" and op["path"] in WORKER_QUIRKS)
        and not (op["op"] == "replace" and "/resources/" in op["path"])  # quantities come back as strings
    ]
    assert not unexpected, unexpected

    # More GPUs per flow run is a job variable.
    two = render_job(server, {"gpu_count": 2})
    assert str(two["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == "2"


def test_k8s_template_matches_the_image() -> None:
    """The template runs the project where the Dockerfile puts it, as the user the image runs as."""
    dockerfile = (REPO / "Dockerfile").read_text()
    template = json.loads(TEMPLATE.read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert f"{pod['containers'][0]['workingDir']}/" in dockerfile
    assert f"--uid {pod['securityContext']['runAsUser']}" in dockerfile
    assert yaml.safe_load((REPO / "prefect.yaml").read_text())["definitions"]["work_pools"]["gpu_pool"]["name"] == (
        "gpu-pool"
    )


def test_late_run_automations_are_valid_for_every_pool() -> None:
    """The per-pool template fills in to a valid Prefect automation naming its pool and the worker command."""
    from prefect.events.schemas.automations import AutomationCore

    for pool in ("gpu-pool", "parent-pool", "gpu-k8s"):
        [spec] = load_pool_automations(pool, 45)
        automation = AutomationCore.model_validate(spec)
        assert automation.name == f"late-runs-{pool}"
        assert automation.trigger.within.total_seconds() == 45  # type: ignore[union-attr]
        assert spec["trigger"]["match_related"] == {"prefect.resource.role": "work-pool", "prefect.resource.name": pool}
        [action] = spec["actions"]
        assert (action["state"], action["name"]) == ("SCHEDULED", "AwaitingWorker")  # schedulable, never final
        assert f"prefect worker start --pool {pool}" in action["message"] and "45 s" in action["message"]
        assert "${" not in json.dumps(spec)


@pytest.mark.slow
def test_a_run_on_a_pool_without_a_worker_says_so_and_a_worker_started_later_runs_it(
    isolated_prefect_server: PrefectServer, isolated_process_worker: WorkerFactory, tmp_path: Path
) -> None:
    server = isolated_prefect_server
    late_after_s = 20
    out = run_setup(server, "--late-after", str(late_after_s))
    assert "automation late-runs-gpu-pool: " in out and "automation late-runs-parent-pool: " in out, out
    server.cli("--no-prompt", "deploy", "--name", "stylize-manifest/on-demand", cwd=REPO)
    content, style = SAMPLES / "content" / "chelsea.jpg", SAMPLES / "styles" / "brick.jpg"
    (tmp_path / "late.yaml").write_text(
        "version: 1\nname: late\noutput: out/\ndefaults: {size: 32, iterations: 2}\n"
        f"pairs:\n  - {{id: one, content: {content}, style: {style}}}\n"
    )
    result = server.cli("deployment", "run", "stylize-manifest/on-demand", "-p", f"manifest={tmp_path / 'late.yaml'}")
    match = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
    assert match, result.stdout
    run_id = match.group(1)

    # No worker on gpu-pool: Late 15 s after its start time (Prefect), then our message late_after_s later.
    deadline = time.monotonic() + 15 + late_after_s + 240  # generous: a loaded machine, 5 s service loops
    while True:
        with server.client() as client:
            run = client.read_flow_run(run_id)
        message = (run.state.message or "") if run.state else ""
        if message.startswith("No worker of work pool"):
            break
        assert run.state is not None and run.state.is_scheduled(), (run.state_name, message)
        assert time.monotonic() < deadline, f"no message on the late run, still {run.state_name}"
        time.sleep(2)
    assert run.state.is_scheduled() and run.state_name == "AwaitingWorker"  # still runnable: a later worker takes it
    assert "work pool gpu-pool" in message and "prefect worker start --pool gpu-pool" in message, message

    # Once only: the automation does not react to the state it set itself.
    time.sleep(late_after_s + 20)
    with server.client() as client:
        states = client.read_flow_run_states(run_id)
    told = [s for s in states if (s.message or "").startswith("No worker of work pool")]
    assert len(told) == 1, [(s.name, s.message) for s in states]

    worker = isolated_process_worker("gpu-pool", cwd=REPO)
    run = wait_for_flow_run(server, run_id, timeout=600, worker=worker)
    assert run.state.is_completed(), (run.state_name, run.state.message, worker.log_tail())
    assert (tmp_path / "out" / "one.png").is_file()
