"""What a nightly costs: N done pairs plus k new ones on S3, and what `plan` reads to tell them apart.

    python -m bench.nightly --pairs 10000 --new 100 --rtt-ms 15

Real SeaweedFS on localhost; `--rtt-ms` adds a sleep before each HTTP response is read (a remote S3's round trip).
Set-up: a grid of ~180 KB JPEG photos x 4 styles; one pair is stylized for real (32 px, 1 iteration) and its PNG and
record are copied, with each pair's own ids, inputs and hashes, to make the N done pairs, and a run over them stands
for last night (it leaves the record index behind). The k new pairs are tonight's photos. Then `plan` runs in a
fresh process, which prints one JSON line: plan seconds, peak RSS, requests, and bytes read by kind (inputs, PNGs,
records, manifest) plus listings. Works on older checkouts too (`nst.pipeline`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import http.client
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

STYLES = 4
PHOTO_PX = (560, 420)  # ~180 KB as JPEG at quality 85 (noise compresses poorly)


def photo(i: int) -> bytes:
    """A distinct ~200 KB JPEG (seeded noise)."""
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 255, (PHOTO_PX[1], PHOTO_PX[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def run_module() -> Any:
    """The run path of this checkout: `nst.run` (now) or `nst.pipeline` (before the split)."""
    try:
        import nst.run.planner

        return nst.run
    except ImportError:
        import nst.pipeline

        return nst.pipeline


def put_all(items: dict[str, bytes]) -> dict[str, Any]:
    """Write every URI -> bytes in parallel; the store's answer for each."""
    from nst import storage

    with ThreadPoolExecutor(32) as pool:
        return dict(zip(items, pool.map(lambda u: storage.write_bytes(u, items[u]), items), strict=True))


def clone(
    template: dict[str, Any], spec: Any, sha: dict[str, str], ident: dict[str, Any], png: tuple[str, Any]
) -> dict[str, Any]:
    """The template record made for `spec`: its id, inputs (sha256, identity if the format has one) and PNG."""
    record = copy.deepcopy(template)
    record["id"] = spec.id
    entries = [record["inputs"]["content"], *record["inputs"]["styles"]]
    for entry, uri in zip(entries, [spec.content, *spec.styles], strict=True):
        entry.update(uri=uri, sha256=sha[uri])
        if "identity" in entry:
            entry["identity"] = ident[uri]
    out = record["output"]
    out["image"] = out["image"].rsplit("/", 1)[0] + f"/{spec.id}.png"
    out["json"] = out["json"].rsplit("/", 1)[0] + f"/{spec.id}.json"
    out["image_sha256"] = png[0]
    if "image_identity" in out:
        out["image_identity"] = png[1]
    return record


