"""Pair ids: derived from a pair's own file names by a rule that looks at nothing else, and checked for collisions.

A file stem that is already safe (`A-Z a-z 0-9 . _ -`) is used as it is; any other gets its unsafe runs replaced by
`_` and `-<8 hex digits of the sha256 of the original stem>` appended, so `IMG 1.jpg` is always `IMG_1-<hash>` and
never meets `IMG_1.jpg`'s `IMG_1`, whatever else exists. Ids must not end like an intermediate image of another pair
(`<id>.iter<N>.png`) nor differ from another only in letter case (they would share files on such volumes).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Sequence

from nst.errors import Loc
from nst.manifest.source import Problems

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Pair `x` saves `x.iter000010.png` (save_every): an id ending so would write another pair's intermediate image.
ITER_SUFFIX = re.compile(r"\.iter\d+$")
MAX_ID = 128


def name_bytes(text: str) -> bytes:
    """`text` as UTF-8, a file name's undecodable bytes as they were (os.fsdecode's surrogateescape), never an error."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no file name's byte became (e.g. a JSON `\\ud800`)
        return text.encode("utf-8", "surrogatepass")


def digest8(text: str) -> str:
    """8 hex digits of the sha256 of `text` (of a file name's own bytes, when they are not UTF-8)."""
    return hashlib.sha256(name_bytes(text)).hexdigest()[:8]


def unique_suffix(*uris: str) -> str:
    """A short, stable tag of a pair's inputs, appended to a grid id that a `pairs:` entry already holds."""
    return digest8("\n".join(uris))


def file_stem(uri: str, base: str = "") -> str:
    """File name without its last extension; below a glob's base directory, sub-directories are kept, joined by '.'."""
    rel = uri[len(base) :] if base and uri.startswith(base) else posixpath.basename(uri.rstrip("/"))
    rel = rel.strip("/")
    head, _, name = rel.rpartition("/")
    name = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return f"{head.replace('/', '.')}.{name}" if head else name


def safe_stem(stem: str) -> str:
    """`stem` if it is safe for file names, else its unsafe runs as '_' plus `-<digest8 of the original stem>`."""
    safe = _UNSAFE.sub("_", stem)
    return stem if safe == stem else f"{safe}-{digest8(stem)}"


def make_id(content_stem: str, style_stems: Sequence[str], suffix: str = "") -> str:
    """`<content>__<style>` (several styles joined by '-') from safe stems, at most 128 characters.

    A longer id is cut and ends in `-<digest8 of the whole uncut id>`; a `suffix` is appended as `-<suffix>`.
    """
    whole = f"{safe_stem(content_stem)}__{'-'.join(safe_stem(s) for s in style_stems)}"
    limit = MAX_ID - (len(suffix) + 1 if suffix else 0)
    if len(whole) > limit:
        whole = f"{whole[: limit - 9]}-{digest8(whole)}"
    return f"{whole}-{suffix}" if suffix else whole


def check_ids(problems: Problems, ids: Sequence[tuple[str, Loc, str]]) -> None:
    """Every pair id (given or derived: `(id, where, description)`) is unique, in any letter case, and does not end
    like an intermediate image."""
    exact: dict[str, str] = {}
    folded: dict[str, tuple[str, str]] = {}
    for pair_id, where, described in ids:
        grid = where == ("grid",)
        derived = not grid and where[-1] != "id"
        if ITER_SUFFIX.search(pair_id):
            fix = "set `id:` to one" if derived else "choose an id"
            problems.add(
                where,
                f"id {pair_id!r}{f' ({described})' if grid else ''} ends like an intermediate image (<id>.iter<N>.png) "
                f"of another pair; {fix} that does not end in .iter<digits>",
            )
        if pair_id in exact:
            message = f"duplicate id {pair_id!r}"
            if grid:
                message += f" for {described.removeprefix('grid: ')} (also {exact[pair_id]}); file stems must differ"
            elif derived:
                message += f" (also {exact[pair_id]}), derived from the file names; set `id:` to tell them apart"
            else:
                message += f" (also {exact[pair_id]})"
            problems.add(where, message)
            continue
        exact[pair_id] = described
        other = folded.setdefault(pair_id.lower(), (pair_id, described))
        if other[0] != pair_id:
            mine = f" ({described})" if grid else ""
            problems.add(
                where,
                f"id {pair_id!r}{mine} differs from {other[0]!r} ({other[1]}) only in letter case; on a "
                "case-insensitive volume they would share files",
            )
