"""Memory and message sizes of a huge all-done manifest: N done pairs (default 100,000) of tiny images, local disk.

    python -m bench.plan_memory --pairs 100000

Set-up: a grid of tiny JPEGs x 4 styles; one pair is stylized for real and its PNG and record are copied (with each
pair's own id, inputs and hashes) to make the N done pairs. Then, in a fresh process, the whole run path runs over
them (`nst.run.run`: plan, nothing to run, the summary and the record index written), twice: without a record index
(the first night after the records were made) and with the one that run left. One JSON line per run:
peak RSS, plan and run seconds, and the sizes of what a run publishes (summary, index, the longest message).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.nightly import STYLES, clone, peak_rss_mb

TINY_PX = 16


def tiny(i: int) -> bytes:
    """A distinct tiny JPEG."""
    pixels = np.random.default_rng(i).integers(0, 255, (TINY_PX, TINY_PX, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def set_up(root: Path, pairs: int) -> str:
    """Inputs, manifest and N done pairs under `root`; returns the manifest's path."""
    from nst.manifest import load_manifest
    from nst.run import run
    from nst.run_options import RunOptions

    files: dict[Path, bytes] = {root / f"incoming/p{i:06d}.jpg": tiny(i) for i in range(-(-pairs // STYLES))}
    files.update({root / f"styles/s{i}.jpg": tiny(10**7 + i) for i in range(STYLES)})
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    manifest = root / "many.yaml"
    manifest.write_text(
        "version: 1\nname: many\noutput: out/\ndefaults: {size: 32, iterations: 1}\n"
        "grid: {contents: [incoming/*.jpg], styles: [styles/*.jpg]}\n"
    )
    specs = load_manifest(str(manifest)).pairs[:pairs]
    run(str(manifest), RunOptions(pair_ids=[specs[0].id]))  # one real pair: the template record and PNG
    out = root / "out"
    template = json.loads((out / f"{specs[0].id}.json").read_text())
    png = (out / f"{specs[0].id}.png").read_bytes()
    sha = {str(p): hashlib.sha256(d).hexdigest() for p, d in files.items()}
    ident = {str(p): {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in files}
    png_sha = hashlib.sha256(png).hexdigest()
    for spec in specs[1:]:
        image = out / f"{spec.id}.png"
        image.write_bytes(png)
        st = image.stat()
        record = clone(template, spec, sha, ident, (png_sha, {"size": st.st_size, "mtime_ns": st.st_mtime_ns}))
        (out / f"{spec.id}.json").write_text(json.dumps(record))
    return str(manifest)


def measure(manifest: str, engine: bool) -> dict[str, Any]:
    """The whole run path over the done manifest, in this process; the figures. `engine`: torch loaded first, as in
    the stylize flow's worker (planning alone does not import it)."""
    if engine:
        import nst.engine.stylizer  # noqa: F401
    import nst.run.runner as runner
    from nst.run import run
    from nst.run.index import index_uri

    planning: list[float] = []
    real_plan = runner.plan  # type: ignore[attr-defined]

    def timed_plan(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return real_plan(*args, **kwargs)
        finally:
            planning.append(time.perf_counter() - started)

    runner.plan = timed_plan  # type: ignore[attr-defined]
    started = time.perf_counter()
    summary = run(manifest)  # what a nightly over a done manifest does: plan, nothing to run, summary and index
    run_s = time.perf_counter() - started
    plan_s = planning[0]
    output = summary.manifest.output
    messages = [str(r.error.get("message", "")) for r in summary.records if r.error]
    return {
        "engine_loaded": engine,
        "pairs": len(summary.records),
        "skipped": len(summary.ids("skipped")),
        "plan_s": round(plan_s, 1),
        "run_s": round(run_s, 1),
        "peak_rss_mb": peak_rss_mb(),
        "summary_bytes": os.path.getsize(summary.summary_uri or ""),
        "index_bytes": os.path.getsize(index_uri(output)) if os.path.exists(index_uri(output)) else None,
        "longest_message": max(map(len, messages), default=0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: run this manifest and print the figures
    parser.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.engine)), flush=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="nst-plan-memory-") as scratch:
        os.environ["NST_INPUT_ROOTS"] = scratch
        started = time.perf_counter()
        manifest = set_up(Path(scratch), args.pairs)
        setup_s = time.perf_counter() - started
        for engine in ([], [], ["--engine"]):  # no index yet; the index the first run left; torch loaded too
            cmd = [sys.executable, "-m", "bench.plan_memory", "--measure", manifest, *engine]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            print(json.dumps({"bench": "plan_memory", "setup_s": round(setup_s, 1), **json.loads(out)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
