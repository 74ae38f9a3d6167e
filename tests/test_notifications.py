"""The nightly failure notification (issue 18, "Also"): deploy/automations.yaml's notify-nightly-failures.

Real parts: `prefect server start`, deploy/setup.py with `--alert-webhook-url` (the custom-webhook block it saves), the
deployments of prefect.yaml, a process worker, and an HTTP receiver in this test standing for the team's webhook.
"""

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.states import Crashed

from deploy.setup import ALERT_BLOCK_NAME, ALERT_BLOCK_TYPE, load_automations
from nst_testing.paths import REPO
from nst_testing.prefect import PrefectServer, WorkerFactory, run_setup, wait_for_flow_run


class Receiver:
    """An HTTP server on a free local port that records the JSON body and the path of every POST."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        paths: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append(json.loads(body or b"{}"))
                paths.append(self.path)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.received = received
        self.paths = paths
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait_for(self, text: str, timeout: float = 180) -> dict[str, Any]:
        """The first request whose body mentions `text`, polling until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for request in list(self.received):
                if text in json.dumps(request):
                    return request
            assert time.monotonic() < deadline, f"no notification mentions {text!r}: {self.received}"
            time.sleep(1)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    try:
        yield rec
    finally:
        rec.httpd.shutdown()
        rec.httpd.server_close()


def deployment_run(server: PrefectServer, name: str, manifest: Path) -> str:
    result = server.cli("deployment", "run", name, "-p", f"manifest={manifest}")
    match = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
    assert match, result.stdout
    return match.group(1)


def test_every_nightly_deployment_is_tagged_for_the_notification() -> None:
    """prefect.yaml's nightly deployments carry the tag the automation watches; the on-demand ones do not."""
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for dep in config["deployments"]:
        assert ("nightly" in dep["tags"]) == (dep["name"] == "nightly"), (dep["entrypoint"], dep["name"])
    [spec] = [a for a in load_automations() if a["name"] == "notify-nightly-failures"]
    assert spec["trigger"]["match_related"] == {
        "prefect.resource.role": "tag",
        "prefect.resource.id": "prefect.tag.nightly",
    }


@pytest.mark.slow
def test_a_failed_or_crashed_nightly_run_is_sent_to_the_webhook_and_other_runs_are_not(
    isolated_prefect_server: PrefectServer,
    isolated_process_worker: WorkerFactory,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    server = isolated_prefect_server
    out = run_setup(server, "--alert-webhook-url", receiver.url)
    assert "automation notify-nightly-failures: created" in out, out
    names = ("stylize-manifest/nightly", "stylize-manifest/on-demand")
    server.cli("--no-prompt", "deploy", *(a for name in names for a in ("--name", name)), cwd=REPO)  # one process
    with server.client() as client:
        nightly = client.read_deployment_by_name("stylize-manifest/nightly")
        assert "nightly" in nightly.tags
        # A nightly run whose machine was lost: Crashed (as crash-zombie-flow-runs would set it).
        crashed = client.create_flow_run_from_deployment(nightly.id)
        client.set_flow_run_state(crashed.id, Crashed(message="machine lost (test)"), force=True)
    got = receiver.wait_for(str(crashed.id))
    assert got["subject"].startswith("Nightly Crashed: nightly"), got
    assert crashed.name in got["body"] and "machine lost (test)" in got["body"], got
    assert f"{server.ui_url}/runs/flow-run/{crashed.id}" in got["body"], got

    # A real run that fails: the manifest names an input that is not there (and, on the nightly deployment, lies
    # outside the roots prefect.yaml gives it).
    manifest = tmp_path / "nightly.yaml"
    manifest.write_text(
        "version: 1\nname: broken\noutput: out/\npairs:\n  - {id: one, content: gone.jpg, style: gone.png}\n"
    )
    worker = isolated_process_worker("gpu-pool", cwd=REPO)
    other = deployment_run(server, "stylize-manifest/on-demand", manifest)  # not nightly: no notification
    assert wait_for_flow_run(server, other, timeout=600, worker=worker).state.is_failed()
    failed = deployment_run(server, "stylize-manifest/nightly", manifest)
    run = wait_for_flow_run(server, failed, timeout=600, worker=worker)
    assert run.state.is_failed(), (run.state_name, run.state.message)
    got = receiver.wait_for(failed)
    assert got["subject"].startswith("Nightly Failed: nightly"), got
    # The run's own message (the nightly deployment's roots refuse this test's manifest, or its input is missing).
    assert run.name in got["body"] and (run.state.message or "-")[:40] in got["body"], got
    assert f"{server.ui_url}/runs/flow-run/{failed}" in got["body"], got
    assert got["text"] == f"{got['subject']}\n{got['body']}"  # Slack-style `text` for chat webhooks
    assert not [r for r in receiver.received if other in json.dumps(r)], receiver.received
    assert len(receiver.received) == 2, receiver.received


@pytest.mark.slow
def test_the_webhook_token_is_kept_in_the_block_secrets_not_in_its_url(
    isolated_prefect_server: PrefectServer, receiver: Receiver
) -> None:
    """Who can read blocks sees the webhook's host, not its token; the notification still carries the token."""
    server = isolated_prefect_server
    token = f"tok{uuid.uuid4().hex}"
    run_setup(server, "--alert-webhook-url", f"{receiver.url}/{token}?key={token}")
    with server.client() as client:
        stored = client.read_block_document_by_name(ALERT_BLOCK_NAME, ALERT_BLOCK_TYPE, include_secrets=False)
    assert token not in stored.data["url"] and token not in json.dumps(stored.data, default=str), stored.data
    with server.settings():
        block = CustomWebhookNotificationBlock.load(ALERT_BLOCK_NAME)
        assert isinstance(block, CustomWebhookNotificationBlock)
        block.notify("a body", "a subject")
    assert receiver.paths == [f"/hook/{token}?key={token}"], receiver.paths
    assert receiver.received[-1]["subject"] == "a subject"
