"""A Prefect server restart mid-run leaks no gpu-shards slot (issue 18, item 7).

Real parts: `prefect server start` (settings of nst_testing/prefect.py, i.e. deploy/setup.py's SERVER_SETTINGS),
deploy/setup.py, the stylize-manifest/on-demand deployment of prefect.yaml and a process worker on gpu-pool. While
the run's batch holds the pool's only gpu-shards slot, the server is stopped and started again on the same port, home
and database. With Prefect's default in-memory lease storage the restarted server has forgotten the slot's lease, so
the batch's release frees nothing and the slot stays taken for good (every later deployment batch waits forever).
"""

import re
import signal
import time
from pathlib import Path

import pytest

from flows.stylize import GPU_SHARDS_LIMIT, SLOT_LEASE_S
from nst_testing.paths import REPO, SAMPLES
from nst_testing.prefect import (
    PrefectServer,
    kill_process_groups,
    process_tree,
    run_setup,
    start_process_worker,
    start_server,
    stop_process,
    wait_for_flow_run,
)

pytestmark = pytest.mark.slow


def active_slots(server: PrefectServer) -> int:
    """Active slots of gpu-shards, read through the API (what `prefect gcl inspect gpu-shards` shows, without a CLI
    process of ~2 s of CPU at every poll)."""
    with server.client() as client:
        return client.read_global_concurrency_limit_by_name(GPU_SHARDS_LIMIT).active_slots


def restart(server: PrefectServer) -> tuple[PrefectServer, float]:
    """Stop the server (SIGINT, as Ctrl-C) and start it again with the same home, database and port."""
    assert server.proc is not None
    port = int(server.api_url.rsplit(":", 1)[1].split("/", 1)[0])
    began = time.monotonic()
    stop_process(server.proc, first=signal.SIGINT)
    again = start_server(server.home, port=port)
    return again, time.monotonic() - began


def test_a_server_restart_mid_run_gives_the_gpu_slot_back(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    server = start_server(tmp_path_factory.mktemp("prefect-server-restart"))
    worker = None
    try:
        run_setup(server, "--gpu-shards", "1")
        server.cli("--no-prompt", "deploy", "--name", "stylize-manifest/on-demand", cwd=REPO)
        content, style = SAMPLES / "content" / "chelsea.jpg", SAMPLES / "styles" / "brick.jpg"
        # One pair long enough (hundreds of iterations) that its batch still holds the slot when the server stops.
        (tmp_path / "restart.yaml").write_text(
            "version: 1\nname: restart\noutput: out/\ndefaults: {size: 32, iterations: 300}\n"
            f"pairs:\n  - {{id: one, content: {content}, style: {style}}}\n"
        )
        worker = start_process_worker(server, "gpu-pool", tmp_path / "worker", cwd=REPO, limit=1)
        result = server.cli(
            "deployment", "run", "stylize-manifest/on-demand", "-p", f"manifest={tmp_path / 'restart.yaml'}"
        )
        match = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
        assert match, result.stdout
        run_id = match.group(1)

        deadline = time.monotonic() + 600  # the flow run's process starts, loads torch and VGG, reads its inputs
        while active_slots(server) != 1:
            with server.client() as client:
                run = client.read_flow_run(run_id)
            assert run.state is not None and not run.state.is_final(), (run.state_name, run.state.message)
            assert worker.proc.poll() is None, worker.log_tail()
            assert time.monotonic() < deadline, f"the run never took the gpu-shards slot\n{worker.log_tail()}"
            time.sleep(0.5)

        server, took_s = restart(server)
        print(f"\nserver restarted in {took_s:.0f} s while the run held the gpu-shards slot")

        run = wait_for_flow_run(server, run_id, timeout=900, worker=worker)
        if run.state.is_crashed():  # allowed: e.g. the heartbeat automation lost patience while the server was down
            server.cli("flow-run", "retry", run_id)
            run = wait_for_flow_run(server, run_id, timeout=900, after_run_count=run.run_count, worker=worker)
        assert run.state.is_completed(), (run.state_name, run.state.message, worker.log_tail())
        assert (tmp_path / "out" / "one.png").is_file()

        # The slot comes back at the batch's release; the expiry of the lease (+ the server's 15 s repossessor
        # loop) is the latest it may take. With the lease forgotten it never does.
        deadline = time.monotonic() + SLOT_LEASE_S + 60
        while (slots := active_slots(server)) != 0:
            assert time.monotonic() < deadline, f"gpu-shards still has {slots} active slot(s) after the run ended"
            time.sleep(2)
    finally:
        if worker is not None:
            descendants = process_tree(worker.proc.pid)[1:]
            stop_process(worker.proc, first=signal.SIGINT, grace_s=30)
            kill_process_groups(descendants)  # a flow run's process lives in a process group of its own
        assert server.proc is not None
        stop_process(server.proc)
