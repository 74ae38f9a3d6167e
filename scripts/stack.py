"""The production layout on one machine: `make up` / `make down` (docs/prefect.md).

    .venv/bin/python scripts/stack.py up   [--state-dir .stack]   # start everything, or reprint a live stack
    .venv/bin/python scripts/stack.py down [--state-dir .stack]   # stop what `up` started, by pid
    python scripts/stack.py seed --bucket nst-stack               # sample images + manifest into a bucket (AWS_* env)

`up` starts SeaweedFS (S3) and a Prefect server, puts the sample images and a sample manifest in a bucket, runs
`make prefect-setup` and `prefect deploy --all` against the server, starts a gpu-pool worker and a parent-pool worker,
and prints the UI's URL, the log files and the command to run. State (pids, ports, data, logs) lives in the state dir
(mode 0700). Each stack has its own random credentials, kept in <state dir>/env (0600; load it with
`set -a; . .stack/env; set +a`): S3 keys for SeaweedFS (whose other ports want a client certificate of the stack's own
CA) and the Prefect API's basic-auth string. Nothing the stack listens on answers without them but health checks.
Settings: NST_STACK_PREFECT_PORT (default 4200 if free, else any free port), NST_STACK_S3_PORT (8333 likewise),
NST_STACK_BUCKET (nst-stack). The server and SeaweedFS are started by the helpers the tests use too (nst_testing).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "manifests" / "images"
STATE_FILE = "state.json"
ENV_FILE = "env"  # the stack's URLs and credentials, as `export NAME=value` lines (0600)
# Secrets of the env file, made once per state dir and kept across `make down` / `make up` (delete the file to renew).
SECRETS = ("PREFECT_API_AUTH_STRING", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
BUCKET = os.environ.get("NST_STACK_BUCKET", "nst-stack")
MANIFEST_KEY = "manifests/sample.yaml"
# (pair id, content, style) of the sample manifest: small and few iterations, so a run takes about a minute on 2 cores.
SAMPLE_PAIRS = (
    ("chelsea__brick", "chelsea.jpg", "brick.jpg"),
    ("coffee__hubble", "coffee.jpg", "hubble.jpg"),
    ("astronaut__ihc", "astronaut.jpg", "ihc.jpg"),
)
SAMPLE_DEFAULTS = {"size": 128, "iterations": 40}
# name -> (pool, --limit) of the workers `up` starts; flow runs are subprocesses of the worker (process pools).
WORKERS = {"gpu-worker": ("gpu-pool", 1), "parent-worker": ("parent-pool", 4)}
WORKER_WAIT_S = 180.0
# How each process is stopped: the signals in order with the seconds to wait after each, then SIGKILL of its group.
STOP_SIGNALS: dict[str, list[tuple[int, float]]] = {
    "gpu-worker": [(signal.SIGINT, 30.0), (signal.SIGTERM, 5.0)],  # workers ignore SIGTERM while a run is in flight
    "parent-worker": [(signal.SIGINT, 30.0), (signal.SIGTERM, 5.0)],
    "prefect-server": [(signal.SIGINT, 20.0), (signal.SIGTERM, 10.0)],
    "seaweedfs": [(signal.SIGTERM, 3.0)],  # weed takes >10 s to honour SIGTERM; its data is flushed by then
}


def say(message: str) -> None:
    """One progress line."""
    print(f"[stack] {message}", flush=True)


# --- The sample bucket (also run inside compose.yaml's `seed` service, where only boto3 is available)


def sample_manifest(bucket: str) -> str:
    """The sample manifest: inputs under images/, outputs under results/ (outside its prefix: the workers' roots)."""
    lines = [
        "# Put here by `make up` (scripts/stack.py): three small pairs, about a minute on 2 CPU cores.",
        "# Inputs and outputs are outside its own prefix: the workers allow them (NST_INPUT_ROOTS, NST_OUTPUT_ROOTS).",
        "version: 1",
        "name: stack-sample",
        f"output: s3://{bucket}/results/sample/",
        "defaults: {" + ", ".join(f"{k}: {v}" for k, v in SAMPLE_DEFAULTS.items()) + "}",
        "pairs:",
    ]
    for pair_id, content, style in SAMPLE_PAIRS:
        lines.append(f"  - {{id: {pair_id}, content: ../images/content/{content}, style: ../images/styles/{style}}}")
    return "\n".join(lines) + "\n"


def seed(client: Any, bucket: str, *, timeout_s: float = 60.0) -> str:
    """Create `bucket` if missing, upload the sample images and manifest (idempotent); the manifest's URI."""
    import botocore.exceptions

    deadline = time.monotonic() + timeout_s
    while True:  # SeaweedFS answers before its volume server has registered: retry until a write lands
        try:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
                client.create_bucket(Bucket=bucket)
            for path in sorted(SAMPLES.glob("*/*.jpg")):
                client.put_object(Bucket=bucket, Key=f"images/{path.parent.name}/{path.name}", Body=path.read_bytes())
            client.put_object(Bucket=bucket, Key=MANIFEST_KEY, Body=sample_manifest(bucket).encode())
            return f"s3://{bucket}/{MANIFEST_KEY}"
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def roots(bucket: str) -> dict[str, str]:
    """The workers' root settings for the sample bucket: manifests, inputs and outputs each under their own prefix."""
    return {
        "NST_MANIFEST_ROOTS": f"s3://{bucket}/manifests/",
        "NST_INPUT_ROOTS": f"s3://{bucket}/images/",
        "NST_OUTPUT_ROOTS": f"s3://{bucket}/results/",
    }


def env_s3_client() -> Any:
    """A boto3 S3 client from the environment's AWS_* settings, path-style (SeaweedFS, MinIO)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(s3={"addressing_style": "path"}))


# --- Processes: liveness by pid + start time (a reused pid is not ours), stopping by pid


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it is gone (a zombie counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def alive(record: dict[str, Any]) -> bool:
    """Whether the process a record names still runs (same pid and start time)."""
    return bool(start_time(record["pid"]) == record["start"])


def record_of(pid: int, log: Path) -> dict[str, Any]:
    """What the state file keeps of a process: pid, start time and log file."""
    start = start_time(pid)
    if start is None:
        raise RuntimeError(f"process {pid} exited at once; its log: {log}")
    return {"pid": pid, "start": start, "log": str(log)}


def wait_gone(records: list[dict[str, Any]], timeout_s: float) -> bool:
    """Wait until none of the processes runs; whether they all ended in time."""
    deadline = time.monotonic() + timeout_s
    while any(alive(r) for r in records):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


# A SIGKILLed process in uninterruptible sleep (waiting on a loaded disk's fsync) ends only when its I/O does: seen
# taking over 10 s on the shared 2-core machine while another job wrote 200,000 files.
KILLED_GONE_S = 60.0


def stop(name: str, record: dict[str, Any]) -> None:
    """Stop one process of the stack and everything it started (its group and any descendant's group)."""
    from nst_testing.prefect import process_tree

    if not alive(record):
        return
    # A zombie (start time None) has ended already: kept, it would read as alive for ever (None == None).
    members = [{"pid": p, "start": start_time(p)} for p in process_tree(record["pid"])]
    tree: list[dict[str, Any]] = [m for m in members if m["start"] is not None]
    for sig, wait_s in STOP_SIGNALS[name]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record["pid"], sig)
        if wait_gone([record], wait_s):
            break
    # Its own group (server services, weed's children), then flow-run subprocesses, which have groups of their own.
    groups = {record["pid"]}
    for member in tree[1:]:
        if alive(member):
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(member["pid"]))
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    if not wait_gone(tree, KILLED_GONE_S):
        raise RuntimeError(f"{name} (pid {record['pid']}) or one of its children is still running after SIGKILL")


