"""Prefect set-up for this project, idempotent: work pools, the GPU-shard concurrency limit, the zombie automation.

    PREFECT_API_URL=http://prefect:4200/api python deploy/setup.py --gpu-shards 4
    python deploy/setup.py --k8s-pool gpu-k8s          # also the Kubernetes GPU pool (deploy/k8s-gpu-job-template.json)

What it declares (docs/scaling.md, docs/prefect.md):

- work pools `gpu-pool` (process; GPU workers, each `--limit 1`) and `parent-pool` (process; shard parents, which
  only plan, start children and wait, so they never hold a GPU worker's only slot). Created when missing; an
  existing pool is left as it is (its base job template may carry local changes).
- global concurrency limit `gpu-shards` with `--gpu-shards` slots (the number of GPUs the pool has): at most that
  many GPU shards run at once across the pool; created or its limit updated.
- every automation in deploy/automations.yaml (the heartbeat automation that marks zombie flow runs Crashed),
  created or updated by name, so running this twice leaves one of each.
- with `--k8s-pool NAME`: a Kubernetes work pool whose base job template is deploy/k8s-gpu-job-template.json
  (created, or its template updated).

Run it before `prefect deploy --all` (deploy needs the pools). Uses only the Prefect client and the server's API.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
AUTOMATIONS_FILE = HERE / "automations.yaml"
K8S_TEMPLATE_FILE = HERE / "k8s-gpu-job-template.json"

GPU_POOL = "gpu-pool"
PARENT_POOL = "parent-pool"
GPU_SHARDS_LIMIT = "gpu-shards"

PROCESS_POOLS = {
    GPU_POOL: "GPU workers, one per GPU, each started with --limit 1 (stylize-manifest runs and shards)",
    PARENT_POOL: "Light work: shard-manifest parents plan, start child runs on gpu-pool and wait for them",
}


def load_automations(path: Path = AUTOMATIONS_FILE) -> list[dict[str, Any]]:
    """The automations declared in `path` (`automations:` list, as `prefect automation create --from-file` reads)."""
    data = yaml.safe_load(path.read_text())
    automations = data["automations"] if isinstance(data, dict) else data
    return list(automations)


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


def setup(*, gpu_shards: int, k8s_pool: str | None = None) -> list[str]:
    """Apply everything against the server in PREFECT_API_URL; returns one line per object."""
    from prefect.client.orchestration import get_client

    done: list[str] = []
    with get_client(sync_client=True) as client:
        for name, description in PROCESS_POOLS.items():
            done.append(ensure_process_pool(client, name, description))
        if k8s_pool:
            done.append(ensure_k8s_pool(client, k8s_pool, load_k8s_template()))
        done.append(ensure_gpu_limit(client, gpu_shards))
        for spec in load_automations():
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
    args = parser.parse_args(argv)
    if args.gpu_shards < 1:
        parser.error("--gpu-shards must be at least 1")
    for line in setup(gpu_shards=args.gpu_shards, k8s_pool=args.k8s_pool):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
