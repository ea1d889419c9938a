"""Counters shared by every serve process, shown in the Prometheus text format at /metrics.

The counters live in one anonymous shared memory map created before the workers fork: each
process owns one row and is its only writer, so no lock is needed; /metrics sums the rows.
A TFTP worker counts in a private array and copies it into its row now and then (the block
loop stays free of shared-memory writes).
"""

from __future__ import annotations

import itertools
import mmap
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    help: str
    kind: str = "counter"  # or "gauge"
    labels: tuple[str, ...] = ()
    values: tuple[tuple[str, ...], ...] = ((),)  # every label combination, fixed in advance


TFTP_REQUEST_RESULTS = ("started", "not_found", "refused", "write_refused", "bad_request", "busy",
                        "duplicate")
TFTP_TRANSFER_RESULTS = ("complete", "timeout", "aborted", "error")
HTTP_CODES = ("200", "206", "304", "400", "403", "404", "405", "413", "416", "500", "other")
REPORT_KINDS = ("booting", "progress", "installed", "ready", "failed", "invalid")
REPORT_RESULTS = ("ok", "refused", "unknown_node", "bad_request", "error")

METRICS: tuple[Metric, ...] = (
    Metric("dynprov_tftp_requests_total", "TFTP requests received, by outcome.",
           labels=("result",), values=tuple((r,) for r in TFTP_REQUEST_RESULTS)),
    Metric("dynprov_tftp_transfers_total", "TFTP transfers ended, by result.",
           labels=("result",), values=tuple((r,) for r in TFTP_TRANSFER_RESULTS)),
    Metric("dynprov_tftp_bytes_total", "File bytes delivered (acknowledged) over TFTP."),
    Metric("dynprov_tftp_retransmits_total", "TFTP windows sent again after a timeout."),
    Metric("dynprov_tftp_malformed_packets_total",
           "UDP packets that were not valid TFTP, or not expected where they arrived."),
    Metric("dynprov_tftp_active_transfers", "TFTP transfers in progress.", kind="gauge"),
    Metric("dynprov_http_requests_total", "HTTP requests answered, by status code.",
           labels=("code",), values=tuple((c,) for c in HTTP_CODES)),
    Metric("dynprov_http_bytes_total", "Boot file bytes sent over HTTP (bodies)."),
    Metric("dynprov_reports_total", "Node call-home reports, by kind and result.",
           labels=("kind", "result"),
           values=tuple(itertools.product(REPORT_KINDS, REPORT_RESULTS))),
)

_SLOTS: dict[tuple[str, tuple[str, ...]], int] = {}
for _m in METRICS:
    for _v in _m.values:
        _SLOTS[(_m.name, _v)] = len(_SLOTS)
HEARTBEAT = len(_SLOTS)  # milliseconds since the epoch, written by the row's process
WIDTH = HEARTBEAT + 1


def slot(name: str, *labels: str) -> int:
    """The index of one counter, e.g. slot("dynprov_tftp_requests_total", "busy")."""
    try:
        return _SLOTS[(name, tuple(labels))]
    except KeyError:
        raise KeyError(f"no metric {name}{list(labels)}") from None


GAUGES = tuple(_SLOTS[(m.name, v)] for m in METRICS if m.kind == "gauge" for v in m.values)


class Row:
    """One process's counters. Only that process writes here."""

    def __init__(self, view: memoryview, index: int):
        self.index = index
        self._view = view[index * WIDTH:(index + 1) * WIDTH]

    def add(self, slot_index: int, n: int = 1) -> None:
        self._view[slot_index] += n

    def load(self) -> array:
        """A private copy to count in (see store)."""
        return array("q", self._view)

    def store(self, values: array) -> None:
        values[HEARTBEAT] = int(time.time() * 1000)
        self._view[:] = values

    def restart(self) -> None:
        """A replacement process takes the row over: counters go on, gauges start at zero."""
        for g in GAUGES:
            self._view[g] = 0
        self._view[HEARTBEAT] = 0


class Counters:
    def __init__(self, rows: int):
        self.rows = rows
        self._map = mmap.mmap(-1, max(1, rows) * WIDTH * 8)  # MAP_SHARED | MAP_ANONYMOUS
        self._view = memoryview(self._map).cast("q")

    def row(self, index: int) -> Row:
        if not 0 <= index < self.rows:
            raise IndexError(f"metrics row {index} of {self.rows}")
        return Row(self._view, index)

    def total(self, slot_index: int, rows: Iterable[int] | None = None) -> int:
        return sum(self._view[r * WIDTH + slot_index]
                   for r in (range(self.rows) if rows is None else rows))

    def value(self, row: int, slot_index: int) -> int:
        return self._view[row * WIDTH + slot_index]

    def heartbeat_age(self, index: int) -> float | None:
        """Seconds since the row's process last reported; None if it never did."""
        ms = self._view[index * WIDTH + HEARTBEAT]
        return None if ms == 0 else max(0.0, time.time() - ms / 1000)

    def render(self, extra: Sequence[str] = ()) -> str:
        """Prometheus text exposition format 0.0.4."""
        lines: list[str] = []
        for m in METRICS:
            lines.append(f"# HELP {m.name} {m.help}")
            lines.append(f"# TYPE {m.name} {m.kind}")
            for values in m.values:
                labels = ",".join(f'{k}="{v}"' for k, v in zip(m.labels, values, strict=True))
                value = self.total(_SLOTS[(m.name, values)])
                lines.append(f"{m.name}{{{labels}}} {value}" if labels else f"{m.name} {value}")
        lines.extend(extra)
        return "\n".join(lines) + "\n"