def stop_all(state: dict[str, Any]) -> None:
    """Stop every process the state names: workers first (both at once), then the server, then SeaweedFS."""
    procs: dict[str, dict[str, Any]] = state.get("processes", {})
    workers = [name for name in WORKERS if name in procs and alive(procs[name])]
    for name in workers:  # SIGINT both now, so their grace periods overlap
        with contextlib.suppress(ProcessLookupError):
            os.kill(procs[name]["pid"], signal.SIGINT)
    for name in [*workers, "prefect-server", "seaweedfs"]:
        if name in procs:
            stop(name, procs[name])
            say(f"stopped {name} (pid {procs[name]['pid']})")
    for port in state.get("s3", {}).get("ports", []):  # weed's unix sockets
        for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
            sock.unlink(missing_ok=True)


# --- State


def read_state(state_dir: Path) -> dict[str, Any] | None:
    """The state file `up` wrote, or None."""
    try:
        state: dict[str, Any] = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state


def write_state(state_dir: Path, state: dict[str, Any]) -> None:
    """Write the state file atomically (temp file + rename)."""
    from nst_testing.s3 import write_private

    tmp = state_dir / f".{STATE_FILE}.tmp"
    write_private(tmp, json.dumps(state, indent=2) + "\n")
    tmp.replace(state_dir / STATE_FILE)


