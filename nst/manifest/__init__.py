"""Manifests: a YAML list of content/style pairs (local or S3), validated and resolved into `PairSpec`s.

source (safe YAML with line locations) → model (the file model, generated from StyleParams) → expand (pairs and grid
into PairSpecs, ids from ids) → inputs (roots and existence checks) → load (`load_manifest`). Every problem in a
manifest is collected and raised as one `ManifestError` naming each location and YAML line, never the file's content.
migrate: `nst migrate-ids`, outputs made under an earlier id rule moved to today's ids.
"""

from nst.manifest.load import format_pairs, load_manifest
from nst.manifest.model import (
    ID_PATTERN,
    GridEntry,
    Manifest,
    ManifestFile,
    PairEntry,
    PairSpec,
    ParamOverrides,
    manifest_json_schema,
    manifest_json_schema_text,
    override_values,
)
from nst.manifest.source import InvalidManifestError

__all__ = [
    "ID_PATTERN",
    "GridEntry",
    "InvalidManifestError",
    "Manifest",
    "ManifestFile",
    "PairEntry",
    "PairSpec",
    "ParamOverrides",
    "format_pairs",
    "load_manifest",
    "manifest_json_schema",
    "manifest_json_schema_text",
    "override_values",
]
