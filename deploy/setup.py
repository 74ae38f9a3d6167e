"""Prefect set-up for this project, idempotent: work pools, the GPU-shard concurrency limit, the automations.

    PREFECT_API_URL=http://prefect:4200/api python deploy/setup.py --gpu-shards 4
    python deploy/setup.py --k8s-pool gpu-k8s          # also the Kubernetes GPU pool (deploy/k8s-gpu-job-template.json)
    NST_ALERT_WEBHOOK_URL=https://hooks.example.com/... python deploy/setup.py   # nightly failures go there

What it declares (docs/scaling.md, docs/prefect.md):

- work pools `gpu-pool` (process; GPU workers, each `--limit 1`) and `parent-pool` (process; shard parents, which
  only plan, start children and wait, so they never hold a GPU worker's only slot). Created when missing; an
  existing pool is left as it is (its base job template may carry local changes).
- global concurrency limit `gpu-shards` with `--gpu-shards` slots (the number of GPUs the pool has): at most that
  many GPU shards run at once across the pool; created or its limit updated.
- every automation in deploy/automations.yaml, created or updated by name, so running this twice leaves one of each:
  the heartbeat automation that marks zombie flow runs Crashed; the nightly failure notification, to the block named
  by `--alert-webhook-block` (NST_ALERT_WEBHOOK_BLOCK) or the block `nst-alerts` made from `--alert-webhook-url`
  (NST_ALERT_WEBHOOK_URL; its path, query and any user:password are kept in the block's `secrets`, the stored `url`
  names only the scheme and host), skipped without either; and per pool a late-run automation that tells a run no worker
  started within `--late-after` seconds (NST_LATE_AFTER_S) to start one.
- a check that the server keeps concurrency leases on disk (SERVER_SETTINGS): with Prefect's default, in memory, a
  server restart leaks the gpu-shards slots that runs held.
- with `--k8s-pool NAME`: a Kubernetes work pool whose base job template is deploy/k8s-gpu-job-template.json
  (created, or its template updated).

Run it before `prefect deploy --all` (deploy needs the pools). Uses only the Prefect client and the server's API.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import urlsplit

import yaml

HERE = Path(__file__).resolve().parent
AUTOMATIONS_FILE = HERE / "automations.yaml"
K8S_TEMPLATE_FILE = HERE / "k8s-gpu-job-template.json"

GPU_POOL = "gpu-pool"
PARENT_POOL = "parent-pool"
GPU_SHARDS_LIMIT = "gpu-shards"

# Settings every Prefect server of this project is started with (docs/prefect.md, nst_testing/prefect.py,
# scripts/stack.py). Concurrency leases (gpu-shards slots, deployment concurrency) live in the server's memory by
# default: after a restart releasing a slot frees nothing and the slot is lost for good. On disk (PREFECT_HOME of the
# server) they survive a restart; expired ones are still given back by the server's repossessor.
SERVER_SETTINGS = {"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem"}

ALERT_BLOCK_PLACEHOLDER = "ALERT_WEBHOOK_BLOCK"  # in automations.yaml: the alert webhook block's id goes here
ALERT_BLOCK_NAME = "nst-alerts"  # the block made from --alert-webhook-url
ALERT_BLOCK_TYPE = "custom-webhook"  # Prefect's CustomWebhookNotificationBlock
DEFAULT_LATE_AFTER_S = 600

PROCESS_POOLS = {
    GPU_POOL: "GPU workers, one per GPU, each started with --limit 1 (stylize-manifest runs and shards)",
    PARENT_POOL: "Light work: shard-manifest parents plan, start child runs on gpu-pool and wait for them",
}


def load_automations(path: Path = AUTOMATIONS_FILE) -> list[dict[str, Any]]:
    """The automations declared in `path` (`automations:` list, as `prefect automation create --from-file` reads)."""
    data = yaml.safe_load(path.read_text())
    automations = data["automations"] if isinstance(data, dict) else data
    return list(automations)


def load_pool_automations(pool: str, late_after_s: int, path: Path = AUTOMATIONS_FILE) -> list[dict[str, Any]]:
    """The `per_pool_automations:` of `path` for work pool `pool`, with ${pool} and ${late_after_s} filled in."""
    values: dict[str, Any] = {"pool": pool, "late_after_s": late_after_s}

    def fill(value: Any) -> Any:
        if isinstance(value, str):  # a value that is one placeholder keeps its type (`within: ${late_after_s}`)
            whole = value.removeprefix("${").removesuffix("}")
            return values[whole] if whole in values and value == f"${{{whole}}}" else Template(value).substitute(values)
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    data = yaml.safe_load(path.read_text())
    return [fill(spec) for spec in data.get("per_pool_automations") or []]


def load_k8s_template(path: Path = K8S_TEMPLATE_FILE) -> dict[str, Any]:
    """The Kubernetes GPU pool's base job template."""
    template: dict[str, Any] = json.loads(path.read_text())
    return template


