"""The ``[power]`` section of the site config, checked key by key (this module owns it).

```toml
[power]
workers = 64            # threads for per-node drivers (Redfish, WoL, manual, soft-off command)
timeout = 5.0           # seconds per attempt on one node
retries = 2             # further attempts after a timeout or an unreachable BMC
ipmi_sessions = 1024    # IPMI sessions in flight at once (one event loop, no thread each)
ipmi_cipher_suite = 3   # 3 (HMAC-SHA1, AES) or 17 (HMAC-SHA256, AES)
redfish_scheme = "https"
redfish_verify = true   # or the path of a CA bundle
wol_broadcast = "198.18.0.255"  # default: the broadcast address of [network] subnet
wol_port = 9
soft_off_command = ["ssh", "-o", "BatchMode=yes", "root@{ip}", "poweroff"]  # WoL nodes: off
soft_reboot_command = ["ssh", "-o", "BatchMode=yes", "root@{ip}", "reboot"]  # WoL nodes that run
soft_reboot_timeout = 30.0  # seconds before a hanging soft_reboot_command is killed
agent_stale = 30.0      # a node agent silent this long: its machine is taken to be off
```
``{node}`` and ``{ip}`` in soft_off_command and soft_reboot_command are replaced inside single
argv items (no shell).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pxe import validate
from pxe.config import Config
from pxe.errors import InputError

KEYS = ("workers", "timeout", "retries", "ipmi_sessions", "ipmi_cipher_suite", "redfish_scheme",
        "redfish_verify", "wol_broadcast", "wol_port", "soft_off_command", "soft_reboot_command",
        "soft_reboot_timeout", "agent_stale")
PLACEHOLDERS = ("{node}", "{ip}")


@dataclass(frozen=True)
class Settings:
    workers: int = 64
    timeout: float = 5.0
    retries: int = 2
    ipmi_sessions: int = 1024
    ipmi_cipher_suite: int = 3
    redfish_scheme: str = "https"
    redfish_verify: bool | str = True
    wol_broadcast: str = "255.255.255.255"
    wol_port: int = 9
    soft_off_command: tuple[str, ...] | None = None
    soft_reboot_command: tuple[str, ...] | None = None
    soft_reboot_timeout: float = 30.0
    agent_stale: float = 30.0

    def with_overrides(self, *, workers: int | None = None, timeout: float | None = None,
                       retries: int | None = None) -> Settings:
        out = self
        if workers is not None:
            out = replace(out, workers=_int_range("workers", workers, 1, 4096))
        if timeout is not None:
            out = replace(out, timeout=_seconds("timeout", timeout))
        if retries is not None:
            out = replace(out, retries=_int_range("retries", retries, 0, 10))
        return out


def _int_range(key: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InputError(f"power.{key}: must be an integer from {low} to {high}, got {value!r}")
    return value


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 600:
        raise InputError(f"power.{key}: must be a number of seconds (0-600], got {value!r}")
    return float(value)


def load(cfg: Config) -> Settings:
    """Settings from ``cfg.raw["power"]``; every problem names the file and the key."""
    try:
        return _load(cfg)
    except InputError as exc:
        raise InputError(f"{cfg.path}: {exc}") from None


def _load(cfg: Config) -> Settings:
    import netaddr

    raw = cfg.raw.get("power", {})
    if not isinstance(raw, dict):
        raise InputError("[power]: must be a table")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise InputError(f"power.{unknown[0]}: unknown key (known: {', '.join(KEYS)})")
    s = Settings(wol_broadcast=str(netaddr.IPNetwork(cfg.network.subnet).broadcast
                                   or "255.255.255.255"))
    if "workers" in raw:
        s = replace(s, workers=_int_range("workers", raw["workers"], 1, 4096))
    if "timeout" in raw:
        s = replace(s, timeout=_seconds("timeout", raw["timeout"]))
    if "retries" in raw:
        s = replace(s, retries=_int_range("retries", raw["retries"], 0, 10))
    if "ipmi_sessions" in raw:
        s = replace(s, ipmi_sessions=_int_range("ipmi_sessions", raw["ipmi_sessions"], 1, 16384))
    if "ipmi_cipher_suite" in raw:
        if raw["ipmi_cipher_suite"] not in (3, 17) or isinstance(raw["ipmi_cipher_suite"], bool):
            raise InputError(f"power.ipmi_cipher_suite: must be 3 or 17, got "
                             f"{raw['ipmi_cipher_suite']!r}")
        s = replace(s, ipmi_cipher_suite=raw["ipmi_cipher_suite"])
    if "redfish_scheme" in raw:
        if raw["redfish_scheme"] not in ("https", "http"):
            raise InputError(f"power.redfish_scheme: must be \"https\" or \"http\", got "
                             f"{raw['redfish_scheme']!r}")
        s = replace(s, redfish_scheme=raw["redfish_scheme"])
    if "redfish_verify" in raw:
        verify = raw["redfish_verify"]
        if not isinstance(verify, bool) and not (isinstance(verify, str) and
                                                 verify.startswith("/")):
            raise InputError("power.redfish_verify: must be true, false or the absolute path of "
                             f"a CA bundle, got {verify!r}")
        s = replace(s, redfish_verify=verify)
    if "wol_broadcast" in raw:
        value = raw["wol_broadcast"]
        try:
            addr = validate.ipv4(value if isinstance(value, str) else repr(value),
                                 "broadcast address")
        except InputError as exc:
            raise InputError(f"power.wol_broadcast: {exc}") from None
        s = replace(s, wol_broadcast=addr)
    if "wol_port" in raw:
        s = replace(s, wol_port=_int_range("wol_port", raw["wol_port"], 1, 65535))
    for key in ("soft_off_command", "soft_reboot_command"):
        if key in raw:
            s = replace(s, **{key: _argv(key, raw[key])})
    for key in ("soft_reboot_timeout", "agent_stale"):
        if key in raw:
            value = _seconds(key, raw[key])
            if value > 600:
                raise InputError(f"power.{key}: at most 600 seconds, got {value:g}")
            s = replace(s, **{key: value})
    return s


def _argv(key: str, argv: Any) -> tuple[str, ...]:
    if (not isinstance(argv, list) or not argv
            or not all(isinstance(a, str) and a for a in argv)):
        raise InputError(f"power.{key}: must be a non-empty list of strings "
                         "(an argv, not a shell line), e.g. [\"ssh\", \"root@{ip}\", "
                         "\"poweroff\"]")
    if "{" in argv[0]:
        raise InputError(f"power.{key}: the program (first item) cannot be a placeholder")
    return tuple(argv)


def soft_off_argv(argv: tuple[str, ...], node: str, ip: str | None) -> list[str]:
    """Substitute {node} and {ip} inside argv items; each item stays exactly one argument."""
    if any("{ip}" in a for a in argv) and not ip:
        raise InputError(f"node {node}: the power command uses {{ip}} but the node has no IP")
    return [a.replace("{node}", node).replace("{ip}", ip or "") for a in argv]
