"""Manifest YAML, read safely with line locations: the problem collector, the parser and its guards.

Loaded like `yaml.safe_load`, composed first so that every problem can name its YAML line; aliases that would
expand too far, recursive aliases and keys written twice are refused before the document is constructed.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from nst.errors import Loc, ManifestError
from nst.manifest.model import GRID_KEYS, PAIR_KEYS, TOP_KEYS
from nst.params import StyleParams

MAX_LISTED_PROBLEMS = 200
MAX_INT_DIGITS = 4000  # below Python's int-parsing limit (4,300 digits), which would escape as a bare ValueError
# What yaml's resolver reads as an int (YAML 1.1); an explicit `!!int` tag on anything else is refused, not constructed.
_YAML_INT = re.compile(
    r"[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+|[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+"
)


class InvalidManifestError(ManifestError):
    """A manifest with one or more problems; `problems` holds one line per problem."""

    def __init__(self, uri: str, problems: list[str]) -> None:
        self.uri = uri
        self.problems = problems
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        if len(problems) == 1:
            text = f"{uri}: {problems[0]}"
        else:
            lines = [f"{uri}: {len(problems)} problems:", *(f"  {p}" for p in shown)]
            if more:
                lines.append(f"  ... and {more} more")
            text = "\n".join(lines)
        super().__init__(text)


@dataclass
class Problems:
    root: yaml.Node | None = None
    found: dict[str, tuple[float, int]] = field(default_factory=dict)

    def add(self, loc: Loc, message: str, *, line: int | None = None) -> None:
        """Record `loc: message (line N)`; the line is looked up from `loc` unless given."""
        if line is None and loc and self.root is not None:
            line = line_of(self.root, loc)
        where = fmt_loc(loc)
        text = f"{where}: {message}" if where else message
        if line is not None:
            text += f" (line {line})"
        self.found.setdefault(text, (line if line is not None else float("inf"), len(self.found)))

    @property
    def items(self) -> list[str]:
        """The problems in document order (those without a line last)."""
        return sorted(self.found, key=self.found.__getitem__)

    def raise_if_any(self, uri: str) -> None:
        if self.found:
            raise InvalidManifestError(uri, self.items)


_KNOWN_KEYS = frozenset((*TOP_KEYS, *PAIR_KEYS, *GRID_KEYS, *StyleParams.model_fields))
# A quoted span of a YAML library message, unless it is a token name such as '<block mapping start>'.
_QUOTED = re.compile("('<[a-z ]+>')|'[^'\\n]*'|\"[^\"\\n]*\"")
HIDDEN_KEY = "<key>"
_PLAIN_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,23}")


def shown_key(key: str) -> str:
    """A key as messages show it: a known name, a near miss of one, or a short plain word; any other is `<key>`.

    Keys are file content too: a long token (a secret written as a key) is never shown.
    """
    if key in _KNOWN_KEYS or _PLAIN_KEY.fullmatch(key) or difflib.get_close_matches(key, _KNOWN_KEYS, n=1):
        return key
    return HIDDEN_KEY


def fmt_loc(loc: Loc) -> str:
    """`pairs[0].size`; keys that are neither known names nor typos of one are shown as `<key>` (never quoted)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = shown_key(part)
            out += f".{name}" if out else name
    return out


def without_quotes(text: str) -> str:
    """A YAML library's message without the file content it quotes (tags, anchors, characters)."""
    return _QUOTED.sub(lambda m: m.group(1) or "(not shown)", text)


def node_kind(node: yaml.Node) -> str:
    """What a node is, by type only: `a list`, `a mapping`, `a string`, `an integer` ..."""
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    kinds = {"int": "an integer", "float": "a number", "bool": "a boolean", "timestamp": "a date", "null": "null"}
    return kinds.get(str(node.tag).rsplit(":", 1)[-1], "a string")


def line_of(root: yaml.Node, loc: Loc) -> int | None:
    """1-based line of the node at `loc` (the key's line for a mapping entry), or of its deepest existing parent."""
    node: yaml.Node = root
    for depth, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            found = None
            for key, value in node.value:  # last match wins, as in the constructed dict
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    found = (key, value)
            if found is None:
                return None if node is root else int(node.start_mark.line) + 1  # a missing top-level key: no line
            key_node, node = found
            if depth == len(loc) - 1:
                return int(key_node.start_mark.line) + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
        else:
            break
    return int(node.start_mark.line) + 1


def has_node(root: yaml.Node, loc: Loc) -> bool:
    node: yaml.Node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)]
            if not match:
                return False
            node = match[-1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
        else:
            return False
    return True


class _EventLoader(Composer, SafeConstructor, Resolver):
    """yaml.SafeLoader's composer, resolver and constructor fed by libyaml's (non-recursive) C parser: ~3x faster.

    Composing in Python keeps deep nesting a RecursionError (libyaml's own composer can overflow the C stack).
    """

    def __init__(self, text: str) -> None:
        self._parser = yaml.CSafeLoader(text)
        self._next: yaml.Event | None = None
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)

    def peek_event(self) -> yaml.Event | None:
        if self._next is None:
            self._next = self._parser.get_event()
        return self._next

    def check_event(self, *choices: type[yaml.Event]) -> bool:
        event = self.peek_event()
        return event is not None and (not choices or isinstance(event, choices))

    def get_event(self) -> yaml.Event | None:
        event = self.peek_event()
        self._next = None
        return event

    def dispose(self) -> None:
        self._parser.dispose()


def _loader(text: str) -> Any:
    return _EventLoader(text) if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader(text)