def ensure_process_pool(client: Any, name: str, description: str) -> str:
    """Create process work pool `name` with Prefect's default template unless it exists; returns what was done."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        client.read_work_pool(name)
        return f"work pool {name}: exists, left as it is"
    except ObjectNotFound:
        pass
    client.create_work_pool(
        WorkPoolCreate(
            name=name,
            type="process",
            description=description,
            base_job_template=ProcessWorker.get_default_base_job_template(),
        )
    )
    return f"work pool {name}: created (process)"


def ensure_k8s_pool(client: Any, name: str, template: dict[str, Any]) -> str:
    """Create Kubernetes work pool `name` with `template`, or update an existing pool's template."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    try:
        client.read_work_pool(name)
    except ObjectNotFound:
        client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type="kubernetes",
                description="One Kubernetes Job per flow run, one GPU each (deploy/k8s-gpu-job-template.json)",
                base_job_template=template,
            )
        )
        return f"work pool {name}: created (kubernetes)"
    client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
    return f"work pool {name}: base job template updated"


def ensure_gpu_limit(client: Any, limit: int) -> str:
    """Create the `gpu-shards` global concurrency limit or set its limit."""
    client.upsert_global_concurrency_limit_by_name(GPU_SHARDS_LIMIT, limit)
    return f"global concurrency limit {GPU_SHARDS_LIMIT}: {limit} slots"


def check_server(client: Any) -> str:
    """Whether the server runs with SERVER_SETTINGS (read from its /admin/settings); a warning line if not."""
    try:
        settings = client.request("GET", "/admin/settings").json()
    except Exception as exc:  # e.g. Prefect Cloud has no such endpoint: nothing to check
        return f"server: lease storage not checked ({type(exc).__name__})"
    storage = settings.get("server", {}).get("concurrency", {}).get("lease_storage")
    (name, wanted), *_ = SERVER_SETTINGS.items()
    if storage == wanted:
        return f"server: concurrency leases on disk ({storage})"
    return (
        f"WARNING server: concurrency leases in memory ({storage}): a server restart leaks the gpu-shards slots "
        f"held at that moment; start the server with {name}={wanted}"
    )


def webhook_template(url: str) -> tuple[str, dict[str, str]]:
    """`url` as a URL template naming only scheme, host and port, plus the secrets that fill it in (its path, query
    and fragment: a webhook's token; and any user:password)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    secret_values = {"webhook_path": url[len(f"{parts.scheme}://{parts.netloc}") :]}
    userinfo = parts.netloc.rpartition("@")[0]
    if userinfo:
        secret_values["webhook_userinfo"] = userinfo
        host = "{{webhook_userinfo}}@" + host
    return f"{parts.scheme}://{host}{{{{webhook_path}}}}", secret_values


def ensure_alert_block(client: Any, *, block: str | None, url: str | None) -> str | None:
    """Id of the alert notification block: `block` ("[type-slug/]name", default type custom-webhook), or one made
    from `url`; None when neither is given."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.exceptions import ObjectNotFound

    if block:
        slug, _, name = block.rpartition("/")
        try:
            return str(client.read_block_document_by_name(name, slug or ALERT_BLOCK_TYPE).id)
        except ObjectNotFound:
            raise SystemExit(
                f"alert webhook block {block!r} (NST_ALERT_WEBHOOK_BLOCK) not found on the server: "
                f"create it (prefect block create ...) or give NST_ALERT_WEBHOOK_URL instead"
            ) from None
    if not url:
        return None
    template, secret_values = webhook_template(url)
    webhook = CustomWebhookNotificationBlock(
        name=ALERT_BLOCK_NAME,
        url=template,
        secrets=secret_values,
        json_data={"text": "{{subject}}\n{{body}}", "subject": "{{subject}}", "body": "{{body}}"},
    )
    return str(webhook.save(ALERT_BLOCK_NAME, overwrite=True))