def set_up(bucket_uri: str, pairs: int, new: int) -> str:
    """Inputs, manifest and N done pairs under `bucket_uri`; returns the manifest's URI."""
    from nst.manifest import load_manifest
    from nst.run_options import RunOptions

    old_photos = -(-pairs // STYLES)
    photos = {f"{bucket_uri}incoming/p{i:06d}.jpg": photo(i) for i in range(old_photos + -(-new // STYLES))}
    styles = {f"{bucket_uri}styles/s{i}.jpg": photo(10**7 + i) for i in range(STYLES)}
    written = put_all({**photos, **styles})
    manifest = f"{bucket_uri}nightly.yaml"
    text = "version: 1\nname: nightly\noutput: out/\ndefaults: {size: 32, iterations: 1}\n"
    text += "grid: {contents: [incoming/*.jpg], styles: [styles/*.jpg]}\n"
    put_all({manifest: text.encode()})
    specs = load_manifest(manifest).pairs
    old = set(list(photos)[:old_photos])
    done = [p for p in specs if p.content in old][:pairs]
    run = run_module()
    run.run(manifest, RunOptions(pair_ids=[done[0].id]))  # one real pair: the template record and PNG
    from nst import storage

    template = json.loads(storage.read_bytes(f"{bucket_uri}out/{done[0].id}.json"))
    png_bytes = storage.read_bytes(f"{bucket_uri}out/{done[0].id}.png")
    sha = {u: hashlib.sha256(b).hexdigest() for u, b in {**photos, **styles}.items()}
    ident = {u: {"size": info.size, "etag": info.etag} for u, info in written.items() if info is not None}
    pngs = put_all({f"{bucket_uri}out/{p.id}.png": png_bytes for p in done[1:]})
    png_sha = hashlib.sha256(png_bytes).hexdigest()
    records = {
        f"{bucket_uri}out/{p.id}.json": json.dumps(
            clone(template, p, sha, ident, (png_sha, _identity(pngs[f"{bucket_uri}out/{p.id}.png"])))
        ).encode()
        for p in done[1:]
    }
    put_all(records)
    # Last night's run over the done pairs: it stores what a nightly starts from (the record index, where there is one).
    run.run(manifest, RunOptions(pair_ids=[p.id for p in done]))
    return manifest


def _identity(info: Any) -> Any:
    return {"size": info.size, "etag": info.etag} if info is not None else None


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux keeps that across exec, so a child started by a big
    parent reports the parent's size."""
    with open("/proc/self/status") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    return round(kib / 1024, 1)


def measure(manifest: str, rtt_ms: float) -> dict[str, Any]:
    """Plan the manifest (this process) with counted requests and reads; the figures."""
    from nst import storage
    from nst.manifest import load_manifest
    from nst.run_options import RunOptions

    requests: Counter[str] = Counter()
    lock = threading.Lock()
    original = http.client.HTTPConnection.getresponse

    def getresponse(self: http.client.HTTPConnection, *args: Any, **kwargs: Any) -> http.client.HTTPResponse:
        time.sleep(rtt_ms / 1000)
        with lock:
            requests["all"] += 1
        return original(self, *args, **kwargs)

    http.client.HTTPConnection.getresponse = getresponse  # type: ignore[method-assign]
    read: Counter[str] = Counter()
    listings = Counter[str]()
    real_read = storage.read_bytes
    real_list = storage.list_prefix

    def kind(uri: str) -> str:
        return (
            "pngs"
            if uri.endswith(".png")
            else "records"
            if "/out/" in uri
            else "manifest"
            if uri.endswith(".yaml")
            else "inputs"
            if uri.startswith("s3://")
            else "spool"
        )

    def read_bytes(uri: str, **kwargs: Any) -> bytes:
        data = real_read(uri, **kwargs)
        with lock:
            read[kind(uri)] += len(data)
        return data

    def list_prefix(uri: str) -> Any:
        with lock:
            listings["calls"] += 1
        return real_list(uri)

    storage.read_bytes = read_bytes
    storage.list_prefix = list_prefix  # type: ignore[assignment]
    if hasattr(storage, "read_with_info"):
        real_info = storage.read_with_info

        def read_with_info(uri: str, **kwargs: Any) -> Any:
            data, info = real_info(uri, **kwargs)
            with lock:
                read[kind(uri)] += len(data)
            return data, info

        storage.read_with_info = read_with_info
        storage.read_bytes = lambda uri, **kw: read_with_info(uri, **kw)[0]
    run = run_module()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as spool:
        plan = run.plan(load_manifest(manifest), RunOptions(), spool=spool)
    seconds = time.perf_counter() - started
    return {
        "plan_s": round(seconds, 2),
        "to_run": len(plan.to_run),
        "skipped": len(plan.skipped),
        "peak_rss_mb": peak_rss_mb(),
        "requests": requests["all"],
        "listing_calls": listings["calls"],
        "bytes_read": dict(read),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1000, help="done pairs")
    parser.add_argument("--new", type=int, default=0, help="new pairs (tonight's photos x the styles)")
    parser.add_argument("--rtt-ms", type=float, default=15.0)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: plan this manifest and print the figures
    args = parser.parse_args(argv)
    if args.measure:
        if os.environ.get("NST_BENCH_PROFILE"):  # where plan's time goes, to stderr
            import cProfile
            import pstats

            with cProfile.Profile() as prof:
                figures = measure(args.measure, args.rtt_ms)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
        else:
            figures = measure(args.measure, args.rtt_ms)
        print(json.dumps(figures), flush=True)
        return 0
    from nst_testing.s3 import running_seaweedfs, s3_environment

    with tempfile.TemporaryDirectory(prefix="nst-nightly-") as scratch, running_seaweedfs(Path(scratch)) as s3:
        env = {k: v for k, v in s3_environment(s3, Path(scratch)).items() if v is not None}
        os.environ.update(env)
        from nst import storage

        storage.reset_clients()
        bucket = f"s3://{s3.create_bucket()}/"
        os.environ["NST_INPUT_ROOTS"] = bucket
        started = time.perf_counter()
        manifest = set_up(bucket, args.pairs, args.new)
        setup_s = time.perf_counter() - started
        cmd = [sys.executable, "-m", "bench.nightly", "--measure", manifest, "--rtt-ms", str(args.rtt_ms)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ})
        sys.stderr.write(done.stderr)
        out = done.stdout
        row = {
            "bench": "nightly",
            "pairs": args.pairs,
            "new": args.new,
            "rtt_ms": args.rtt_ms,
            "setup_s": round(setup_s, 1),
        }
        print(json.dumps({**row, **json.loads(out.strip().splitlines()[-1])}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