def new_secrets() -> dict[str, str]:
    """Fresh random credentials for one stack (hex: nothing a shell or an env file would need quoted)."""
    return {
        "PREFECT_API_AUTH_STRING": f"nst:{secrets.token_hex(24)}",
        "AWS_ACCESS_KEY_ID": f"nst{secrets.token_hex(8)}",
        "AWS_SECRET_ACCESS_KEY": secrets.token_hex(24),
    }


def read_env(state_dir: Path) -> dict[str, str]:
    """The `export NAME=value` lines of the stack's env file (empty if there is none)."""
    try:
        text = (state_dir / ENV_FILE).read_text()[:100_000]
    except (OSError, UnicodeDecodeError):
        return {}
    return dict(re.findall(r"^export ([A-Z_]+)=([\w:./-]*)$", text, re.MULTILINE))


def stack_secrets(state_dir: Path) -> dict[str, str]:
    """The credentials of the env file when it has them all, else new ones."""
    kept = read_env(state_dir)
    return {k: kept[k] for k in SECRETS} if all(kept.get(k) for k in SECRETS) else new_secrets()


def write_env(state_dir: Path, settings: dict[str, str]) -> None:
    """Write the env file, readable by its owner only."""
    from nst_testing.s3 import write_private

    lines = [f"# This stack's settings and credentials (make up). Load: {load_command(state_dir / ENV_FILE)}"]
    lines += [f"export {name}={value}" for name, value in settings.items()]
    write_private(state_dir / ENV_FILE, "\n".join(lines) + "\n")


def load_command(env_file: Path | str) -> str:
    """The shell line that loads the env file into the current shell."""
    return f"set -a; . {shlex.quote(shown(env_file))}; set +a"


@contextlib.contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """Hold the state dir's lock: two `make up`/`make down` at once take turns."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def port_from(setting: str, default: int) -> int:
    """The port a setting names (refused if taken), else `default` if free, else a free port."""
    from nst_testing.prefect import free_port

    def free(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return True
            except OSError:
                return False

    if os.environ.get(setting):
        port = int(os.environ[setting])
        if not free(port):
            raise SystemExit(f"{setting}={port}: that port is in use; choose another or unset it")
        return port
    return default if free(default) else free_port()


def healthy(api_url: str) -> bool:
    """Whether the Prefect API answers its health check."""
    import urllib.request

    with contextlib.suppress(OSError), urllib.request.urlopen(f"{api_url}/health", timeout=5) as resp:
        return bool(resp.status == 200)
    return False


# --- up


def run_logged(args: list[str], *, env: dict[str, str], log: Path, what: str) -> None:
    """Run a set-up command to completion, its output appended to `log`; fail naming the log and its tail."""
    started = time.monotonic()
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(args)}\n".encode())
        out.flush()
        code = subprocess.run(
            args, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=600
        ).returncode
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{what} exited {code} (log: {log}):\n{tail}")
    say(f"{what}: done ({time.monotonic() - started:.0f} s)")


def start_worker(name: str, env: dict[str, str], state_dir: Path) -> dict[str, Any]:
    """Start `prefect worker start` for `name`'s pool in its own process group; its state record."""
    from nst_testing.prefect import PREFECT_BIN

    pool, limit = WORKERS[name]
    log = state_dir / "logs" / f"{name}.log"
    args = [PREFECT_BIN, "worker", "start", "--pool", pool, "--type", "process", "--limit", str(limit)]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*args, "--name", f"stack-{name}"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return {**record_of(proc.pid, log), "pool": pool, "since": time.time()}


