"""`nst` console script; every parameter flag is generated from nst.params.StyleParams."""

from __future__ import annotations

import argparse
import io
import json
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from nst.errors import NSTError, ParamsError
from nst.params import PRESETS, StyleParams, format_validation_error, resolve_params
from nst.run_options import RunOptions

if TYPE_CHECKING:
    from nst.engine.steplog import ProgressEvent


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], title: str) -> None:
    """One flag per field of `model`, with its type, choices, default and description; unset flags stay None."""
    group = parser.add_argument_group(title)
    for name, info in model.model_fields.items():
        annotation = _unwrap_optional(info.annotation)
        default = info.get_default(call_default_factory=True)
        help_text = f"{info.description} (default: {default if default is not None else 'unset'})"
        if "unset:" in (info.description or ""):  # the default follows other fields (scales): the text says how
            help_text = f"{info.description} (default: unset)"
        kwargs: dict[str, Any] = {"default": None, "help": help_text, "dest": name}
        origin = typing.get_origin(annotation)
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            (item,) = typing.get_args(annotation)
            kwargs.update(nargs="+", type=item, metavar=name.upper(), action="extend")
        elif origin is typing.Literal:
            kwargs.update(choices=list(typing.get_args(annotation)))
        elif annotation in (int, float, str):
            kwargs.update(type=annotation, metavar=name.upper())
        if name == "preset":
            kwargs.update(choices=list(PRESETS))
        group.add_argument(_flag(name), **kwargs)


def model_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The flags of `model`'s fields that the user set."""
    return {name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}