def with_alert_block(spec: dict[str, Any], block_id: str | None) -> dict[str, Any] | None:
    """`spec` with the alert block's id in place of ALERT_WEBHOOK_BLOCK; None if it needs one and there is none."""
    actions = spec.get("actions", [])
    if not any(a.get("block_document_id") == ALERT_BLOCK_PLACEHOLDER for a in actions):
        return spec
    if block_id is None:
        return None
    filled = [
        {**a, "block_document_id": block_id} if a.get("block_document_id") == ALERT_BLOCK_PLACEHOLDER else a
        for a in actions
    ]
    return {**spec, "actions": filled}


def ensure_automation(client: Any, spec: dict[str, Any]) -> str:
    """Create the automation, or update the one with the same name (a duplicate name is an error to fix by hand)."""
    from prefect.events.schemas.automations import AutomationCore

    automation = AutomationCore.model_validate(spec)
    existing = client.read_automations_by_name(automation.name)
    if len(existing) > 1:
        raise SystemExit(
            f"{len(existing)} automations are named {automation.name!r}: delete the extra ones "
            f"(prefect automation ls; prefect automation delete --id ...) and run this again"
        )
    if existing:
        client.update_automation(existing[0].id, automation)
        return f"automation {automation.name}: updated"
    client.create_automation(automation)
    return f"automation {automation.name}: created"


def setup(
    *,
    gpu_shards: int,
    k8s_pool: str | None = None,
    alert_block: str | None = None,
    alert_url: str | None = None,
    late_after_s: int = DEFAULT_LATE_AFTER_S,
) -> list[str]:
    """Apply everything against the server in PREFECT_API_URL; returns one line per object."""
    from prefect.client.orchestration import get_client

    done: list[str] = []
    with get_client(sync_client=True) as client:
        done.append(check_server(client))
        pools = list(PROCESS_POOLS)
        for name, description in PROCESS_POOLS.items():
            done.append(ensure_process_pool(client, name, description))
        if k8s_pool:
            done.append(ensure_k8s_pool(client, k8s_pool, load_k8s_template()))
            pools.append(k8s_pool)
        done.append(ensure_gpu_limit(client, gpu_shards))
        block_id = ensure_alert_block(client, block=alert_block, url=alert_url)
        for spec in load_automations():
            filled = with_alert_block(spec, block_id)
            if filled is None:
                done.append(
                    f"automation {spec['name']}: skipped (set NST_ALERT_WEBHOOK_URL or NST_ALERT_WEBHOOK_BLOCK)"
                )
            else:
                done.append(ensure_automation(client, filled))
        for pool in pools:
            for spec in load_pool_automations(pool, late_after_s):
                done.append(ensure_automation(client, spec))
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--gpu-shards",
        type=int,
        default=1,
        help="slots of the gpu-shards concurrency limit: how many GPU shards may run at once (= GPUs in the pool)",
    )
    parser.add_argument("--k8s-pool", metavar="NAME", help="also create/update this Kubernetes GPU work pool")
    parser.add_argument(
        "--alert-webhook-block",
        metavar="[TYPE/]NAME",
        default=os.environ.get("NST_ALERT_WEBHOOK_BLOCK") or None,
        help="notification block for nightly failures, e.g. slack-webhook/ops (default type custom-webhook); "
        "env NST_ALERT_WEBHOOK_BLOCK",
    )
    parser.add_argument(
        "--alert-webhook-url",
        metavar="URL",
        default=os.environ.get("NST_ALERT_WEBHOOK_URL") or None,
        help=f"or a URL: saved as the custom-webhook block {ALERT_BLOCK_NAME} (JSON: text, subject, body); "
        "env NST_ALERT_WEBHOOK_URL",
    )
    parser.add_argument(
        "--late-after",
        metavar="SECONDS",
        type=int,
        default=int(os.environ.get("NST_LATE_AFTER_S") or DEFAULT_LATE_AFTER_S),
        help="a run Late this long without a worker gets a state message saying to start one; env NST_LATE_AFTER_S",
    )
    args = parser.parse_args(argv)
    if args.gpu_shards < 1:
        parser.error("--gpu-shards must be at least 1")
    if args.late_after < 10:
        parser.error("--late-after must be at least 10 seconds (Prefect's minimum for such a trigger)")
    lines = setup(
        gpu_shards=args.gpu_shards,
        k8s_pool=args.k8s_pool,
        alert_block=args.alert_webhook_block,
        alert_url=args.alert_webhook_url,
        late_after_s=args.late_after,
    )
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
