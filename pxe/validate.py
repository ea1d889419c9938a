"""Strict checks for every value that may end up in a config file, a path or an argv.

Everything a user types passes through here before it reaches a template or the disk:
a name that could break out of a path or a config line is refused, not escaped.
"""

from __future__ import annotations

import re

from pxe.errors import InputError
from pxe.lazyre import lazy

# RFC 1123 host label; HPC node names such as n001, cn-12, gpu3.
_HOSTNAME = lazy(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
# Image labels, pool and group names: the same set users write in `msub -l os=...`.
# A Linux interface name as an admin writes it (eth0, eno1np0, eth0.100, br_ib, ib0): at most 15
# characters (IFNAMSIZ - 1), starting with a letter or digit; never '/', ':', whitespace or quotes.
_INTERFACE = lazy(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,14}$")
_LABEL = lazy(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_UNIX_NAME = lazy(r"^[a-z_][a-z0-9_-]{0,31}\$?$")
_SECRET_REF = lazy(r"^(?:file:/[A-Za-z0-9._/-]+|[A-Za-z0-9][A-Za-z0-9._-]{0,63})$")

ARCHES = ("x86_64", "aarch64")
FIRMWARES = ("bios", "uefi")
BMC_TYPES = ("ipmi", "redfish", "wol", "none")
IMAGE_MODES = ("stateless", "stateful")


def _show(value: object) -> str:
    """The bad value as the message shows it: quoted, and cut short when huge (one line)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > 80:
        return f"{text[:60]!r}... ({len(text)} characters)"
    return repr(text)


def hostname(value: str) -> str:
    """A node name: one DNS label, no dots, slashes, quotes or whitespace."""
    if not isinstance(value, str) or not _HOSTNAME.fullmatch(value):
        raise InputError(
            f"invalid node name {_show(value)}: use letters, digits and '-' "
            "(1-63 characters, not starting or ending with '-')"
        )
    return value


def interface(value: str, what: str = "interface") -> str:
    """A network interface name: VLANs (eth0.100) and underscores (br_ib) are everyday names."""
    if not isinstance(value, str) or not _INTERFACE.fullmatch(value):
        raise InputError(
            f"invalid {what} {_show(value)}: an interface name is letters, digits, '.', '_' and "
            "'-' (1-15 characters, starting with a letter or digit)"
        )
    return value


def label(value: str, what: str = "label") -> str:
    """An image label or pool name: [A-Za-z0-9._-], starting with a letter or digit, no '..'."""
    if not isinstance(value, str) or not _LABEL.fullmatch(value) or ".." in value:
        raise InputError(
            f"invalid {what} {_show(value)}: use letters, digits, '.', '_' and '-' "
            "(1-64 characters, starting with a letter or digit, no '..')"
        )
    return value


def unix_name(value: str, what: str = "user") -> str:
    if not isinstance(value, str) or not _UNIX_NAME.fullmatch(value):
        raise InputError(f"invalid {what} name {_show(value)}")
    return value


def mac(value: str) -> str:
    """Normalise a MAC to lower-case colon form; accepts AA-BB-.., aabb.ccdd.eeff, upper case."""
    import netaddr

    text = value.strip() if isinstance(value, str) else ""
    # netaddr also accepts integers-as-strings and odd forms; insist on 12 hex digits.
    digits = re.sub(r"[:.\-]", "", text)
    if not re.fullmatch(r"[0-9A-Fa-f]{12}", digits):
        raise InputError(f"invalid MAC address {_show(value)}: expected 6 bytes, e.g. 52:54:00:aa:00:01")
    try:
        eui = netaddr.EUI(text, version=48, dialect=netaddr.mac_unix_expanded)
    except (netaddr.AddrFormatError, TypeError, ValueError) as exc:
        raise InputError(f"invalid MAC address {_show(value)}: {exc}") from None
    if int(eui.words[0]) & 1:
        raise InputError(f"invalid MAC address {_show(value)}: multicast/broadcast address")
    return str(eui)


def mac_dashes(mac_addr: str) -> str:
    """pxelinux's per-node file name part: 01-aa-bb-cc-dd-ee-ff (01 = Ethernet)."""
    return "01-" + mac_addr.replace(":", "-")


def ipv4(value: str, what: str = "IP address") -> str:
    import netaddr

    try:
        addr = netaddr.IPAddress(value.strip(), version=4, flags=netaddr.INET_PTON)
    except (netaddr.AddrFormatError, AttributeError, ValueError, TypeError):
        raise InputError(f"invalid {what} {_show(value)}: expected a dotted IPv4 address") from None
    return str(addr)


def ipv4_network(value: str, what: str = "subnet") -> str:
    import netaddr

    try:
        net = netaddr.IPNetwork(value.strip(), version=4)
    except (netaddr.AddrFormatError, AttributeError, ValueError, TypeError):
        raise InputError(f"invalid {what} {_show(value)}: expected CIDR such as 10.0.0.0/24") from None
    if net.ip != net.network:
        raise InputError(f"invalid {what} {_show(value)}: host bits set (did you mean {net.cidr}?)")
    return str(net.cidr)


def choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise InputError(f"invalid {what} {_show(value)}: expected one of {', '.join(allowed)}")
    return value


def port(value: object, what: str = "port") -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise InputError(f"invalid {what} {_show(value)}: expected 1-65535") from None
    if not 1 <= number <= 65535:
        raise InputError(f"invalid {what} {_show(value)}: expected 1-65535")
    return number


def secret_ref(value: str) -> str:
    """A reference to a BMC password (a key of the secrets file, or file:/path) - never the password."""
    if not isinstance(value, str) or not _SECRET_REF.fullmatch(value) or ".." in value:
        raise InputError(
            f"invalid BMC secret reference {_show(value)}: give a key of the secrets file "
            "or file:/absolute/path, never the password itself"
        )
    return value


def cmdline(value: str) -> str:
    """A kernel command line: printable, one line, no template or config metacharacters."""
    if not isinstance(value, str) or re.search(r"[\x00-\x1f\x7f\"'`{}$\\;]", value) or len(value) > 2048:
        raise InputError(
            "invalid kernel command line: one line of printable characters without quotes, "
            "'{', '}', '$', '\\' or ';'"
        )
    return value.strip()
