"""A DHCP template's host entries and frame as plain string formats, so that an incremental
change (pxe.dhcpincremental) renders without importing jinja2 (~17 ms, more than the rest).

derive() runs where jinja2 is loaded anyway (the full render that makes the index): it renders
the ``hosts`` block for a sample node whose name, MACs, loop index and address are sentinels
(with and without an address, with one, two and three MACs) and the frame for three different
host counts, and turns them into formats: either one copy of the entry per MAC or the MACs
joined by a separator. The formats are trusted only after they reproduce jinja's own output for
real nodes of the file and synthetic ones that differ in every DHCP fact, alone and together,
at two host counts; a template that depends on anything else (another fact, arithmetic on the
index, a count formatted its own way) gets no format, and its changes render with jinja2. Only
the packaged templates get one (pxe.dhcpincremental): a site override could test one node's
name or address, which no sample rules out.
Standard library only.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pxe.dhcpinputs import DhcpHost

NAME, IP, ROWS, MACS = "\x01name\x01", "\x01ip\x01", "\x01rows\x01", "\x01macs\x01"
COUNTS = ((918273645, 546372819), (918273646, 546372821), (123456789, 987654321))


def mac(i: int) -> str:
    return f"\x01mac{i}\x01"


def index(i: int) -> str:
    return f"\x01index{i}\x01"


class Index:
    """A loop index whose text is a sentinel (arithmetic on it fails: no format)."""

    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i

    def __str__(self) -> str:
        return index(self.i)


def block(fmt: dict, name: str, macs: tuple[str, ...], ip: str | None) -> str:
    """One node's entries, as the template renders them."""
    text = (fmt["ip"].replace(IP, ip) if ip else fmt["noip"]).replace(NAME, name)
    if fmt["mode"] == "lines":
        return "".join(text.replace(mac(0), m).replace(index(0), str(i))
                       for i, m in enumerate(macs))
    return text.replace(mac(0), fmt["sep"].join(macs))


def frame(fmt: dict, rows: int, macs: int) -> tuple[str, str]:
    """The text before and after the host entries, for that many nodes and MACs."""
    return tuple(part.replace(ROWS, str(rows)).replace(MACS, str(macs))  # type: ignore[return-value]
                 for part in (fmt["head"], fmt["tail"]))


def derive(render_block, render_frame, samples: list[DhcpHost], counts: tuple[int, int]) -> dict | None:
    """The formats of a template, or None. ``render_block(hosts, rows, macs, indexed)`` and
    ``render_frame(rows, macs)`` render with jinja2 (``indexed``: host_macs' indexes as Index
    sentinels); ``samples``: nodes to verify against (real ones of the file and synthetic
    ones); ``counts``: the file's (rows, macs)."""
    from pxe.dhcpinputs import DhcpHost

    rows, macs = COUNTS[0]
    try:
        def sentinel(k: int, ip: str | None) -> str:
            host = DhcpHost(NAME, tuple(mac(i) for i in range(k)), ip)
            return render_block([host], rows, macs, True)

        one, noip = sentinel(1, IP), sentinel(1, None)
        two, three = sentinel(2, IP), sentinel(3, IP)
        fmt: dict = {"ip": one, "noip": noip}
        singles = [one.replace(mac(0), mac(i)).replace(index(0), index(i)) for i in range(3)]
        if two == "".join(singles[:2]) and three == "".join(singles):
            fmt["mode"] = "lines"
        elif index(0) not in one and mac(0) in two and mac(1) in two:
            sep = two[two.index(mac(0)) + len(mac(0)):two.index(mac(1))]
            fmt.update(mode="join", sep=sep)
            if two != one.replace(mac(0), mac(0) + sep + mac(1)) or three != one.replace(
                    mac(0), sep.join(mac(i) for i in range(3))):
                return None
        else:
            return None
        heads = [render_frame(r, m) for r, m in COUNTS]
        fmt["head"], fmt["tail"] = (part.replace(str(rows), ROWS).replace(str(macs), MACS)
                                    for part in heads[0])
        for (r, m), expected in zip(COUNTS, heads, strict=True):
            if frame(fmt, r, m) != expected:
                return None
        for r, m in (counts, COUNTS[2]):
            for host in samples:
                if render_block([host], r, m, False) != block(fmt, host.name, host.macs, host.ip):
                    return None
            together = "".join(block(fmt, h.name, h.macs, h.ip) for h in samples)
            if render_block(samples, r, m, False) != together:
                return None
    except Exception:  # noqa: BLE001 - a template that needs more than the sentinels: no format
        return None
    return fmt
