"""The `[serve]` section of the site config: read and checked here, key by key.

Every problem is an InputError naming the file and the key, like pxe.config does for its own
sections. Defaults: TFTP on the provisioning address port 69, HTTP on the same address at
`boot.http_port` (the port the rendered boot configs point at).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pxe.config import Config
from pxe.errors import InputError

MAX_BLKSIZE = 65464  # RFC 2348: 8..65464


@dataclass(frozen=True)
class ServeSettings:
    tftp: bool
    tftp_address: str
    tftp_port: int
    tftp_workers: int
    max_transfers: int
    timeout: float  # seconds before an unacknowledged block is sent again
    retries: int  # how often one block is sent again before the transfer is dropped
    max_blksize: int
    max_windowsize: int
    tftp_cache_mb: int  # per TFTP worker: built DATA packets of popular files (boot loaders)
    http: bool
    http_address: str
    http_port: int
    http_workers: int
    http_timeout: float  # keep-alive idle, request-header and body-idle timeout, seconds
    http_max_per_client: int  # open HTTP connections one client address may hold (per worker)
    access_log: bool
    standard_configs_dir: Path  # where `pxe-stage render --servers` writes dnsmasq/tftpd-hpa/nginx


def _default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _default_tftp_workers() -> int:
    """Two event loops per core: a CPU-bound multiplexer gets one task's share of the CPU, so
    under contention more (balanced) loops keep up with a process-per-transfer server."""
    return max(2, min(2 * (os.cpu_count() or 1), 16))


_KEYS = {f.name for f in fields(ServeSettings)}


def load(cfg: Config, **overrides: Any) -> ServeSettings:
    """Check `[serve]`; ``overrides`` (from command-line flags, None = not given) win."""
    raw = cfg.raw.get("serve", {})
    where = f"{cfg.path}: serve"
    if not isinstance(raw, dict):
        raise InputError(f"{cfg.path}: [serve]: must be a table")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise InputError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(_KEYS))})")
    data = {**raw, **{k: v for k, v in overrides.items() if v is not None}}

    def get(key: str, kind: type, default: Any) -> Any:
        value = data.get(key, default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise InputError(f"{where}.{key}: must be a {kind.__name__}, got {value!r}")
        return value

    def number(key: str, kind: type, default: Any, low: float, high: float) -> Any:
        value = get(key, kind, default)
        if not low <= value <= high:
            raise InputError(f"{where}.{key}: must be between {low} and {high}, got {value!r}")
        return value

    def address(key: str) -> str:
        value = get(key, str, cfg.network.server)
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise InputError(f"{where}.{key}: not an IP address: {value!r}") from None
        if key == "tftp_address" and ipaddress.ip_address(value) == ipaddress.ip_address("::"):
            # Replies must leave from the address the request came to: IPv4 learns it with
            # IP_PKTINFO; for IPv6 name the address.
            raise InputError(f"{where}.{key}: the IPv6 wildcard is not supported for TFTP; "
                             "name the address (or use 0.0.0.0)")
        return value

    out = ServeSettings(
        tftp=get("tftp", bool, True),
        tftp_address=address("tftp_address"),
        tftp_port=number("tftp_port", int, 69, 1, 65535),
        tftp_workers=number("tftp_workers", int, _default_tftp_workers(), 1, 64),
        max_transfers=number("max_transfers", int, 512, 1, 100_000),
        timeout=number("timeout", float, 1.0, 0.05, 255.0),
        retries=number("retries", int, 5, 0, 100),
        max_blksize=number("max_blksize", int, MAX_BLKSIZE, 512, MAX_BLKSIZE),
        max_windowsize=number("max_windowsize", int, 64, 1, 1024),
        tftp_cache_mb=number("tftp_cache_mb", int, 128, 0, 65536),
        http=get("http", bool, True),
        http_address=address("http_address"),
        http_port=number("http_port", int, cfg.boot.http_port, 1, 65535),
        http_workers=number("http_workers", int, _default_workers(), 1, 64),
        http_timeout=number("http_timeout", float, 5.0, 0.1, 3600.0),
        http_max_per_client=number("http_max_per_client", int, 128, 1, 100_000),
        access_log=get("access_log", bool, False),
        standard_configs_dir=Path(get("standard_configs_dir", str,
                                      str(cfg.paths.state_dir / "servers"))),
    )
    if not out.standard_configs_dir.is_absolute():
        raise InputError(f"{where}.standard_configs_dir: must be an absolute path")
    if not out.tftp and not out.http:
        raise InputError(f"{where}: both tftp and http are off: nothing to serve")
    return out
