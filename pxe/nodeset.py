"""HPC node-range notation (n[001-128]) through ClusterShell's NodeSet - no home-made expander.

ClusterShell builds every number of a range in memory, so `n[1-100000000]` alone takes GiBs and
tens of seconds. Every caller therefore goes through expand(), which first counts the set from its
syntax (arithmetic on the range bounds, nothing materialised) and refuses one larger than the cap
(``[limits] max_nodes``, default 100,000) in microseconds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pxe.errors import InputError

TYPE_CHECKING = False  # not typing's: on every command's path (typing costs ~2 ms)
if TYPE_CHECKING:
    from pxe.config import Config

DEFAULT_MAX_NODES = 100_000
# One node-set string: the kernel's own cap on a single argument (MAX_ARG_STRLEN), so nothing a
# command line can carry is refused for its length alone, and nothing longer is parsed.
MAX_SPEC_CHARS = 131_072

# What a node set may contain: node-name characters, ranges, and ClusterShell's operators
# (',' union, '!' difference, '&' intersection, '^' xor). No '@group' (dynprov has no groups
# source: ClusterShell would silently expand it to nothing), no control characters or NUL.
_SPEC_CHARS = re.compile(r"[A-Za-z0-9\-\[\],/!&^ ]*")
_OPERATOR = re.compile(r"[,!&^]")
_RANGE = re.compile(r"\s*(\d{1,30})(?:-(\d{1,30}))?(?:/(\d{1,30}))?\s*")
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def max_nodes(cfg: Config | None) -> int:
    """The configured cap (``[limits] max_nodes``), or the default without a config."""
    return cfg.limits.max_nodes if cfg is not None else DEFAULT_MAX_NODES


def count(spec: str) -> int:
    """An upper bound of the names one node-set string touches, from its syntax alone.

    Union, difference, intersection and xor are all bounded by the sum of their operands; a
    pattern with several bracket groups (n[1-4]-[1-8]) is the product of the groups' sizes.
    Raises InputError for anything that is not node-set syntax.
    """
    if len(spec) > MAX_SPEC_CHARS:
        raise InputError(f"node set too long ({len(spec)} characters; at most {MAX_SPEC_CHARS})")
    if "@" in spec:
        raise InputError(f"invalid node set {_short(spec)}: node groups (@name) are not supported")
    if not _SPEC_CHARS.fullmatch(spec):
        bad = next(c for c in spec if not _SPEC_CHARS.fullmatch(c))
        raise InputError(f"invalid node set {_short(spec)}: character {bad!r} is not allowed "
                         "(letters, digits, '-', ranges in [ ], and , ! & ^)")
    total = 0
    for pattern in _split_top_level(spec):
        size = 1
        rest = pattern
        while "[" in rest or "]" in rest:
            start, end = rest.find("["), rest.find("]")
            if start < 0 or end < start or "[" in rest[start + 1:end]:
                raise InputError(f"invalid node set {_short(spec)}: unbalanced brackets")
            size *= _group_size(rest[start + 1:end], spec)
            rest = rest[end + 1:]
        if len(pattern.strip()) - sum(len(g) + 2 for g in re.findall(r"\[([^\]]*)\]", pattern)) > 63:
            raise InputError(f"invalid node set {_short(spec)}: node names are at most 63 characters")
        total += size
    return total


def check_size(spec: str | Iterable[str], limit: int = DEFAULT_MAX_NODES) -> list[str]:
    """The node-set strings of ``spec``, after refusing a set larger than ``limit`` (unexpanded)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not any(isinstance(s, str) and s.strip() for s in specs):
        raise InputError("empty node list")
    total = 0
    for item in specs:
        if not isinstance(item, str):
            raise InputError(f"invalid node set {item!r}: not a string")
        total += count(item)
        if total > limit:
            raise InputError(f"node set names more than {limit} nodes (the cap is [limits] "
                             "max_nodes in the site config)")
    return specs


