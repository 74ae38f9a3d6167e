"""`nst` console script; every parameter flag is generated from nst.params.StyleParams."""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nst.errors import NSTError, OutputError
from nst.params import PARAM_NAMES, PRESETS, StyleParams, resolve_params


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_param_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per StyleParams field, with its type, choices, default and description; unset flags stay None."""
    group = parser.add_argument_group("style-transfer parameters (defaults shown; a --preset changes them)")
    for name, info in StyleParams.model_fields.items():
        annotation = _unwrap_optional(info.annotation)
        default = info.get_default(call_default_factory=True)
        help_text = f"{info.description} (default: {default if default is not None else 'unset'})"
        kwargs: dict[str, Any] = {"default": None, "help": help_text, "dest": name}
        origin = typing.get_origin(annotation)
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            (item,) = typing.get_args(annotation)
            kwargs.update(nargs="+", type=item, metavar=name.upper())
        elif origin is typing.Literal:
            kwargs.update(choices=list(typing.get_args(annotation)))
        elif annotation in (int, float, str):
            kwargs.update(type=annotation, metavar=name.upper())
        if name == "preset":
            kwargs.update(choices=list(PRESETS))
        group.add_argument(_flag(name), **kwargs)


def param_values(args: argparse.Namespace) -> dict[str, Any]:
    """The parameter flags the user set."""
    return {name: getattr(args, name) for name in PARAM_NAMES if getattr(args, name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: stylize, run, validate, weights, presets, schema."""
    parser = argparse.ArgumentParser(prog="nst", description="Batch neural style transfer (Gatys et al.).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stylize", help="stylize one content image with one or more style images")
    p.add_argument("content", help="content image (path or s3:// URI)")
    p.add_argument("styles", nargs="+", metavar="style", help="style image(s) (path or s3:// URI)")
    p.add_argument("-o", "--output", required=True, help="output PNG; the JSON record is written next to it")
    add_param_flags(p)

    p = sub.add_parser("run", help="run a manifest (a Prefect flow run in this process)")
    p.add_argument("manifest", help="manifest path or s3:// URI")
    p.add_argument("--pair-id", dest="pair_ids", action="append", help="run only this pair (repeatable)")
    p.add_argument("--force", action="store_true", help="run pairs even if their outputs are up to date")
    p.add_argument("--dry-run", action="store_true", help="validate and show what would run; touch no GPU")
    p.add_argument("--no-prefect", action="store_true", help="run without Prefect (plain loop in this process)")
    p.add_argument("--max-batch-pairs", type=int, default=4, help="most pairs optimised together (default: 4)")

    p = sub.add_parser("validate", help="check a manifest and print its expanded pairs")
    p.add_argument("manifest", help="manifest path or s3:// URI")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each pair's resolved parameters")

    p = sub.add_parser("weights", help="which VGG weights resolve, and from where")
    p.add_argument("--network", choices=["vgg19", "vgg16"], default="vgg19")
    p.add_argument("--weights", default=None, help="an explicit weights file to check")

    sub.add_parser("presets", help="list the presets and their values")
    sub.add_parser("schema", help="print the manifest JSON Schema")
    return parser


