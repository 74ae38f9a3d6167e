"""`make up` / `make down` (scripts/stack.py) as a user runs them, and compose.yaml's layout.

The slow test starts the whole stack in a temporary STACK_DIR, runs the command `make up` printed, checks the outputs in
the bucket, stops it, checks that no process of it is left, and starts it a second time on the same data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.setup import SERVER_SETTINGS
from nst_testing.paths import REPO
from nst_testing.prefect import PrefectServer, base_env, process_tree, wait_for_flow_run
from nst_testing.s3 import S3Server

RUN_TIMEOUT_S = 900.0  # the sample takes about a minute on 2 idle cores; CI's are shared with other tests


def make(target: str, state_dir: Path) -> str:
    """`make <target> STACK_DIR=<state_dir>` in the repository; its output (fails the test on a non-zero exit)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NST_STACK_")}  # default ports and bucket
    result = subprocess.run(
        ["make", "--no-print-directory", target, f"STACK_DIR={state_dir}"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"make {target} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def printed_command(out: str) -> tuple[str, list[str]]:
    """The PREFECT_API_URL to export and the `prefect deployment run` command that `make up` printed."""
    api_url = re.search(r"^\s*export PREFECT_API_URL=(\S+)$", out, re.MULTILINE)
    command = re.search(r"^\s*(\S+/prefect deployment run .+)$", out, re.MULTILINE)
    assert api_url and command, out
    return api_url.group(1), shlex.split(command.group(1))


def start_of(pid: int) -> int | None:
    """A process's start time, or None once it is gone (a zombie is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def stack_processes(state_dir: Path) -> dict[int, int]:
    """pid -> start time of every process of the running stack and all their descendants."""
    state = json.loads((state_dir / "state.json").read_text())
    found: dict[int, int] = {}
    for rec in state["processes"].values():
        assert start_of(rec["pid"]) == rec["start"], f"{rec} is not running"
        for pid in process_tree(rec["pid"]):
            start = start_of(pid)
            if start is not None:
                found[pid] = start
    return found


def listening(url: str) -> bool:
    """Whether something accepts TCP connections at the URL's host and port."""
    host, port = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, int(port))) == 0


def assert_all_stopped(processes: dict[int, int], state: dict[str, Any]) -> None:
    """No process of the stack remains (same pid and start time), its ports are closed and its state file is gone."""
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid, t in processes.items() if start_of(pid) == t}
    assert not left, f"still running after make down: {left}"
    assert not listening(state["api_url"]) and not listening(state["s3"]["endpoint_url"])


def run_printed_command(out: str, state_dir: Path) -> tuple[PrefectServer, str, Any]:
    """Run the printed command with the printed PREFECT_API_URL, wait for the flow run to end; server, id, run."""
    api_url, command = printed_command(out)
    env = {**base_env(state_dir / "cli-home"), "PREFECT_API_URL": api_url}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
    assert match, result.stdout
    server = PrefectServer(
        api_url=api_url, ui_url="", home=state_dir, env=env, log=state_dir / "prefect" / "server.log"
    )
    run = wait_for_flow_run(server, match.group(1), timeout=RUN_TIMEOUT_S)
    return server, match.group(1), run


@pytest.mark.slow
def stack_s3(state: dict[str, Any], state_dir: Path) -> Any:
    """A boto3 client on the stack's SeaweedFS, from its state.json."""
    keys = ("endpoint_url", "access_key", "secret_key", "region")
    return S3Server(**{k: state["s3"][k] for k in keys}, log_path=state_dir / "seaweedfs" / "weed.log").client()