PARAM_FLAGS_TITLE = "style-transfer parameters (defaults shown; a --preset changes them)"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: stylize, run, validate, weights, presets, schema."""
    parser = argparse.ArgumentParser(prog="nst", description="Batch neural style transfer (Gatys et al.).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stylize", help="stylize one content image with one or more style images")
    p.add_argument("content", help="content image (path or s3:// URI)")
    p.add_argument("styles", nargs="+", metavar="style", help="style image(s) (path or s3:// URI)")
    p.add_argument("-o", "--output", required=True, help="output PNG; the JSON record is written next to it")
    add_model_flags(p, StyleParams, PARAM_FLAGS_TITLE)

    p = sub.add_parser("run", help="run a manifest (a Prefect flow run in this process)")
    p.add_argument("manifest", help="manifest path or s3:// URI")
    p.add_argument("--no-prefect", action="store_true", help="run without Prefect (plain loop in this process)")
    add_model_flags(p, RunOptions, "run options")
    add_model_flags(p, StyleParams, PARAM_FLAGS_TITLE + "; above the manifest's defaults, below its pairs' values")

    p = sub.add_parser("validate", help="check a manifest and print its expanded pairs")
    p.add_argument("manifest", help="manifest path or s3:// URI")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each pair's resolved parameters")

    p = sub.add_parser("migrate-ids", help="move outputs made under an earlier id rule to the ids derived now")
    p.add_argument("manifest", help="manifest path or s3:// URI")
    p.add_argument("--apply", action="store_true", help="move them (default: only list old id -> new id)")

    p = sub.add_parser("weights", help="which VGG weights resolve, and from where")
    p.add_argument("--network", choices=["vgg19", "vgg16"], default="vgg19")
    p.add_argument("--weights", default=None, help="an explicit weights file to check")

    sub.add_parser("presets", help="list the presets and their values")
    sub.add_parser("schema", help="print the manifest JSON Schema")
    return parser


class _ProgressBar:
    """The tqdm bar of `nst stylize` on stderr, opened at the first step: an early error stays the only line."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: Any = None

    def __call__(self, event: ProgressEvent) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=event.total_iterations, unit="it", desc=self.desc, file=sys.stderr)
        self.bar.total = event.total_iterations
        self.bar.n = event.iteration
        if event.losses:
            losses = event.losses[0]
            self.bar.set_postfix(content=f"{losses['content']:.3g}", style=f"{losses['style']:.3g}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_stylize(args: argparse.Namespace) -> int:
    """Stylize one pair through the public API (`nst.api.stylize`): OUT.png and OUT.json, as a manifest run writes."""
    from nst import api  # looked up at call time: one code path for a single pair, whichever face calls it

    bar = _ProgressBar(Path(args.output).stem)
    try:
        result = api.stylize(
            content=args.content,
            styles=list(args.styles),
            output=args.output,
            progress=bar,
            **model_values(args, StyleParams),
        )
    except api.StylizeFailed as exc:  # the failed record is written beside OUT.png; the engine's message, one line
        error = exc.record.get("error") or {}
        print(f"nst: error: {error.get('message', 'failed')}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    written = result.record["output"]
    print(f"wrote {written['image']} and {written['json']} (style loss {result.losses.get('style', 0):.4g})")
    return 0


def run_options(args: argparse.Namespace) -> RunOptions:
    """The run options the user set, validated (ParamsError naming the option)."""
    try:
        return RunOptions(**model_values(args, RunOptions))
    except ValidationError as exc:
        raise ParamsError(format_validation_error(exc, "run options")) from None


def cmd_run(args: argparse.Namespace) -> int:
    """Run a manifest as a Prefect flow run in this process (ephemeral server), or with --no-prefect without one."""
    options = run_options(args)
    overrides = model_values(args, StyleParams)
    if not args.no_prefect:
        from flows.stylize import run_from_cli  # lazily: `import nst` stays free of prefect

        return run_from_cli(args.manifest, options, overrides)
    from nst.run import run

    for name in ("batch_timeout_s", "cpu_slots"):
        if name in model_values(args, RunOptions):
            raise ParamsError(f"run options.{name}: needs Prefect; drop --no-prefect")
    summary = run(args.manifest, options, overrides=overrides)
    for warning in summary.manifest.warnings:  # e.g. a grid glob that matched nothing tonight
        print(f"warning: {warning}", file=sys.stderr)
    if summary.dry_run:
        for pair_id in summary.ids("not_run"):
            print(f"run   {pair_id}")
        for pair_id in summary.ids("skipped"):
            print(f"skip  {pair_id} (up to date)")
        if summary.older_engine:
            print(f"{summary.older_engine} skipped pairs were made by an older engine revision (--rerun-older-engine)")
        return 0
    print(f"outputs in {summary.manifest.output}; run summary {summary.summary_uri}")
    print(", ".join(f"{n} {s}" for s, n in summary.counts().items()))
    return 1 if summary.ids("failed", "not_run") else 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Print the expanded pair list or every problem."""
    from nst.manifest import format_pairs, load_manifest

    manifest = load_manifest(args.manifest)
    print(format_pairs(manifest, verbose=args.verbose))
    return 0


def cmd_migrate_ids(args: argparse.Namespace) -> int:
    """List (or with --apply, move) the outputs whose record's inputs are a pair's whose id is now another."""
    from nst.manifest import load_manifest
    from nst.manifest.migrate import apply_move, plan_moves

    manifest = load_manifest(args.manifest, check_inputs=False)
    moves, notes = plan_moves(manifest)
    for note in notes:
        print(note)
    for move in moves:
        if args.apply:
            apply_move(manifest, move)
        print(f"{'moved ' if args.apply else ''}{move.old} -> {move.new}")
    n = f"{len(moves)} id{'' if len(moves) == 1 else 's'}"
    print(f"{n} moved" if args.apply else f"{n} to move (dry run: nothing changed; --apply moves them)")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    """Say which weights resolve and from where."""
    from nst.engine.weights import describe_weights, load_weights

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
    "migrate-ids": cmd_migrate_ids,
    "weights": cmd_weights,
    "presets": cmd_presets,
    "schema": cmd_schema,
}


def _tolerant_output() -> None:
    """A file name that is not UTF-8 (`caf\\xe9.jpg`, held as os.fsdecode's surrogates) prints escaped, not as a
    UnicodeEncodeError: stdout and stderr write `\\udce9` where their encoding is strict."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one-line errors on stderr (exit 1), never a traceback for a problem the user can fix."""
    _tolerant_output()
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