def _check_output_writable(output: str) -> None:
    from nst import storage

    if storage.is_s3(output):
        return
    directory = Path(output).expanduser().resolve().parent
    if not directory.is_dir():
        raise OutputError(f"output {output!r}: directory {str(directory)!r} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"output {output!r}: directory {str(directory)!r} is not writable")


def cmd_stylize(args: argparse.Namespace) -> int:
    """Stylize one pair and write OUT.png and OUT.json (the same record as a manifest run)."""
    from tqdm import tqdm

    from nst import storage
    from nst.batch import PairTask, write_pair_result
    from nst.images import load_image, sha256_bytes
    from nst.manifest import PairSpec
    from nst.stylize import Stylizer

    params = resolve_params(param_values(args), context="parameters")
    output = args.output
    if not output.lower().endswith(".png"):
        raise OutputError(f"output {output!r}: must end in .png")
    _check_output_writable(output)
    uris = [args.content, *args.styles]
    data = {u: storage.read_bytes(u) for u in uris}
    content = load_image(data[args.content], label=f"content {args.content!r}", max_pixels=params.max_input_pixels)
    styles = [load_image(data[s], label=f"style {s!r}", max_pixels=params.max_input_pixels) for s in args.styles]

    from nst.stylize import PairJob, canonical_params

    pair_id = Path(output).stem
    params = canonical_params(params)
    job = PairJob(pair_id, content, styles, params)
    bar = tqdm(total=params.iterations * params.scales, unit="it", desc=pair_id, file=sys.stderr)

    def progress(event: Any) -> None:
        bar.total = event.total_iterations
        bar.n = event.iteration
        if event.losses:
            losses = event.losses[0]
            bar.set_postfix(content=f"{losses['content']:.3g}", style=f"{losses['style']:.3g}", refresh=False)
        bar.refresh()

    try:
        (result,) = Stylizer(read_bytes=storage.read_bytes).run_batch([job], callback=progress)
    finally:
        bar.close()
    spec = PairSpec(id=pair_id, content=args.content, styles=list(args.styles), params=params)
    task = PairTask(spec, {u: sha256_bytes(d) for u, d in data.items()})
    # Same writer as manifest runs, with the image at the requested path and the JSON beside it.
    record = write_pair_result(task, result, output, output[: -len(".png")] + ".json", None)
    if record.status != "succeeded":
        print(f"nst: error: {record.error['message'] if record.error else 'failed'}", file=sys.stderr)
        return 1
    losses = record.final_losses or {}
    print(f"wrote {record.image_uri} and {record.json_uri} (style loss {losses.get('style', 0):.4g})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run a manifest through the Prefect flow in-process (ephemeral server), or a plain loop with --no-prefect."""
    if args.no_prefect:
        from nst.batch import run_manifest

        if args.dry_run:
            return _dry_run(args.manifest, args.pair_ids, args.force)
        summary = run_manifest(
            args.manifest, pair_ids=args.pair_ids, force=args.force, max_batch_pairs=args.max_batch_pairs
        )
        counts = {s: summary.count(s) for s in ("succeeded", "skipped", "failed", "not_run")}
        print(f"outputs in {summary.output}; run summary {summary.summary_uri}")
        print(", ".join(f"{n} {s}" for s, n in counts.items()))
        return 1 if summary.failed_ids else 0
    from flows.stylize import run_from_cli  # lazily: `import nst` stays free of prefect

    return run_from_cli(
        args.manifest,
        pair_ids=args.pair_ids,
        force=args.force,
        dry_run=args.dry_run,
        max_batch_pairs=args.max_batch_pairs,
    )


def _dry_run(manifest_uri: str, pair_ids: list[str] | None, force: bool) -> int:
    from nst.batch import plan
    from nst.manifest import load_manifest

    manifest = load_manifest(manifest_uri)
    the_plan = plan(manifest, pair_ids=pair_ids, force=force)
    for task in the_plan.to_run:
        print(f"run   {task.id}")
    for rec in the_plan.skipped:
        print(f"skip  {rec.id} (up to date)")
    for pair_id in the_plan.unknown_ids:
        print(f"??    {pair_id} (not in the manifest)")
    return 1 if the_plan.unknown_ids else 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Print the expanded pair list or every problem."""
    from nst.manifest import format_pairs, load_manifest

    manifest = load_manifest(args.manifest)
    print(format_pairs(manifest, verbose=args.verbose))
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    """Say which weights resolve and from where."""
    from nst.vgg import describe_weights, load_weights

    print("\n".join(describe_weights(args.network, args.weights)))
    _, info = load_weights(args.network, args.weights)
    print(f"loaded: {info.source} sha256 {info.sha256} ({info.preprocessing} pre-processing)")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    """List every preset with its complete resolved values."""
    defaults = StyleParams().model_dump(mode="json")
    for name in PRESETS:
        resolved = resolve_params({"preset": name}).model_dump(mode="json")
        changed = {k: v for k, v in resolved.items() if v != defaults[k] or k in PRESETS[name]}
        print(f"{name}:")
        for key, value in changed.items():
            print(f"  {key}: {json.dumps(value)}")
    print("(no preset): the defaults of `nst stylize --help`")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """Print the manifest JSON Schema (manifests/schema.json is this output)."""
    from nst.manifest import manifest_json_schema_text

    print(manifest_json_schema_text(), end="")
    return 0


COMMANDS = {
    "stylize": cmd_stylize,
    "run": cmd_run,
    "validate": cmd_validate,
    "weights": cmd_weights,
    "presets": cmd_presets,
    "schema": cmd_schema,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one-line errors on stderr (exit 1), never a traceback for a problem the user can fix."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except NSTError as exc:
        print(f"nst: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nst: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
