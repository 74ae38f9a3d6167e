"""Bounded, total JSON parsing of what is read back from storage (records, index, summaries, claims, ids files).

Storage is untrusted: a file may be truncated, corrupt or hostile. Its size is checked before it is read, a gzip body
is inflated with an output cap, nesting deeper than MAX_DEPTH is refused before parsing, and numbers that could
overflow (`1e400`, NaN, a 5,000-digit integer) are refused. Every failure is a ValueError, or None from `read_json`:
the caller treats the file as absent, never as a crash.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from itertools import accumulate, count
from operator import sub
from typing import Any

from nst.errors import NSTError

# Our records nest 5 levels, the index 7: anything much deeper was not written by us.
MAX_DEPTH = 64
# Sizes, counts, nanosecond mtimes and revisions fit in 40 digits; a longer integer is not ours (and int() is slow).
MAX_INT_DIGITS = 40
MAX_FLOAT_CHARS = 100
MAX_RECORD_BYTES = 64 * 2**20  # a record, or a run summary (~40 MB for 100,000 pairs)
INFLATE_CHUNK = 4 * 2**20

# A string, or an unterminated one up to the end: every match succeeds at its first quote, so one linear pass.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = bytes(set(range(256)) - set(b"[]{}"))
_DIGITS_AS_0 = bytes(48 if chr(b).isdigit() and b < 128 else 32 for b in range(256))
_LONG_RUN = b"0" * (MAX_INT_DIGITS + 1)
_OPEN_AS_2 = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def _bracket_depth(data: bytes) -> int:
    """The deepest nesting of the brackets in `data`, strings included (C loops: no recursion, no Python per byte)."""
    steps = data.translate(None, _NOT_BRACKET).translate(_OPEN_AS_2)
    # Each byte is 2 (opens) or 0 (closes); the depth after byte i is the sum of the first i+1 bytes - (i+1).
    return max(map(sub, accumulate(steps), count(1)), default=0)


def _long_digits(data: bytes) -> bool:
    """Whether `data` holds a run of more than MAX_INT_DIGITS digits (a translation and a substring search)."""
    return _LONG_RUN in data.translate(_DIGITS_AS_0)


def _problem(data: bytes, max_depth: int) -> str | None:
    """Nesting deeper than `max_depth` or a too long integer outside strings (strings are skipped only if needed)."""
    if _bracket_depth(data) > max_depth and _bracket_depth(_STRING.sub(b"", data)) > max_depth:
        return f"nested deeper than {max_depth} levels"
    if _long_digits(data) and _long_digits(_STRING.sub(b"", data)):
        return f"an integer of more than {MAX_INT_DIGITS} digits"
    return None


def _float(text: str) -> float:
    value = float(text) if len(text) <= MAX_FLOAT_CHARS else math.inf
    if not math.isfinite(value):
        raise ValueError("a number out of range")
    return value


def _constant(name: str) -> Any:
    raise ValueError("NaN or Infinity is not JSON")


def loads(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Strict JSON of UTF-8 `data`: nesting at most `max_depth`, finite numbers, short integers; else ValueError."""
    raw = data.encode() if isinstance(data, str) else data  # UnicodeEncodeError/DecodeError are ValueErrors
    text = raw.decode()
    problem = _problem(raw, max_depth)
    if problem:
        raise ValueError(problem)
    try:
        return json.loads(text, parse_float=_float, parse_constant=_constant)
    except RecursionError:  # not reachable below MAX_DEPTH; kept so that no input can make a traceback
        raise ValueError("nested too deeply") from None


def gunzip(data: bytes, max_bytes: int) -> bytes:
    """One gzip member inflated to at most `max_bytes`, a chunk at a time (a bomb costs the cap, never more); else
    ValueError."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    chunks: list[bytes] = []
    size = 0
    try:
        while not inflater.eof:
            chunk = inflater.decompress(data, INFLATE_CHUNK)
            data = inflater.unconsumed_tail
            size += len(chunk)
            if size > max_bytes:
                raise ValueError(f"inflates to more than {max_bytes} bytes")
            if not chunk and not data:
                raise ValueError("truncated gzip data")
            chunks.append(chunk)
    except zlib.error:
        raise ValueError("not gzip data") from None
    if inflater.unused_data:
        raise ValueError("more than one gzip member")
    return b"".join(chunks)


def read_json(uri: str, *, max_bytes: int = MAX_RECORD_BYTES, inflated_max: int | None = None) -> Any:
    """The JSON stored at `uri` (gzip-inflated to at most `inflated_max` bytes if given), or None if it cannot be
    read or parsed within the limits: the size is checked before anything is read."""
    from nst import storage

    try:
        data = storage.read_bytes(uri, max_bytes=max_bytes)
        return loads(gunzip(data, inflated_max) if inflated_max is not None else data)
    except (NSTError, OSError, ValueError):
        return None
