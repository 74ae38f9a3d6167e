"""`make up` / `make down` (scripts/stack.py) as a user runs them, and compose.yaml's layout.

The slow test starts the whole stack in a temporary STACK_DIR, checks that nothing it listens on answers without the
stack's credentials, runs the command `make up` printed (with those credentials loaded), checks the outputs in the
bucket, stops it, checks that no process of it is left, and starts it a second time on the same data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import botocore
import botocore.config
import botocore.exceptions
import pytest
import yaml

from deploy.setup import SERVER_SETTINGS
from nst_testing.paths import REPO
from nst_testing.prefect import PrefectServer, base_env, process_tree, wait_for_flow_run
from nst_testing.s3 import ACCESS_KEY, SECRET_KEY, S3Server

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
    """The env file to load and the `prefect deployment run` command that `make up` printed."""
    load = re.search(r"^\s*set -a; \. (\S+); set \+a$", out, re.MULTILINE)
    command = re.search(r"^\s*(\S+/prefect deployment run .+)$", out, re.MULTILINE)
    assert load and command, out
    return shlex.split(load.group(1))[0], shlex.split(command.group(1))


def stack_env(env_file: Path) -> dict[str, str]:
    """What `set -a; . <env_file>; set +a` puts in a shell's environment (a shell does the parsing)."""
    script = f"set -a; . {shlex.quote(str(env_file))}; set +a; env -0"
    result = subprocess.run(["sh", "-c", script], env={}, capture_output=True, check=True)
    pairs = (item.split(b"=", 1) for item in result.stdout.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs if k not in (b"PWD", b"SHLVL", b"_")}


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
    """Run the printed command after loading the printed env file, wait for the flow run to end; server, id, run."""
    env_file, command = printed_command(out)
    loaded = stack_env(REPO / env_file)
    env = {**base_env(state_dir / "cli-home"), **loaded}
    without = {k: v for k, v in env.items() if k != "PREFECT_API_AUTH_STRING"}  # the API refuses a run without it
    refused = subprocess.run(command, cwd=REPO, env=without, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "UUID:" not in refused.stdout, refused.stdout
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
    assert match, result.stdout
    log = state_dir / "prefect" / "server.log"
    api_url, auth = loaded["PREFECT_API_URL"], loaded["PREFECT_API_AUTH_STRING"]
    server = PrefectServer(api_url=api_url, ui_url="", home=state_dir, env=env, log=log, auth_string=auth)
    run = wait_for_flow_run(server, match.group(1), timeout=RUN_TIMEOUT_S)
    return server, match.group(1), run


def stack_s3(state: dict[str, Any], state_dir: Path) -> Any:
    """A boto3 client on the stack's SeaweedFS, with the credentials of its env file."""
    env = stack_env(Path(state["env_file"]))
    keys = (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    return S3Server(state["s3"]["endpoint_url"], *keys, state["s3"]["region"], state_dir / "weed.log").client()


def listening_ports(pids: set[int]) -> set[int]:
    """The TCP ports the processes listen on (their socket inodes matched against /proc/net/tcp and tcp6)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def answer_without_client_certificate(port: int) -> bytes:
    """What a client gets that speaks plain HTTP, then TLS without a client certificate, to 127.0.0.1:`port`."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(OSError):
            got += sock.recv(65536)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw) as tls:
            tls.sendall(b"GET /buckets/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = tls.recv(65536)
            got += b"TLS:" + answer if answer else b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        pass  # refused: the server wants a certificate of the stack's CA
    return got


def assert_locked_down(state: dict[str, Any], state_dir: Path) -> None:
    """Every port of the stack refuses a client without the stack's credentials; secrets are the owner's only."""
    env_file = Path(state["env_file"])
    env = stack_env(env_file)
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700 and stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert env["AWS_ACCESS_KEY_ID"] != ACCESS_KEY and env["AWS_SECRET_ACCESS_KEY"] != SECRET_KEY  # not published ones
    assert env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(state)
    api_url, s3_url = state["api_url"], state["s3"]["endpoint_url"]
    # The Prefect API: 401 without the auth string (a deployment cannot be registered or run); health checks answer.
    for method, path in (("POST", "/deployments/"), ("POST", "/flows/filter"), ("GET", "/admin/settings")):
        request = urllib.request.Request(f"{api_url}{path}", data=b"{}" if method == "POST" else None, method=method)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401, (method, path)
    # S3: anonymous and wrong-key requests get 403.
    bucket = state["bucket"]
    unsigned = botocore.config.Config(signature_version=botocore.UNSIGNED, s3={"addressing_style": "path"})
    server = S3Server(s3_url, ACCESS_KEY, SECRET_KEY, state["s3"]["region"], state_dir / "weed.log")
    for client in (server.client(config=unsigned), server.client()):
        with pytest.raises(botocore.exceptions.ClientError) as denied:
            client.list_objects_v2(Bucket=bucket)
        assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    # Each worker's attempt-control channel (Prefect's, on loopback): a connection without a run's token is closed.
    workers = {rec["pid"] for name, rec in state["processes"].items() if name.endswith("worker")}
    control = listening_ports(workers)
    assert len(control) <= len(workers), control
    for port in control:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"not-a-token\n")
            assert sock.recv(100) == b"", port
    # Everything else: every TCP port of the stack's processes is the API, S3 or a SeaweedFS port wanting mTLS.
    pids = {pid for rec in state["processes"].values() for pid in process_tree(rec["pid"])}
    api_port, s3_port = (int(url.rsplit(":", 1)[1].split("/", 1)[0]) for url in (api_url, s3_url))
    internal = listening_ports(pids) - {api_port, s3_port} - control
    assert internal and internal <= set(state["s3"]["ports"]), (internal, state["s3"]["ports"])
    for port in sorted(internal):
        got = answer_without_client_certificate(port)
        assert b"TLS:" not in got and b"sample" not in got and not got.startswith(b"HTTP/1.1 200"), (port, got)
    # weed's unix sockets (/tmp/seaweedfs-<service>-<port>.sock): only their owner may connect.
    for port in state["s3"]["ports"]:
        for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
            assert stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0, sock


@pytest.mark.slow
def test_make_up_run_the_printed_command_down_and_up_again(tmp_path: Path) -> None:
    state_dir = tmp_path / "stack"
    try:
        out = make("up", state_dir)
        state = json.loads((state_dir / "state.json").read_text())
        assert f"Prefect UI:      {state['ui_url']}" in out
        for rec in state["processes"].values():  # every log file is printed, and exists
            assert str(rec["log"]) in out and Path(rec["log"]).is_file()
        processes = stack_processes(state_dir)
        assert_locked_down(state, state_dir)

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