def wait_for_workers(api_url: str, auth_string: str, procs: dict[str, dict[str, Any]]) -> None:
    """Wait until each worker has sent a heartbeat to the server since it started (its pool is then ready)."""
    from prefect.client.orchestration import SyncPrefectClient

    started, deadline = time.monotonic(), time.monotonic() + WORKER_WAIT_S
    with SyncPrefectClient(api=api_url, auth_string=auth_string) as client:
        for name in WORKERS:
            rec = procs[name]
            while True:
                beats = [
                    w.last_heartbeat_time.timestamp()
                    for w in client.read_workers_for_work_pool(rec["pool"])
                    if w.name == f"stack-{name}" and w.last_heartbeat_time is not None
                ]
                if beats and max(beats) >= rec["since"] - 1:
                    break
                if not alive(rec) or time.monotonic() > deadline:
                    tail = Path(rec["log"]).read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{name} did not come online on {rec['pool']} (log: {rec['log']}):\n{tail}")
                time.sleep(1.0)
    say(
        f"workers online: {', '.join(r['pool'] for r in (procs[n] for n in WORKERS))} "
        f"({time.monotonic() - started:.0f} s)"
    )


def start_services(
    state_dir: Path, state: dict[str, Any], creds: dict[str, str]
) -> tuple[dict[str, str], dict[str, str | None]]:
    """SeaweedFS, the sample bucket and the Prefect server; the CLI's env for the server and the workers' S3 env."""
    from nst_testing.prefect import start_server
    from nst_testing.s3 import SeaweedFS, s3_environment

    procs = state["processes"]
    t0 = time.monotonic()
    weed = SeaweedFS(
        state_dir / "seaweedfs",
        s3_port=port_from("NST_STACK_S3_PORT", 8333),
        access_key=creds["AWS_ACCESS_KEY_ID"],
        secret_key=creds["AWS_SECRET_ACCESS_KEY"],
        locked=True,
    )
    try:
        weed.start()
    except BaseException:
        weed.stop()
        raise
    assert weed.proc is not None
    procs["seaweedfs"] = record_of(weed.proc.pid, weed.server.log_path)
    s3 = weed.server
    state["s3"] = {"endpoint_url": s3.endpoint_url, "region": s3.region, "ports": weed.ports}  # keys: ENV_FILE
    write_state(state_dir, state)
    state["manifest"] = seed(s3.client(), state["bucket"])
    say(f"SeaweedFS S3 on {s3.endpoint_url}, bucket {state['bucket']} with the sample ({time.monotonic() - t0:.0f} s)")

    t0 = time.monotonic()
    port = port_from("NST_STACK_PREFECT_PORT", 4200)
    server = start_server(state_dir / "prefect", port=port, auth_string=creds["PREFECT_API_AUTH_STRING"])
    assert server.proc is not None
    procs["prefect-server"] = record_of(server.proc.pid, server.log)
    state.update(api_url=server.api_url, ui_url=server.ui_url)
    write_state(state_dir, state)
    env = {"PREFECT_API_URL": server.api_url, "PREFECT_API_AUTH_STRING": creds["PREFECT_API_AUTH_STRING"]}
    env.update(AWS_ENDPOINT_URL=s3.endpoint_url, AWS_DEFAULT_REGION=s3.region)
    write_env(state_dir, {**env, **{k: creds[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})
    say(f"Prefect server on {server.ui_url} ({time.monotonic() - t0:.0f} s)")
    return server.env, s3_environment(s3, state_dir / "seaweedfs")


def start(state_dir: Path) -> dict[str, Any]:
    """Start the whole stack; on any failure stop what was started and re-raise."""
    state_dir.chmod(0o700)  # data, database and logs: the owner's only
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"repo": str(REPO), "bucket": BUCKET, "processes": {}}
    state["env_file"] = str(state_dir / ENV_FILE)
    creds = stack_secrets(state_dir)
    try:
        cli_env, s3_env = start_services(state_dir, state, creds)
        # deploy and the flow runs import nst/ and flows/ of this checkout, whichever checkout the venv was made in.
        cli_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), cli_env.get("PYTHONPATH")]))
        setup_log = state_dir / "logs" / "setup.log"
        state["setup_log"] = str(setup_log)
        # With this Python's venv; `make up` has installed it already (-o install: no reinstall check here).
        bindir = str(Path(sys.executable).parent)
        make = ["make", "--no-print-directory", "-C", str(REPO), "-o", "install", f"BIN={bindir}", "prefect-setup"]
        run_logged(make, env=cli_env, log=setup_log, what="make prefect-setup")
        from nst_testing.prefect import PREFECT_BIN

        deploy = [PREFECT_BIN, "--no-prompt", "deploy", "--all"]
        run_logged(deploy, env=cli_env, log=setup_log, what="prefect deploy --all")
        worker_env = {k: v for k, v in cli_env.items() if k not in s3_env}
        worker_env.update({k: v for k, v in s3_env.items() if v is not None})
        worker_env.update(roots(state["bucket"]))
        worker_env["PREFECT_WORKER_QUERY_SECONDS"] = "5"
        for name in WORKERS:
            state["processes"][name] = start_worker(name, worker_env, state_dir)
        write_state(state_dir, state)
        wait_for_workers(state["api_url"], creds["PREFECT_API_AUTH_STRING"], state["processes"])
    except BaseException:
        say("start failed: stopping what was started")
        stop_all(state)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        raise
    return state


