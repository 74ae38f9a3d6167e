"""Run options: how to run a manifest (which pairs, force, dry run, failure limit, batch size, Prefect's slots).

The single source for `nst run`'s flags, the `stylize-manifest` flow's `options` and the shard flow's `options`, as
`nst.params.StyleParams` is for the engine. Kept apart from the run path so that the CLI can build flags cheaply.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RunOptions(BaseModel):
    """How to run a manifest (not what to compute): the options of `nst run`, the flow and the shard flow."""

    model_config = ConfigDict(extra="forbid")

    pair_ids: list[str] | None = Field(
        None, description="run only these pair ids (default: every pair); unknown ids fail the run before any work"
    )
    pair_ids_file: str | None = Field(
        None,
        description="run only the pair ids listed (JSON) in this file under the output's _runs/ "
        "(the shard flow writes one per child whose list is long)",
    )
    force: bool = Field(
        False, description="run pairs even if their outputs already say succeeded with the same inputs and parameters"
    )
    replace_others: bool = Field(
        False,
        description="replace results another manifest (another `name:`) made from other inputs or parameters "
        "(otherwise such a pair fails and its result stays); --force alone never does",
    )
    rerun_older_engine: bool = Field(
        False,
        description="also run pairs whose outputs an older engine revision made (otherwise they count as done)",
    )
    dry_run: bool = Field(False, description="only report which pairs would run and which would be skipped")
    max_failures: int | None = Field(
        None, ge=1, description="after this many failed pairs start no new batches; the rest are recorded not_run"
    )
    max_batch_pairs: int = Field(
        8, ge=1, le=1024, description="at most this many pairs (same shape, same graph parameters) share one batch"
    )
    batch_timeout_s: float | None = Field(
        None, gt=0, description="Prefect only: cancel a batch that runs longer (seconds); its pairs are recorded failed"
    )
    cpu_slots: int = Field(
        1, ge=1, le=64, description="Prefect only: batches optimising at once without a GPU (with GPUs: one per GPU)"
    )
