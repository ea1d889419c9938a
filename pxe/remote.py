"""The client of the REST service (pxe/api): what `fg-moab-image`, `fg-pool` and the read-only
parts of `pxe-stage` use when given ``--server URL``, so users need no shell on the server.

Where the server is: ``--server URL``, else $DYNPROV_SERVER, else ``server`` in the client file
(``$DYNPROV_CLIENT_CONFIG``, default ``~/.config/dynprov/client.toml``: keys server, ca_file,
user), else ``[api] server`` of the site config if one is readable. Certificates are verified,
against ``ca_file`` ($DYNPROV_CA_FILE) if given, else the system's CAs.

Login: the user name is $DYNPROV_USER, the client file's ``user``, else the login name; the
password is $DYNPROV_PASSWORD (for scripts and portals), else asked on the terminal. It is
traded once for a bearer token, kept 0600 in ``~/.cache/dynprov/tokens.json`` until it
expires, so later commands do not send the password again.

Uploads stream from the file (never read whole into memory) with a progress bar on stderr when
it is a terminal; the server publishes an upload all or nothing. Downloads go to a temporary
file beside the output, checked against the recorded sha256, then renamed into place.

Standard library only (http.client, ssl): the commands stay quick to start.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import http.client
import json
import os
import ssl
import sys
import tempfile
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol

from pxe.authz import PermissionDenied
from pxe.errors import DynprovError, InputError, NotFound

CHUNK = 1 << 20
TIMEOUT = 300.0
V1 = "/api/v1"


def client_config() -> dict[str, Any]:
    path = Path(os.environ.get("DYNPROV_CLIENT_CONFIG")
                or Path.home() / ".config" / "dynprov" / "client.toml")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: {exc}") from None
    unknown = sorted(set(data) - {"server", "ca_file", "user"})
    if unknown:
        raise InputError(f"{path}: {unknown[0]}: unknown key (known: ca_file, server, user)")
    return data


def resolve(server: str | None, site_config: str | None = None) -> Client | None:
    """The client for ``--server`` / $DYNPROV_SERVER / the client file / [api] server, or None
    when none is set (then the command works on local files as before)."""
    conf = client_config()
    url = server or os.environ.get("DYNPROV_SERVER") or conf.get("server")
    ca_file = os.environ.get("DYNPROV_CA_FILE") or conf.get("ca_file")
    if not url and site_config is not None:
        url, ca_file = _from_site(site_config, ca_file)
    if not url:
        return None
    return Client(url, ca_file=ca_file, user=os.environ.get("DYNPROV_USER") or conf.get("user"))


def _from_site(site_config: str, ca_file: str | None) -> tuple[str | None, str | None]:
    from pxe import config

    path = config.locate(site_config or None)
    try:
        with open(path, "rb") as fh:
            api = tomllib.load(fh).get("api", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None, ca_file
    if not isinstance(api, dict):
        return None, ca_file
    return api.get("server"), ca_file or api.get("ca_file")


class Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


class Client:
    def __init__(self, server: str, *, ca_file: str | None = None, user: str | None = None,
                 password: Callable[[], str] | None = None, timeout: float = TIMEOUT,
                 token_cache: Path | None = None):
        parsed = urllib.parse.urlsplit(server)
        if parsed.scheme != "https" or not parsed.hostname:
            raise InputError(f"--server {server!r}: expected https://HOST[:PORT] (the service "
                             "is HTTPS only)")
        self.server = f"https://{parsed.netloc}"
        self.host = parsed.hostname
        self.port = parsed.port or 443
        self.prefix = parsed.path.rstrip("/")
        self.context = ssl.create_default_context(cafile=ca_file) if ca_file else \
            ssl.create_default_context()
        self.user = user or getpass.getuser()
        self._password = password
        self.timeout = timeout
        self.token_cache = token_cache or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dynprov" / "tokens.json"
        self._token: str | None = None
        self._conn: http.client.HTTPSConnection | None = None

    # -- transport --------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPSConnection:
        if self._conn is None:
            self._conn = http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                                     timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _send(self, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None, sink: Sink | None = None) -> Response:
        conn = self._connection()
        try:
            conn.request(method, self.prefix + path, body=body, headers=headers or {})
            res = conn.getresponse()
            hdrs = {k.lower(): v for k, v in res.getheaders()}
            if sink is not None and res.status == 200:
                for chunk in iter(lambda: res.read(CHUNK), b""):
                    sink.write(chunk)
                data = b""
            else:
                data = res.read()
        except ssl.SSLCertVerificationError as exc:
            self.close()
            raise DynprovError(f"{self.server}: certificate not trusted ({exc.verify_message}); "
                               "give the CA with --ca-file or $DYNPROV_CA_FILE") from None
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise DynprovError(f"{self.server}: {exc}") from None
        if hdrs.get("connection", "").lower() == "close":
            self.close()
        return Response(res.status, hdrs, data)

    # -- login ------------------------------------------------------------------------------
    def _cache_key(self) -> str:
        return f"{self.user}@{self.server}{self.prefix}"

    def _cached_token(self) -> str | None:
        try:
            data = json.loads(self.token_cache.read_text())
            entry = data[self._cache_key()]
            if float(entry["expires"]) > time.time() + 30:
                return str(entry["token"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def _store_token(self, token: str | None, expires: float = 0) -> None:
        try:
            data = json.loads(self.token_cache.read_text())
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        now = time.time()
        data = {k: v for k, v in data.items()
                if isinstance(v, dict) and float(v.get("expires", 0)) > now}
        if token is None:
            data.pop(self._cache_key(), None)
        else:
            data[self._cache_key()] = {"token": token, "expires": expires}
        with contextlib.suppress(OSError):
            self.token_cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.token_cache.parent, prefix=".tokens.")
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.token_cache)

    def password(self) -> str:
        if self._password is not None:
            return self._password()
        env = os.environ.get("DYNPROV_PASSWORD")
        if env is not None:
            return env
        if not sys.stdin.isatty():
            raise InputError(f"no password for {self.user} at {self.server}: set "
                             "$DYNPROV_PASSWORD or run from a terminal")
        return getpass.getpass(f"{self.user}@{self.host} password: ")

    def login(self) -> dict[str, Any]:
        raw = f"{self.user}:{self.password()}".encode()
        res = self._send("POST", f"{V1}/token", headers={
            "Authorization": "Basic " + base64.b64encode(raw).decode("ascii")})
        data = self._check(res)
        self._token = data["token"]
        self._store_token(self._token, float(data["expires"]))
        return data

    def token(self) -> str:
        if self._token is None:
            self._token = self._cached_token()
        if self._token is None:
            self.login()
        assert self._token is not None
        return self._token

    # -- requests ---------------------------------------------------------------------------
    def request(self, method: str, path: str, *, body: Any = None, json_body: Any = None,
                headers: dict[str, str] | None = None, sink: Sink | None = None,
                retry: bool = True) -> Response:
        hdrs = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        hdrs["Authorization"] = f"Bearer {self.token()}"
        res = self._send(method, path, body, hdrs, sink)
        if res.status == 401 and retry and not callable(getattr(body, "read", None)) \
                and not isinstance(body, Iterator):
            self._token = None
            self._store_token(None)
            return self.request(method, path, body=body, headers=headers, sink=sink,
                                retry=False)
        return res

    def _check(self, res: Response) -> Any:
        if 200 <= res.status < 300:
            return res.json() if res.body else None
        try:
            reason = str(res.json().get("error"))
        except (ValueError, AttributeError):
            reason = res.body.decode("utf-8", "replace").strip() or f"HTTP {res.status}"
        text = f"{self.server}: {reason}"
        if res.status in (401, 403, 429):
            raise PermissionDenied(text)
        if res.status == 404:
            raise NotFound(text)
        if res.status in (400, 413, 415):
            raise InputError(text)
        raise DynprovError(text)

    def get(self, path: str, **query: Any) -> Any:
        q = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None},
                                   doseq=True)
        return self._check(self.request("GET", path + (f"?{q}" if q else "")))

    def post(self, path: str, data: Any) -> Any:
        return self._check(self.request("POST", path, json_body=data))

    def delete(self, path: str, **query: Any) -> Any:
        q = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        return self._check(self.request("DELETE", path + (f"?{q}" if q else "")))

    # -- files ------------------------------------------------------------------------------
    def upload(self, source: Path, label: str, groups: list[str] | tuple[str, ...] = (),
               progress: IO[str] | None = None) -> Any:
        """Stream ``source`` as image ``label``; a progress bar on ``progress`` if given
        (default: stderr when it is a terminal)."""
        if progress is None and sys.stderr.isatty():
            progress = sys.stderr
        try:
            fh = open(source, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise InputError(f"{source}: no such file") from None
        except OSError as exc:
            raise InputError(f"{source}: {exc.strerror or exc}") from None
        with fh:
            size = os.fstat(fh.fileno()).st_size
            bar = Progress(progress, f"upload {Path(source).name}", size)
            q = urllib.parse.urlencode([("group", g) for g in groups])
            path = f"{V1}/images/{urllib.parse.quote(label, safe='')}" + (f"?{q}" if q else "")
            self.token()  # log in before streaming: the body cannot be sent twice

            def chunks() -> Iterator[bytes]:
                for chunk in iter(lambda: fh.read(CHUNK), b""):
                    bar.update(len(chunk))
                    yield chunk

            res = self.request("PUT", path, body=chunks(), headers={
                "Content-Type": "application/octet-stream", "Content-Length": str(size)})
            bar.done()
        return self._check(res)

    def download(self, label: str, output: str, version: int | None = None) -> tuple[str, int]:
        """The bundle of ``label`` (its current version, or ``version``) to ``output``
        ('-' = stdout), checked against its sha256."""
        path = f"{V1}/images/{urllib.parse.quote(label, safe='')}/bundle"
        if version is not None:
            path += f"?version={int(version)}"
        if output == "-":
            sink = _Hashing(sys.stdout.buffer)
            res = self.request("GET", path, sink=sink)
            self._check(res)
            sys.stdout.buffer.flush()
            return self._verify(res, sink, output)
        out = Path(output)
        parent = out.parent if str(out.parent) else Path(".")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise DynprovError(f"cannot write in {parent}: permission denied or no such directory")
        from pxe import atomic

        with atomic.streamed(out) as fh:
            sink = _Hashing(fh)
            res = self.request("GET", path, sink=sink)
            self._check(res)
            return self._verify(res, sink, output)

    def _verify(self, res: Response, sink: _Hashing, output: str) -> tuple[str, int]:
        sha = sink.digest.hexdigest()
        expected = res.headers.get("x-bundle-sha256")
        if expected and sha != expected:
            raise DynprovError(f"the bundle received does not match its recorded sha256; "
                               f"{output} not written")
        return sha, sink.size


class _Hashing:
    def __init__(self, out: IO[bytes]):
        self.out = out
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.out.write(data)


class Progress:
    """A one-line progress bar: ``upload x.bundle [#####.....]  52%  13.0/25.0 MiB  8.1 MiB/s``."""

    WIDTH = 30

    def __init__(self, out: IO[str] | None, what: str, total: int):
        self.out, self.what, self.total = out, what, total
        self.sent = 0
        self.start = time.monotonic()
        self.shown = 0.0

    def update(self, n: int) -> None:
        self.sent += n
        now = time.monotonic()
        if self.out is not None and (now - self.shown >= 0.2 or self.sent >= self.total):
            self.shown = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        assert self.out is not None
        part = self.sent / self.total if self.total else 1.0
        filled = int(part * self.WIDTH)
        rate = self.sent / max(now - self.start, 1e-6) / (1 << 20)
        self.out.write(f"\r{self.what} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                       f"{part * 100:3.0f}%  {self.sent / (1 << 20):.1f}/"
                       f"{self.total / (1 << 20):.1f} MiB  {rate:.1f} MiB/s")
        self.out.flush()

    def done(self) -> None:
        if self.out is not None:
            self._draw(time.monotonic())
            self.out.write("\n")
            self.out.flush()


# -- the commands' remote faces -----------------------------------------------------------------
SERVER_HELP = ("talk to the dynprov service at URL (https://HOST:PORT) instead of local files "
               "(default: $DYNPROV_SERVER or ~/.config/dynprov/client.toml)")


def add_server_flag(parser: Any, *names: str) -> None:
    parser.add_argument(*(names or ("--server",)), dest="server", metavar="URL",
                        help=SERVER_HELP)


def for_args(args: Any) -> Client | None:
    """The client when ``--server`` (or $DYNPROV_SERVER, or the client file) says so."""
    return resolve(getattr(args, "server", None))


def nodes(client: Client, spec: str | None = None) -> list[Any]:
    """Nodes as pxe.inventory.Node objects, so the commands print them as they do locally."""
    return [_node(d) for d in _list(client.get(f"{V1}/nodes", nodes=spec), "node")]


def nodes_with_facts(client: Client, spec: str | None = None
                     ) -> tuple[list[Any], dict[str, dict[str, Any]]]:
    """Nodes and, by name, the hardware facts they reported (pxe.hwfacts), in one request."""
    data = _list(client.get(f"{V1}/nodes", nodes=spec, hardware="true"), "node")
    found = [_node(d) for d in data]
    facts = {n.name: d["hardware"] for n, d in zip(found, data, strict=True) if d.get("hardware")}
    return found, facts


def _fields(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A record class's field names and, of those, the ones without a default (a dataclass or a
    pxe.records.Record)."""
    declared = getattr(cls, "__dataclass_fields__", None)
    if declared is not None:
        import dataclasses

        names = tuple(declared)
        required = tuple(n for n, f in declared.items() if f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        return names, required
    from pxe.records import fields

    names = fields(cls)
    return names, tuple(n for n in names if not hasattr(cls, n))  # defaults are class attributes


def record(cls: type, data: Any, what: str) -> Any:
    """``cls`` built from one JSON object of the server's. Keys this client does not know are
    ignored (a newer server may add fields); a missing required one, or an answer that is not an
    object, is one clear error instead of a TypeError."""
    names, required = _fields(cls)
    fields_of(data, what, *required)
    return cls(**{k: v for k, v in data.items() if k in names})


def fields_of(data: Any, what: str, *names: str) -> dict[str, Any]:
    """One JSON object of the server's that must carry ``names`` (others are ignored)."""
    if not isinstance(data, dict):
        raise DynprovError(f"the server's {what} is not a JSON object (got "
                           f"{type(data).__name__}); client and server versions differ?")
    for name in names:
        if name not in data:
            raise DynprovError(f"the server's {what} lacks the field {name!r}; client and "
                               "server versions differ?")
    return data


def _list(data: Any, what: str) -> list[Any]:
    if not isinstance(data, list):
        raise DynprovError(f"the server's {what} list is not a JSON list; client and server "
                           "versions differ?")
    return data


def records(cls: type, data: Any, what: str) -> list[Any]:
    """A JSON list of the server's objects as ``cls`` records (see ``record``)."""
    return [record(cls, d, what) for d in _list(data, what)]


def _node(data: Any) -> Any:
    from pxe.inventory import Node
    from pxe.records import replace

    node = record(Node, data, "node")  # "hardware" (nodes_with_facts) is not a field: dropped
    return replace(node, macs=tuple(node.macs), groups=tuple(node.groups))


def images(client: Client) -> list[Any]:
    from pxe.images import Image

    return records(Image, client.get(f"{V1}/images", view="catalog"), "image")


def image(client: Client, label: str) -> Any:
    from pxe.images import Image

    return record(Image, client.get(f"{V1}/images/{urllib.parse.quote(label, safe='')}"),
                  "image")


class RemoteRepository:
    """What `fg-moab-image` uses of pxe.repository.Repository, through the service."""

    def __init__(self, client: Client):
        self.client = client

    def upload(self, source: Path, label: str | None, groups: Any = ()) -> Any:
        from types import SimpleNamespace

        if label is None:
            label = manifest_label(Path(source))
        d = fields_of(self.client.upload(Path(source), label, list(groups)), "upload answer",
                      "label", "os_name", "arch", "mode", "bundle_sha256", "bundle_bytes",
                      "customized")
        image = SimpleNamespace(label=d["label"], os_name=d["os_name"], arch=d["arch"],
                                mode=d["mode"], version=int(d.get("version") or 1))
        return SimpleNamespace(image=image, bundle_sha256=d["bundle_sha256"],
                               bundle_bytes=d["bundle_bytes"], customized=d["customized"])

    def _path(self, label: str) -> str:
        return f"{V1}/images/{urllib.parse.quote(label, safe='')}"

    def delete(self, label: str, force: bool = False, version: int | None = None) -> list[str]:
        """The image (every version), or with ``version`` one kept version."""
        path = self._path(label) + (f"/versions/{int(version)}" if version is not None else "")
        return list(self.client.delete(path, force="true" if force else None)["still_used_by"])

    def history(self, label: str) -> list[Any]:
        from pxe.imageversions import Version

        return records(Version, self.client.get(self._path(label) + "/versions"),
                       "image version")

    def rollback(self, label: str, version: int | None = None) -> tuple[int, int]:
        d = fields_of(self.client.post(self._path(label) + "/rollback",
                                       {} if version is None else {"version": int(version)}),
                      "rollback answer", "previous", "current")
        return int(d["previous"]), int(d["current"])

    def list(self) -> list[Any]:
        from pxe.repository import Entry

        return records(Entry, self.client.get(f"{V1}/images"), "image")

    def get(self, label: str, output: str, version: int | None = None) -> tuple[str, int]:
        return self.client.download(label, output, version)

    def init(self) -> tuple[str | None, Any]:
        from types import SimpleNamespace

        d = fields_of(self.client.post(f"{V1}/images/init", {}), "init answer", "boot_files",
                      "boot_changed")
        return d.get("oslist"), SimpleNamespace(boot_files=d["boot_files"],
                                                boot_changed=d["boot_changed"])


def manifest_label(bundle: Path) -> str:
    """The label in a bundle's manifest (for an upload without -label), read locally."""
    import tarfile

    from pxe.bundle import MANIFEST, MANIFEST_MAX, Manifest

    try:
        with tarfile.open(bundle, "r:*") as tf:
            for member in tf:
                if member.name == MANIFEST and member.isfile() and member.size <= MANIFEST_MAX:
                    fh = tf.extractfile(member)
                    if fh is not None:
                        return Manifest.parse(fh.read()).label
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise InputError(f"{bundle}: not a bundle ({exc})") from None
    raise InputError(f"{bundle}: no {MANIFEST}: give -label")