def shown(path: Path | str) -> str:
    """A path as the user should type it: relative to the current directory when under it."""
    path = Path(path)
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def report(state: dict[str, Any]) -> None:
    """Print where everything is and the command to run."""
    procs, s3 = state["processes"], state["s3"]
    prefect = shown(Path(sys.executable).with_name("prefect"))
    lines = [
        "",
        f"Prefect UI:      {state['ui_url']}",
        f"S3 (SeaweedFS):  {s3['endpoint_url']}  bucket {state['bucket']}",
        f"Credentials:     {shown(state['env_file'])} (this stack's own; the UI asks for its PREFECT_API_AUTH_STRING)",
        "Processes and logs:",
        *(f"  {name:<15} pid {rec['pid']:<8} {shown(rec['log'])}" for name, rec in procs.items()),
        f"  {'set-up':<15} {'':<12} {shown(state['setup_log'])}",
        "",
        f"Run the sample manifest ({len(SAMPLE_PAIRS)} pairs, "
        f"{SAMPLE_DEFAULTS['size']} px, {SAMPLE_DEFAULTS['iterations']} iterations), then watch it in the UI:",
        f"  {load_command(state['env_file'])}",
        f"  {prefect} deployment run 'stylize-manifest/on-demand' -p manifest={state['manifest']}",
        f"Outputs go to s3://{state['bucket']}/results/sample/ (<id>.png + <id>.json per pair). Stop: make down",
    ]
    print("\n".join(lines), flush=True)


def up(state_dir: Path) -> int:
    """Start the stack, or reprint it if it is already running."""
    with locked(state_dir):
        state = read_state(state_dir)
        if state is not None:
            procs = state.get("processes", {})
            dead = [name for name, rec in procs.items() if not alive(rec)]
            if procs and not dead and healthy(state["api_url"]):
                say(f"already running (state in {shown(state_dir)})")
                report(state)
                return 0
            if len(dead) < len(procs):
                say(f"partly running ({', '.join(dead)} stopped): stopping the rest and starting again")
            stop_all(state)
        state = start(state_dir)
        write_state(state_dir, state)
        report(state)
    return 0


def down(state_dir: Path) -> int:
    """Stop every process `up` started; data (S3 objects, the Prefect database) and logs stay in the state dir."""
    with locked(state_dir):
        state = read_state(state_dir)
        if state is None:
            say(f"nothing to stop (no {STATE_FILE} in {shown(state_dir)})")
            return 0
        stop_all(state)
        (state_dir / STATE_FILE).unlink()
    say("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("command", choices=["up", "down", "seed"])
    parser.add_argument("--state-dir", type=Path, default=REPO / ".stack", help="where pids, data and logs live")
    parser.add_argument("--bucket", default=BUCKET, help="seed: the bucket to fill (AWS_* settings from the env)")
    args = parser.parse_args(argv)
    if args.command == "seed":
        print(seed(env_s3_client(), args.bucket))
        return 0
    state_dir = args.state_dir.resolve()
    return up(state_dir) if args.command == "up" else down(state_dir)


if __name__ == "__main__":
    sys.exit(main())