def parse_yaml(uri: str, raw: bytes, node_budget: int) -> tuple[Problems, Any]:
    """Compose (keeping marks), check the expanded size without expanding, then construct like yaml.safe_load."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidManifestError(uri, [f"not UTF-8 text (byte {exc.start})"]) from None
    loader = _loader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            raise InvalidManifestError(uri, [f"invalid YAML: {_yaml_error(exc)}"]) from None
        except yaml.YAMLError as exc:
            raise InvalidManifestError(uri, [f"invalid YAML: {without_quotes(str(exc))}"]) from None
        except RecursionError:
            raise InvalidManifestError(uri, ["invalid YAML: nested too deeply"]) from None
        if root is None or (isinstance(root, yaml.ScalarNode) and root.tag.endswith(":null")):
            raise InvalidManifestError(uri, ["manifest is empty: expected `version: 1`, `output:` and `pairs:`"])
        if not isinstance(root, yaml.MappingNode):
            line = root.start_mark.line + 1
            raise InvalidManifestError(
                uri, [f"top level must be a mapping (version, output, pairs, ...), got {node_kind(root)} (line {line})"]
            )
        _check_expansion(uri, root, node_budget)
        problems = Problems(root)
        _duplicate_keys(root, problems)  # before construction, which merges `<<` keys into the nodes
        _huge_numbers(root, problems)
        problems.raise_if_any(uri)
        try:
            data = loader.construct_document(root)
        except yaml.MarkedYAMLError as exc:
            raise InvalidManifestError(uri, [f"invalid YAML: {_yaml_error(exc)}"]) from None
        except ValueError as exc:  # anything else a constructor refuses: still one line, never a traceback
            raise InvalidManifestError(uri, [f"invalid YAML value: {without_quotes(str(exc))[:200]}"]) from None
        except (LookupError, TypeError, AttributeError, ArithmeticError):  # e.g. `!!bool maybe`, `!!float ""`
            raise InvalidManifestError(uri, ["invalid YAML value: a tagged value that its tag cannot read"]) from None
        except RecursionError:
            raise InvalidManifestError(uri, ["invalid YAML: nested too deeply"]) from None
        return problems, data
    finally:
        loader.dispose()


def _yaml_error(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    what = without_quotes(": ".join(str(p) for p in (exc.context, exc.problem) if p))
    return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark else what


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(uri: str, root: yaml.Node, budget: int) -> None:
    """Refuse aliases that would expand past `budget` nodes ("billion laughs") or that refer to themselves.

    Counts each distinct node once (memoised), so the check itself is linear in the document's size.
    """
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            total = 1 + sum(size[id(c)] for c in _children(node))
            if total > budget:
                raise InvalidManifestError(
                    uri,
                    [
                        f"YAML aliases expand to more than {budget} nodes (line {node.start_mark.line + 1}); "
                        "refusing a possible alias bomb"
                    ],
                )
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise InvalidManifestError(uri, [f"recursive YAML alias (line {node.start_mark.line + 1}) is not allowed"])
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise InvalidManifestError(
                    uri, [f"recursive YAML alias (line {child.start_mark.line + 1}) is not allowed"]
                )
            if id(child) not in size:
                stack.append((child, False))


def _walk(root: yaml.Node) -> Iterator[tuple[yaml.Node, Loc]]:
    """Every node once (aliases are shared nodes), with the location of the value it is or is under."""
    stack: list[tuple[yaml.Node, Loc]] = [(root, ())]
    seen: set[int] = set()
    while stack:
        node, loc = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node, loc
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                merge = isinstance(key, yaml.ScalarNode) and key.tag == "tag:yaml.org,2002:merge"
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                stack.append((key, loc))
                stack.append((value, loc if merge else (*loc, name)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, (*loc, i)) for i, child in enumerate(node.value))


def int_digits(text: str) -> int | None:
    """How many decimal digits the integer YAML 1.1 reads from `text` has (hex, octal, binary, `1_000` and
    sexagesimal `1:30` counted by value, not by characters), or None if `text` is not such an integer at all."""
    if not _YAML_INT.fullmatch(text):
        return None
    value = text.replace("_", "").lstrip("+-")
    if ":" in value:  # base 60: each further part multiplies by 60
        head, *rest = value.split(":")
        return len(head.lstrip("0")) + math.ceil(len(rest) * math.log10(60))
    base, body = (2, value[2:]) if value[:2] == "0b" else (16, value[2:]) if value[:2] == "0x" else (10, value)
    if base == 10 and value[:1] == "0":
        base = 8
    return math.ceil(len(body.lstrip("0")) * math.log10(base))


def _huge_numbers(root: yaml.Node, problems: Problems) -> None:
    """Report integers too long to be a parameter, and `!!int` values that are no integer, before constructing them
    (at its line, with its location)."""
    for node, loc in _walk(root):
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:int":
            digits = int_digits(node.value)
            if digits is None:
                problems.add(loc, "not an integer", line=node.start_mark.line + 1)
            elif digits > MAX_INT_DIGITS:
                problems.add(loc, f"a {digits}-digit integer is too long", line=node.start_mark.line + 1)


def _duplicate_keys(root: yaml.Node, problems: Problems) -> None:
    """Report keys written twice in one mapping (safe_load would silently keep the last one)."""
    for node, loc in _walk(root):
        if not isinstance(node, yaml.MappingNode):
            continue
        first: dict[str, int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            if key.value in first:
                message = f"duplicate key (first at line {first[key.value]})"
                problems.add((*loc, key.value), message, line=key.start_mark.line + 1)
            else:
                first[key.value] = key.start_mark.line + 1
