"""Zombie runs (issue 12, item 10): a flow run whose machine dies is marked Crashed by the heartbeat automation.

Real parts only: `prefect server start`, deploy/setup.py (pools, gcl, deploy/automations.yaml), a deployment with
this project's tags and job variables from prefect.yaml, a process worker; then the worker and its flow run are
SIGKILLed together, as when the machine dies, and nothing is left to report the run's end.
"""

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

from nst_testing.paths import REPO
from nst_testing.prefect import PrefectServer, WorkerFactory, kill_process_groups, process_tree, run_setup

SLEEPER = '''\
import time

from prefect import flow


@flow(name="zombie-probe")
def sleeper(seconds: float = 900) -> None:
    """Stands for a long GPU batch: does nothing for `seconds`."""
    time.sleep(seconds)
'''


def project_deployment_settings() -> dict[str, Any]:
    """Tags and work pool (with job variables) of prefect.yaml's stylize-manifest/on-demand, anchors resolved."""
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    on_demand = next(
        d
        for d in config["deployments"]
        if d["name"] == "on-demand" and d["entrypoint"] == "flows/stylize.py:stylize_manifest"
    )
    return {"tags": on_demand["tags"], "work_pool": on_demand["work_pool"]}


def zombie_automation() -> dict[str, Any]:
    automations: list[dict[str, Any]] = yaml.safe_load((REPO / "deploy" / "automations.yaml").read_text())[
        "automations"
    ]
    return next(a for a in automations if a["name"] == "crash-zombie-flow-runs")


def heartbeats(server: PrefectServer, flow_run_id: Any) -> list[datetime]:
    """When the server received each heartbeat of the flow run, oldest first."""
    with server.client() as client:
        page = client.read_events(
            EventFilter(
                event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
            ),
            limit=50,  # newest first (the API's order); its maximum page
        )
    return sorted(e.occurred for e in page.events)


@pytest.mark.slow
def test_killed_machine_leaves_no_running_zombie(
    isolated_prefect_server: PrefectServer, isolated_process_worker: WorkerFactory, tmp_path: Path
) -> None:
    server = isolated_prefect_server
    run_setup(server)
    automation = zombie_automation()
    within_s = float(automation["trigger"]["within"])

    # A deployment like ours (same tags, pool and job variables from prefect.yaml) of a flow that just sleeps.
    settings = project_deployment_settings()
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    (tmp_path / "prefect.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "zombie-probe",
                "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": str(tmp_path)}}],
                "deployments": [{"name": "probe", "entrypoint": "sleeper.py:sleeper", **settings}],
            }
        )
    )
    server.cli("--no-prompt", "deploy", "--all", cwd=tmp_path)
    heartbeat_s = float(settings["work_pool"]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])

    worker = isolated_process_worker(settings["work_pool"]["name"], limit=1)
    with server.client() as client:
        deployment = client.read_deployment_by_name("zombie-probe/probe")
        flow_run_id = client.create_flow_run_from_deployment(deployment.id).id

    # Wait until the run is Running and its first heartbeat has reached the server.
    deadline = time.monotonic() + 240
    while True:
        with server.client() as client:
            run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_running() and heartbeats(server, flow_run_id):
            break
        assert worker.proc.poll() is None, worker.log_tail()
        assert time.monotonic() < deadline, f"no heartbeat; run {run.state_name}\n{worker.log_tail()}"
        time.sleep(1)

    # The machine dies: the worker and the flow run's process group (a process worker starts each flow run in a
    # group of its own) are SIGKILLed at once; nothing reports Crashed, only the heartbeats stop.
    tree = process_tree(worker.proc.pid)
    assert len(tree) > 1, "the flow run's process is not a descendant of the worker"
    kill_process_groups(tree)
    killed_at = datetime.now(UTC)
    killed_mono = time.monotonic()
    worker.proc.wait(timeout=10)
    for _ in range(50):
        survivors = [p for p in tree if _state(p) == "alive"]
        if not survivors:
            break
        time.sleep(0.2)
    assert not survivors, f"processes survived SIGKILL: {survivors}"

    limit_s = within_s + heartbeat_s + 60  # last heartbeat up to one period before the kill, plus evaluation slack
    while True:
        with server.client() as client:
            run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            break
        assert time.monotonic() - killed_mono < limit_s, f"still {run.state_name} {limit_s:.0f} s after the kill"
        time.sleep(2)
    crashed_after_s = time.monotonic() - killed_mono

    assert run.state.is_crashed(), (run.state_name, run.state.message)
    assert run.state.message == automation["actions"][0]["message"]  # set by our automation, nothing else
    last_beat = heartbeats(server, flow_run_id)[-1]
    silent_s = (run.state.timestamp - last_beat).total_seconds()
    # Not before `within` of silence (a live run is never crashed early), and within one evaluation cycle after.
    assert within_s <= silent_s <= within_s + 30, silent_s
    print(
        f"\nzombie: Crashed {crashed_after_s:.0f} s after SIGKILL; {silent_s:.0f} s after the last heartbeat "
        f"(heartbeat {heartbeat_s:.0f} s, within {within_s:.0f} s); killed at {killed_at:%H:%M:%S}"
    )


def _state(pid: int) -> str:
    """The /proc state word of a process ('zombie' for an exited child not yet reaped)."""
    try:
        return {"Z": "zombie"}.get(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0], "alive")
    except (OSError, IndexError):
        return "gone"


@pytest.mark.slow
def test_setup_applies_the_automation_as_declared(isolated_prefect_server: PrefectServer) -> None:
    """deploy/setup.py creates crash-zombie-flow-runs once, scoped to this project's runs, and a rerun updates it."""
    server = isolated_prefect_server
    run_setup(server)
    out = run_setup(server)
    assert "automation crash-zombie-flow-runs: updated" in out
    with server.client() as client:
        found = client.read_automations_by_name("crash-zombie-flow-runs")
    assert len(found) == 1
    trigger = found[0].trigger
    assert trigger.posture.value == "Proactive"
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed"} <= trigger.expect
    assert trigger.for_each == {"prefect.resource.id"}
    scope = found[0].model_dump(mode="json")["trigger"]["match_related"]
    assert scope == {"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.nst"}
    assert [a.type for a in found[0].actions] == ["change-flow-run-state"]
    assert found[0].actions[0].state.value == "CRASHED"  # type: ignore[union-attr]


def test_heartbeat_settings_fit_the_automation() -> None:
    """Every deployment in prefect.yaml is tagged for the automation and heartbeats often enough for its window."""
    within_s = float(zombie_automation()["trigger"]["within"])
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for dep in config["deployments"]:
        name = f"{dep['entrypoint']} {dep['name']}"
        assert "nst" in dep["tags"], name
        env = dep["work_pool"]["job_variables"]["env"]
        heartbeat_s = float(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
        assert 30 <= heartbeat_s <= within_s / 3, name  # Prefect's minimum; two lost heartbeats tolerated
    k8s = (REPO / "deploy" / "k8s-gpu-job-template.json").read_text()
    assert '"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"' in k8s
