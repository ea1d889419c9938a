"""The site configuration: one TOML file, checked key by key so a typo is a one-line error.

Found at ``--config``, else ``$DYNPROV_CONFIG``, else ``/etc/dynprov/dynprov.toml``.
"""

from __future__ import annotations

import os
from pathlib import Path

from pxe import validate
from pxe.errors import InputError
from pxe.records import Factory, Record

TYPE_CHECKING = False  # not typing's: every command imports this module (typing costs ~2 ms)
if TYPE_CHECKING:
    from typing import Any

DEFAULT_PATH = "/etc/dynprov/dynprov.toml"
DEFAULT_TEMPLATES_DIR = "/etc/dynprov/templates"  # site overrides of the packaged templates
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Network(Record):
    interface: str
    subnet: str
    server: str
    dynamic_range: tuple[str, str]
    gateway: str | None = None
    dns: str | None = None


class Dhcp(Record):
    backend: str  # "dnsmasq" or "isc"
    config_file: Path
    reload_command: tuple[str, ...]
    check_command: tuple[str, ...] | None = None  # overrides the daemon binary for the check
    # "server": we hand out addresses and boot options; "proxy": the site's (campus) DHCP server
    # hands out addresses and dnsmasq answers only the PXE part (proxyDHCP, docs/admin-guide.md).
    mode: str = "server"
    proxy_unknown: bool = False  # proxy mode: answer PXE for MACs not in the inventory too


class Paths(Record):
    tftp_root: Path
    http_root: Path
    state_dir: Path
    templates_dir: Path  # a file here replaces the packaged template of the same name (pxe.render)
    secrets_file: Path


IPXE_BIOS_LOADER = "undionly.kpxe"  # the default first loaders when [boot] ipxe_http is on
IPXE_UEFI_LOADER = "ipxe.efi"


class Boot(Record):
    bios_loader: str = "pxelinux.0"
    uefi_loader: str = "grubx64.efi"
    http_port: int = 8080
    default_target: str = "local"  # what unknown MACs boot
    # iPXE firmware (user class "iPXE", DHCP option 175) gets boot.ipxe over HTTP instead of
    # pxelinux/GRUB over TFTP: in the lab 4 nodes booted in 65 s instead of 109 s. TFTP then
    # carries only the first loader.
    ipxe_http: bool = True
    # Per-node loader configs as files in the TFTP/HTTP roots, for sites serving with tftpd-hpa
    # or nginx; `pxe-stage serve` renders them from the database per request without them.
    write_files: bool = False


class Groups(Record):
    image: str = "fgimage"
    pool: str = "fgpool"
    scheduler_pool: str = "hpc"


class Limits(Record):
    """Caps on what one command may be asked to do (a typo must not exhaust the server)."""

    max_nodes: int = 100_000  # names one node set may expand to; counted before expanding
    import_max_bytes: int = 64 * 1024 * 1024  # a `nodes import` file (CSV/YAML)


class State(Record):
    """Where the state lives: the SQLite file under paths.state_dir (url None, the default) or a
    PostgreSQL database shared by several boot servers (docs/admin-guide.md, "Choosing the state
    store")."""

    url: str | None = None


class Config(Record):
    path: Path
    network: Network
    dhcp: Dhcp
    paths: Paths
    boot: Boot = Factory(Boot)
    groups: Groups = Factory(Groups)
    limits: Limits = Factory(Limits)
    state: State = Factory(State)
    raw: dict[str, Any] = Factory(dict)
    _norepr = ("raw",)

    @property
    def db_path(self) -> Path:
        return self.paths.state_dir / "dynprov.db"

    @property
    def database(self) -> Path | str:
        """What pxe.db.connect opens: the PostgreSQL URL if [state] url is set, else db_path."""
        return self.state.url or self.db_path

    @property
    def lock_path(self) -> Path:
        return self.paths.state_dir / "render.lock"