def test_make_up_run_the_printed_command_down_and_up_again(tmp_path: Path) -> None:
    state_dir = tmp_path / "stack"
    try:
        out = make("up", state_dir)
        state = json.loads((state_dir / "state.json").read_text())
        assert f"Prefect UI:      {state['ui_url']}" in out
        for rec in state["processes"].values():  # every log file is printed, and exists
            assert str(rec["log"]) in out and Path(rec["log"]).is_file()
        processes = stack_processes(state_dir)

        _, run_id, run = run_printed_command(out, state_dir)
        assert run.state.is_completed(), run.state.message
        s3 = stack_s3(state, state_dir)
        bucket, key = state["manifest"].removeprefix("s3://").split("/", 1)
        manifest = yaml.safe_load(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        ids = [pair["id"] for pair in manifest["pairs"]]
        prefix = manifest["output"].removeprefix(f"s3://{bucket}/")
        for pair_id in ids:  # a PNG and its JSON record per pair, from this run
            png = s3.get_object(Bucket=bucket, Key=f"{prefix}{pair_id}.png")["Body"].read()
            record = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}{pair_id}.json")["Body"].read())
            assert png.startswith(b"\x89PNG\r\n\x1a\n")
            assert (record["status"], record["run_id"]) == ("succeeded", run_id)
            assert record["output"]["image_sha256"] == hashlib.sha256(png).hexdigest()

        again = make("up", state_dir)  # a live stack: reprinted, nothing started
        assert printed_command(again) == printed_command(out)
        assert stack_processes(state_dir).keys() >= {rec["pid"] for rec in state["processes"].values()}
        assert json.loads((state_dir / "state.json").read_text())["processes"] == state["processes"]

        processes.update(stack_processes(state_dir))
        make("down", state_dir)
        assert_all_stopped(processes, state)

        # A second `make up` on the same data: new processes, the bucket and the done pairs are still there.
        out = make("up", state_dir)
        second = json.loads((state_dir / "state.json").read_text())
        assert {r["pid"] for r in second["processes"].values()}.isdisjoint(
            r["pid"] for r in state["processes"].values()
        )
        processes = stack_processes(state_dir)
        _, rerun_id, run = run_printed_command(out, state_dir)
        assert run.state.is_completed(), run.state.message
        s3 = stack_s3(second, state_dir)
        summary = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}_runs/{rerun_id}.json")["Body"].read())
        assert summary["counts"] == {"skipped": len(ids)}
        processes.update(stack_processes(state_dir))
        make("down", state_dir)
        assert_all_stopped(processes, second)
    finally:
        if (state_dir / "state.json").exists():
            subprocess.run(["make", "--no-print-directory", "down", f"STACK_DIR={state_dir}"], cwd=REPO, timeout=300)


def compose_command() -> list[str]:
    """`docker compose` (the plugin), else a standalone Compose v2 `docker-compose`; skips the test without either."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        probe = subprocess.run([standalone, "version", "--short"], capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip().lstrip("v").startswith(("2.", "5.")):
            return [standalone]
    pytest.skip("Docker Compose v2 is not installed (neither `docker compose` nor a v2 `docker-compose`)")


def test_compose_file_is_valid_and_has_the_stack_layout() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NST_", "COMPOSE_"))}
    result = subprocess.run(
        [*compose_command(), "-f", "compose.yaml", "config", "--format", "json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert {"prefect-server", "seaweedfs", "setup", "seed", "worker", "parent-worker"} <= set(services)
    for name in ("worker", "parent-worker", "setup", "seed", "prefect-server"):  # all from our Dockerfile, one image
        assert services[name]["image"] == services["worker"]["image"], name
    assert services["worker"]["build"]["context"] == str(REPO)
    assert services["worker"]["build"]["dockerfile"] == "Dockerfile"
    pools = {name: services[name]["environment"]["NST_WORK_POOL"] for name in ("worker", "parent-worker")}
    assert pools == {"worker": "gpu-pool", "parent-worker": "parent-pool"}
    for name in ("worker", "parent-worker"):
        env_of = services[name]["environment"]
        assert env_of["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env_of["AWS_ENDPOINT_URL"] == "http://seaweedfs:8333"
        assert env_of["NST_MANIFEST_ROOTS"] == "s3://nst-stack/manifests/"
        assert env_of["NST_INPUT_ROOTS"] == "s3://nst-stack/images/"
        assert env_of["NST_OUTPUT_ROOTS"] == "s3://nst-stack/results/"
        assert services[name]["depends_on"]["setup"]["condition"] == "service_completed_successfully"
    assert services["setup"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    server_env = services["prefect-server"]["environment"]
    assert all(server_env.get(name) == value for name, value in SERVER_SETTINGS.items()), server_env
    # The setup service runs what `make up` runs: prefect-setup (deploy/setup.py), then prefect deploy --all.
    setup_cmd = " ".join(services["setup"]["command"])
    assert "deploy/setup.py" in setup_cmd and "deploy --all" in setup_cmd
