"""The node's side: what the booted image says about itself, and its calls to the server.

Everything is read below one root (``$DYNPROV_NODE_ROOT``, default ``/``), so several test nodes
can share a host:
    <root>/proc/cmdline          dynprov.server=, dynprov.node=, dynprov.token= (this boot's)
    <root>/etc/os-release        IMAGE_ID (else ID): the image label this system is
    <root>/etc/dynprov/node-key  the node key from `dynprov-slurm enroll` (0400, root)
No call in here imports the toolkit: slurmd runs the helper at every registration.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pxe.errors import DynprovError, InputError

# The same patterns as pxe.validate (kept here so the helper does not import netaddr).
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_SERVER = re.compile(r"https?://[A-Za-z0-9.:\[\]-]+(?::\d{1,5})?/?")
TIMEOUT = 8.0  # seconds per server call: slurmd's helper ExecTime default is 10


def root() -> Path:
    return Path(os.environ.get("DYNPROV_NODE_ROOT") or "/")


def check_label(value: str) -> str:
    if not _LABEL.fullmatch(value) or ".." in value:
        raise InputError(f"invalid image label {value!r}: use letters, digits, '.', '_' and '-' "
                         "(1-64 characters, starting with a letter or digit)")
    return value


def os_label(base: Path | None = None) -> str:
    """IMAGE_ID, else ID, of the booted image's os-release (what the agent reports as ready)."""
    base = base or root()
    for rel in ("etc/os-release", "usr/lib/os-release"):
        try:
            text = (base / rel).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        values = {}
        for line in text.splitlines():
            key, eq, value = line.partition("=")
            if eq:
                values[key.strip()] = value.strip().strip("'\"")
        label = values.get("IMAGE_ID") or values.get("ID")
        if label:
            if not _LABEL.fullmatch(label) or ".." in label:  # a broken image, not bad input
                raise DynprovError(f"{base / rel}: no valid IMAGE_ID or ID ({label!r}): "
                                   "cannot tell the image")
            return label
    raise DynprovError(f"{base / 'etc/os-release'}: no IMAGE_ID or ID: cannot tell the image")


def cmdline(base: Path | None = None) -> dict[str, str]:
    """The dynprov.* parameters of this boot's kernel command line."""
    path = (base or root()) / "proc/cmdline"
    try:
        words = path.read_text(encoding="utf-8", errors="replace").split()
    except OSError as exc:
        raise DynprovError(f"{path}: {exc.strerror}") from None
    out = {}
    for word in words:
        key, eq, value = word.partition("=")
        if eq and key.startswith("dynprov."):
            out[key[len("dynprov."):]] = value
    return out


def identity(base: Path | None = None) -> tuple[str, str]:
    """(server URL, node name) of this boot, checked."""
    args = cmdline(base)
    server, node = args.get("server", ""), args.get("node", "")
    if not _SERVER.fullmatch(server) or not _HOST.fullmatch(node):
        raise DynprovError("not a dynprov boot: the kernel command line lacks a valid "
                           "dynprov.server= and dynprov.node=")
    return server.rstrip("/"), node


def key_path(base: Path | None = None) -> Path:
    return (base or root()) / "etc/dynprov/node-key"


def read_key(base: Path | None = None) -> str:
    path = key_path(base)
    try:
        key = path.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise DynprovError(f"{path}: {exc.strerror}: run 'dynprov-slurm enroll' at boot") from None
    if not key:
        raise DynprovError(f"{path}: empty: run 'dynprov-slurm enroll' at boot")
    return key


def post(server: str, route: str, fields: dict[str, str]) -> str:
    """POST a form to the server; returns its answer, DynprovError with its one line if refused."""
    return post_bytes(server, route, fields, 4096).decode("utf-8", "replace").strip()


def post_bytes(server: str, route: str, fields: dict[str, str], limit: int) -> bytes:
    import urllib.error
    import urllib.parse
    import urllib.request

    data = urllib.parse.urlencode(fields).encode("ascii")
    req = urllib.request.Request(f"{server}{route}", data=data, method="POST", headers={
        "Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:  # noqa: S310 - our server
            return resp.read(limit)
    except urllib.error.HTTPError as exc:
        text = exc.read(4096).decode("utf-8", "replace").strip() or exc.reason
        raise DynprovError(f"server refused ({exc.code}): {text}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DynprovError(f"provisioning server {server} unreachable: {reason}") from None


MUNGE_KEY = "etc/munge/munge.key"


def enroll(base: Path | None = None, *, munge_key: bool = False) -> list[Path]:
    """Trade this boot's one-time token for a node key (before the agent's "ready" uses it);
    with ``munge_key`` also fetch Slurm's munge key (node secret ``munge.key``) over the same
    authenticated channel. Returns the files written."""
    from pxe import atomic

    base = base or root()
    server, node = identity(base)
    token = cmdline(base).get("token", "")
    if not token:
        raise DynprovError("no dynprov.token on the kernel command line: nothing to enroll with")
    written = []
    if munge_key:  # first: a failure here leaves the token for a second try
        written.append(_write_munge_key(base, post_bytes(
            server, "/node/secret", {"node": node, "token": token, "name": "munge.key"},
            64 << 10)))
    key = post(server, "/node/enroll", {"node": node, "token": token})
    if not re.fullmatch(r"[A-Za-z0-9_-]{20,128}", key):
        raise DynprovError("the server's answer is not a node key")
    path = key_path(base)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    atomic.write_bytes(path, (key + "\n").encode("ascii"), mode=0o400)
    return [path, *written]


def _write_munge_key(base: Path, data: bytes) -> Path:
    """/etc/munge/munge.key, mode 0400, owned by munge (munged refuses anything looser)."""
    import pwd

    from pxe import atomic

    if len(data) < 32:
        raise DynprovError("the server's munge key is too short to be one")
    try:
        munge = pwd.getpwnam("munge")
    except KeyError:
        raise DynprovError("no 'munge' user on this node: install munge first") from None
    path = base / MUNGE_KEY
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic.write_bytes(path, data, mode=0o400)
    os.chown(path, munge.pw_uid, munge.pw_gid)
    return path


def request_image(label: str, base: Path | None = None) -> str:
    base = base or root()
    server, node = identity(base)
    return post(server, "/node/next-image", {"node": node, "key": read_key(base),
                                             "image": check_label(label)})


def request_reboot(base: Path | None = None) -> str:
    base = base or root()
    server, node = identity(base)
    return post(server, "/node/reboot", {"node": node, "key": read_key(base)})