_KNOWN: dict[str, set[str]] = {
    "network": {"interface", "subnet", "server", "dynamic_range", "gateway", "dns"},
    "dhcp": {"backend", "config_file", "reload_command", "check_command", "mode", "proxy_unknown"},
    "paths": {"tftp_root", "http_root", "state_dir", "templates_dir", "templates", "secrets_file"},
    "boot": {"bios_loader", "uefi_loader", "http_port", "default_target", "ipxe_http",
             "write_files"},
    "groups": {"image", "pool", "scheduler_pool"},
    "limits": {"max_nodes", "import_max_bytes"},
    "state": {"url"},
}
# Sections other modules own (power, serve, moab...); checked by those modules.
_OPEN_SECTIONS = {"power", "serve", "moab", "images", "api", "lab", "slurm", "hooks", "console",
                  "discovery", "segment"}


def locate(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("DYNPROV_CONFIG")
    return Path(env) if env else Path(DEFAULT_PATH)


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list", dict: "a table"}


class _Reader:
    """Reads typed keys from one section and names the file and key in every complaint."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    def fail(self, key: str, problem: str) -> InputError:
        return InputError(f"{self.path}: {key}: {problem}")

    def section(self, name: str, required: bool = True) -> dict[str, Any]:
        value = self.data.get(name)
        if value is None:
            if required:
                raise self.fail(f"[{name}]", "missing section")
            return {}
        if not isinstance(value, dict):
            raise self.fail(f"[{name}]", "must be a table")
        return value

    def get(self, sec: str, key: str, kind: type, default: Any = ...) -> Any:
        table = self.data.get(sec) or {}
        if key not in table:
            if default is ...:
                raise self.fail(f"{sec}.{key}", "missing key")
            return default
        value = table[key]
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(f"{sec}.{key}", f"must be {_KIND_NAMES.get(kind, kind.__name__)}, "
                                             f"got {value!r}")
        return value

    def bounded(self, sec: str, key: str, low: int, high: int, default: int) -> int:
        value = self.get(sec, key, int, default)
        if not low <= value <= high:
            raise self.fail(f"{sec}.{key}", f"must be between {low} and {high}, got {value}")
        return value

    def checked(self, sec: str, key: str, check, default: Any = ...) -> Any:
        value = self.get(sec, key, str, default)
        if value is None:
            return None
        try:
            return check(value)
        except InputError as exc:
            raise self.fail(f"{sec}.{key}", str(exc)) from None

    def argv(self, sec: str, key: str, default: Any = ...) -> tuple[str, ...] | None:
        value = self.get(sec, key, list, default)
        if value is None:
            return None
        if not value or not all(isinstance(v, str) and v for v in value):
            raise self.fail(f"{sec}.{key}", "must be a non-empty list of strings (an argv, not a shell line)")
        return tuple(value)


MAX_CONFIG_BYTES = 1 << 20  # a site config is a few KiB; refuse to parse a stray huge file


def load(explicit: str | os.PathLike[str] | None = None) -> Config:
    """Load and check the configuration; every problem is an InputError naming file and key.

    A config checked before is taken from pxe.configcache (the same text, file and code: no
    TOML parser, no netaddr); anything else is parsed and checked here, then cached.
    """
    from pxe import configcache

    path = locate(explicit)
    identity: list[os.stat_result] = []
    text = read_text_file(path, MAX_CONFIG_BYTES, "configuration file",
                          missing_hint=" (set --config or DYNPROV_CONFIG)", stat_into=identity)
    cached = configcache.lookup(path, text, identity[0])
    if cached is not None:
        return cached
    import tomllib  # ~7 ms with its imports: only when the config is parsed

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML: {exc}") from None
    cfg = from_dict(data, path)
    configcache.store(cfg, text, identity[0])
    return cfg


def read_text_file(path: str | os.PathLike[str], max_bytes: int, what: str,
                   missing_hint: str = "", follow_symlinks: bool = True,
                   stat_into: list[os.stat_result] | None = None) -> str:
    """The UTF-8 text of a regular file the caller may read, or an InputError naming it.

    Opened with O_NONBLOCK (and O_NOFOLLOW unless ``follow_symlinks``) and checked with fstat
    before reading, so a FIFO, a device or a directory is refused at once instead of blocking.
    ``stat_into`` receives that fstat (the identity of the file the text was read from).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found{missing_hint}") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied reading the {what} "
                         "(run as a user who may read it, or as root)") from None
    except OSError as exc:
        if not follow_symlinks and os.path.islink(path):
            raise InputError(f"{path}: {what} is a symbolic link; give the real file") from None
        raise InputError(f"{path}: cannot open the {what}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat_into is not None:
            stat_into.append(st)
        import stat

        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{path}: {what} is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path}: {what} is not a regular file (a FIFO, socket or device)")
        if st.st_size > max_bytes:
            raise InputError(f"{path}: {what} is too large ({st.st_size} bytes; at most {max_bytes})")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise InputError(f"{path}: {what} is too large (more than {max_bytes} bytes)")
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {what}: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if b"\0" in data:
        raise InputError(f"{path}: {what} is binary (contains NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(f"{path}: {what} is not UTF-8 text (bad byte at line {line})") from None


def from_dict(data: dict[str, Any], path: Path) -> Config:
    r = _Reader(path, data)
    for sec, value in data.items():
        if sec in _OPEN_SECTIONS:
            if not isinstance(value, dict):
                raise r.fail(f"[{sec}]", "must be a table")
            continue
        if sec not in _KNOWN:
            raise r.fail(sec, f"unknown section or key (known: {', '.join(sorted(_KNOWN))})")
        if isinstance(value, dict):
            for key in value:
                if key not in _KNOWN[sec]:
                    raise r.fail(f"{sec}.{key}", f"unknown key (known: {', '.join(sorted(_KNOWN[sec]))})")
    for sec in ("network", "dhcp", "paths"):
        r.section(sec)

    subnet = r.checked("network", "subnet", validate.ipv4_network)
    server = r.checked("network", "server", validate.ipv4)
    interface = r.checked("network", "interface", validate.interface)
    rng = r.get("network", "dynamic_range", list)
    if len(rng) != 2:
        raise r.fail("network.dynamic_range", "must be [first, last]")
    import netaddr

    net = netaddr.IPNetwork(subnet)
    try:
        first, last = (validate.ipv4(str(a)) for a in rng)
    except InputError as exc:
        raise r.fail("network.dynamic_range", str(exc)) from None
    for name, addr in (("network.server", server), ("network.dynamic_range", first),
                       ("network.dynamic_range", last)):
        if netaddr.IPAddress(addr) not in net:
            raise r.fail(name, f"{addr} is outside the subnet {subnet}")
    if netaddr.IPAddress(first) > netaddr.IPAddress(last):
        raise r.fail("network.dynamic_range", "first address is after the last")
    network = Network(
        interface=interface, subnet=subnet, server=server, dynamic_range=(first, last),
        gateway=r.checked("network", "gateway", validate.ipv4, None),
        dns=r.checked("network", "dns", validate.ipv4, None),
    )

    backend = r.checked("dhcp", "backend", lambda v: validate.choice(v, ("dnsmasq", "isc"), "backend"))
    dhcp = Dhcp(
        backend=backend,
        config_file=Path(r.get("dhcp", "config_file", str)),
        reload_command=r.argv("dhcp", "reload_command"),
        check_command=r.argv("dhcp", "check_command", None),
        mode=r.checked("dhcp", "mode", lambda v: validate.choice(v, ("server", "proxy"), "mode"),
                       Dhcp.mode),
        proxy_unknown=r.get("dhcp", "proxy_unknown", bool, Dhcp.proxy_unknown),
    )
    if dhcp.mode == "proxy" and dhcp.backend != "dnsmasq":
        raise r.fail("dhcp.mode", 'proxy needs backend = "dnsmasq" (ISC dhcpd cannot answer as '
                     "a proxyDHCP server: it always hands out addresses)")
    state_dir = Path(r.get("paths", "state_dir", str))
    given = r.data.get("paths") or {}
    if "templates" in given and "templates_dir" in given:
        raise r.fail("paths.templates", "older name of paths.templates_dir; give only one")
    templates_key = "templates" if "templates" in given else "templates_dir"
    templates_dir = r.get("paths", templates_key, str, DEFAULT_TEMPLATES_DIR)
    paths = Paths(
        tftp_root=Path(r.get("paths", "tftp_root", str)),
        http_root=Path(r.get("paths", "http_root", str)),
        state_dir=state_dir,
        templates_dir=Path(templates_dir),
        secrets_file=Path(r.get("paths", "secrets_file", str, "/etc/dynprov/bmc-secrets")),
    )
    for key, value in (("tftp_root", paths.tftp_root), ("http_root", paths.http_root),
                       ("state_dir", paths.state_dir), ("templates_dir", paths.templates_dir)):
        if not value.is_absolute():
            raise r.fail(f"paths.{key}", f"must be an absolute path, got {str(value)!r}")
    # proxyDHCP boots through the pxelinux/GRUB chain (what the lab proved): an iPXE loader
    # would be offered itself again by the proxy (no option-175 answer in proxy mode) and loop.
    ipxe_http = r.get("boot", "ipxe_http", bool, Boot.ipxe_http and dhcp.mode != "proxy")
    if ipxe_http and dhcp.mode == "proxy":
        raise r.fail("boot.ipxe_http", '[dhcp] mode = "proxy" boots through the pxelinux/GRUB '
                     "chain over TFTP; leave ipxe_http unset (or false) in proxy mode")
    # With iPXE over HTTP, TFTP carries only the first loader: iPXE itself (Debian package ipxe).
    bios_default, uefi_default = (IPXE_BIOS_LOADER, IPXE_UEFI_LOADER) if ipxe_http else \
        (Boot.bios_loader, Boot.uefi_loader)
    boot = Boot(
        bios_loader=r.checked("boot", "bios_loader", _loader_name, bios_default),
        uefi_loader=r.checked("boot", "uefi_loader", _loader_name, uefi_default),
        http_port=r.bounded("boot", "http_port", 1, 65535, Boot.http_port),
        default_target=r.checked(
            "boot", "default_target", lambda v: validate.choice(v, ("local", "none"), "target"),
            Boot.default_target),
        ipxe_http=ipxe_http,
        write_files=r.get("boot", "write_files", bool, Boot.write_files),
    )
    groups = Groups(
        image=r.checked("groups", "image", lambda v: validate.unix_name(v, "group"), Groups.image),
        pool=r.checked("groups", "pool", lambda v: validate.unix_name(v, "group"), Groups.pool),
        scheduler_pool=r.checked("groups", "scheduler_pool", lambda v: validate.label(v, "pool"),
                                 Groups.scheduler_pool),
    )
    limits = Limits(
        max_nodes=r.bounded("limits", "max_nodes", 1, 10_000_000, Limits.max_nodes),
        import_max_bytes=r.bounded("limits", "import_max_bytes", 1024, 1 << 34,
                                   Limits.import_max_bytes),
    )
    state = State(url=r.checked("state", "url", state_url, None))
    return Config(path=path, network=network, dhcp=dhcp, paths=paths, boot=boot, groups=groups,
                  limits=limits, state=state, raw=data)


_STATE_URL = r"^postgres(?:ql)?://[\x21-\x7e]*$"  # compiled when a config is checked


def state_url(value: str) -> str:
    """[state] url: a postgresql:// URL (libpq's form), printable ASCII without spaces."""
    import re

    if not re.match(_STATE_URL, value) or len(value) > 1024:
        raise InputError("must be a PostgreSQL URL such as postgresql://dynprov@dbhost/dynprov "
                         "or postgresql:///dynprov?host=/run/postgresql (omit [state] url for "
                         "the SQLite file under paths.state_dir)")
    return value


def _loader_name(value: str) -> str:
    parts = value.split("/")
    for part in parts:
        validate.label(part, "boot loader file name")
    return value


def example(root: Path, backend: str = "dnsmasq", interface: str = "br0",
            subnet: str = "198.18.0.0/24", server: str = "198.18.0.1") -> str:
    """A complete config for a throw-away site under ``root`` (tests, demo, `pxe-stage init`)."""
    import netaddr

    net = netaddr.IPNetwork(subnet)
    first, last = net[100], net[200]
    conf_file = root / ("dnsmasq.conf" if backend == "dnsmasq" else "dhcpd.conf")
    return f"""# dynprov site configuration
[network]
interface = "{interface}"
subnet = "{subnet}"
server = "{server}"
dynamic_range = ["{first}", "{last}"]

[dhcp]
backend = "{backend}"
config_file = "{conf_file}"
reload_command = ["/bin/true"]

[paths]
tftp_root = "{root / 'tftp'}"
http_root = "{root / 'http'}"
state_dir = "{root / 'state'}"
templates_dir = "{root / 'templates'}"
secrets_file = "{root / 'bmc-secrets'}"
"""
