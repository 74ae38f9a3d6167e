"""The run path as a package, one job per module.

- `layout`: where a run's files live beside the outputs (`<id>.png/.json/.claim`, `_runs/`), writes with retries;
- `inputs`: each input's identity (size + ETag/mtime), sha256 and pixel size, read once and only when needed;
- `planner`: which pairs are done and which run (`plan`);
- `claims`: per-pair claims, so two runs never interleave one pair's outputs;
- `batches`: same-shape pairs claimed, decoded, optimised and written;
- `records`: the per-pair JSON record and the run summary;
- `order`: records in their pairs' order (the manifest's, a batch's);
- `shards`: a sharded run on plain data (cost model, dealing batches to shards, a retry's shards, a dead child's pairs);
- `runner`: the whole run (`run`), with hooks for the caller (the CLI, the Prefect flow).
"""

from nst.run.batches import Batch, make_batches, run_batch
from nst.run.layout import output_uris, summary_uri
from nst.run.order import in_pair_order
from nst.run.planner import Plan, plan
from nst.run.records import PairRecord, record_failure, verify_written, write_run_summary
from nst.run.runner import RunHooks, RunSummary, local_hooks, new_run_id, run, some_ids
from nst.run.shards import Child, Shard, aggregate, child_options, given_ids, plan_shards

__all__ = [
    "Batch",
    "Child",
    "PairRecord",
    "Plan",
    "RunHooks",
    "RunSummary",
    "Shard",
    "aggregate",
    "child_options",
    "given_ids",
    "in_pair_order",
    "local_hooks",
    "make_batches",
    "new_run_id",
    "output_uris",
    "plan",
    "plan_shards",
    "record_failure",
    "run",
    "run_batch",
    "some_ids",
    "summary_uri",
    "verify_written",
    "write_run_summary",
]
