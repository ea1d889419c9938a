"""HPC node-range notation (n[001-128]) through ClusterShell's NodeSet - no home-made parser."""

from __future__ import annotations

from collections.abc import Iterable

from pxe.errors import InputError


def expand(spec: str | Iterable[str]) -> list[str]:
    """Expand 'n[001-003],gpu1' (or several such strings) to a sorted, de-duplicated list."""
    from ClusterShell.NodeSet import NodeSet, NodeSetParseError, RangeSetParseError

    specs = [spec] if isinstance(spec, str) else list(spec)
    if not any(s.strip() for s in specs):
        raise InputError("empty node list")
    nodes = NodeSet()
    for item in specs:
        try:
            nodes.update(NodeSet(item.strip()))
        except (NodeSetParseError, RangeSetParseError) as exc:
            raise InputError(f"invalid node set {item!r}: {exc}") from None
    return list(nodes)


def fold(names: Iterable[str]) -> str:
    """The compact form of a list of node names: ['n001','n002'] -> 'n[001-002]'."""
    from ClusterShell.NodeSet import NodeSet

    return str(NodeSet.fromlist(list(names)))