def expand(spec: str | Iterable[str], limit: int = DEFAULT_MAX_NODES) -> list[str]:
    """Expand 'n[001-003],gpu1' (or several such strings) to a sorted, de-duplicated list.

    Refuses (InputError, before expanding) a set of more than ``limit`` names, anything that is
    not node-set syntax, and names that are not valid node names.
    """
    specs = check_size(spec, limit)  # before importing ClusterShell: a refusal costs ~0.1 ms
    if len(specs) == 1:
        simple = _simple_range(specs[0])
        if simple is not None:
            return simple
    from ClusterShell.NodeSet import NodeSet, NodeSetParseError, RangeSetParseError

    nodes = NodeSet()
    for item in specs:
        try:
            nodes.update(NodeSet(item.strip()))
        except (NodeSetParseError, RangeSetParseError) as exc:
            raise InputError(f"invalid node set {_short(item)}: {exc}") from None
    names = list(nodes)
    for name in names:
        if not _NAME.fullmatch(name):
            raise InputError(f"invalid node name {_short(name)} in node set: use letters, digits "
                             "and '-' (1-63 characters, not starting or ending with '-')")
    return names


# One pattern with one bracket group of plain numbers and ranges (n[001-128], gpu[1-4,9]-ib):
# what set-boot is given nearly always, expanded here without importing ClusterShell.
_SIMPLE = re.compile(r"([A-Za-z0-9-]*)\[(\d{1,18}(?:-\d{1,18})?(?:,\d{1,18}(?:-\d{1,18})?)*)\]"
                     r"([A-Za-z0-9-]*)")


def _simple_range(spec: str) -> list[str] | None:
    """The names of a simple one-group pattern, exactly as ClusterShell expands it (sorted by
    number, de-duplicated, zero-padded), or None to leave the spec to ClusterShell: anything
    else, and mixed paddings (n[01-5]), whose rules are ClusterShell's to apply."""
    m = _SIMPLE.fullmatch(spec.strip())
    if m is None:
        return None
    prefix, group, suffix = m.groups()
    numbers = re.split("[-,]", group)
    width = len(numbers[0])
    padded = any(len(x) > 1 and x[0] == "0" for x in numbers)
    if padded and any(len(x) != width for x in numbers):
        return None
    values: set[int] = set()
    for item in group.split(","):
        first, _, last = item.partition("-")
        values.update(range(int(first), int(last or first) + 1))
    fmt = f"{prefix}{{:0{width if padded else 0}d}}{suffix}"
    names = [fmt.format(v) for v in sorted(values)]
    # Every name has the same characters around its digits: the first and the longest (last)
    # stand for all of them.
    for name in (names[0], names[-1]):
        if not _NAME.fullmatch(name):
            raise InputError(f"invalid node name {_short(name)} in node set: use letters, digits "
                             "and '-' (1-63 characters, not starting or ending with '-')")
    return names


def fold(names: Iterable[str]) -> str:
    """The compact form of a list of node names: ['n001','n002'] -> 'n[001-002]'."""
    from ClusterShell.NodeSet import NodeSet

    return str(NodeSet.fromlist(list(names)))


def _split_top_level(spec: str) -> list[str]:
    """The operands of a node set: split at operators outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif depth == 0 and _OPERATOR.match(ch):
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return parts


def _group_size(group: str, spec: str) -> int:
    """How many numbers one bracket group '1-4,7,10-20/2' names."""
    size = 0
    for item in group.split(","):
        m = _RANGE.fullmatch(item)
        if not m:
            raise InputError(f"invalid node set {_short(spec)}: bad range {_short(item)}")
        first, last, step = int(m[1]), int(m[2] or m[1]), int(m[3] or 1)
        if last < first or step < 1:
            raise InputError(f"invalid node set {_short(spec)}: bad range {_short(item)}")
        size += (last - first) // step + 1
    return size


def _short(text: str, limit: int = 60) -> str:
    """A quoted excerpt of user input for a one-line message (never a megabyte of it)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
