"""A small real Redfish service (HTTP, JSON, Basic auth) driving Machines: enough for sushy.

One server hosts one ComputerSystem per Machine at ``/redfish/v1/Systems/<name>`` (a chassis
manager with several nodes, or one BMC per node when given one machine). Supported:
- ``GET /redfish/v1``, ``/redfish/v1/Systems``, ``/redfish/v1/Systems/<name>``;
- ``POST .../Actions/ComputerSystem.Reset`` with ResetType On, ForceOff, GracefulShutdown,
  ForceRestart, PowerCycle (a powered-off node: PowerCycle powers it on, ForceRestart is 409);
- ``PATCH .../Systems/<name>`` with ``Boot``: BootSourceOverrideTarget Pxe | Hdd | None,
  BootSourceOverrideEnabled Once | Continuous | Disabled, BootSourceOverrideMode UEFI | Legacy.
  "Once" is used up by the machine's next boot and then reads back as Disabled.
Every change is appended to ``server.events`` (what the BMC side saw) for tests.

    server = make_server({"n001": machine}, "admin", password, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start() ... server.shutdown()
"""

from __future__ import annotations

import base64
import hmac
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lab.machine import Machine

ROOT = "/redfish/v1"
TARGETS = {"Pxe": "network", "Hdd": "disk"}
RESET_TYPES = ("On", "ForceOff", "GracefulShutdown", "ForceRestart", "PowerCycle")


@dataclass
class _Override:
    enabled: str = "Disabled"
    target: str = "None"
    mode: str = "Legacy"


@dataclass
class _System:
    machine: Machine
    override: _Override = field(default_factory=_Override)
    persistent: str = "disk"  # the device to fall back to when an override is disabled


class RedfishServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, machines: Mapping[str, Machine], user: str, password: str,
                 address: str, port: int):
        self.systems = {name: _System(m, persistent=m.boot_device()[0])
                        for name, m in machines.items()}
        self.user = user
        self.password = password
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        super().__init__((address, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}{ROOT}"

    def event(self, system: str, event: str, **details: Any) -> None:
        with self.lock:
            self.events.append({"t": time.time(), "system": system, "event": event, **details})


def make_server(machines: Mapping[str, Machine], user: str, password: str, *,
                address: str = "127.0.0.1", port: int = 0) -> RedfishServer:
    """A bound server (port 0 = any free port; see ``server.url``). Call serve_forever()."""
    return RedfishServer(machines, user, password, address, port)


class _Handler(BaseHTTPRequestHandler):
    server: RedfishServer
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection frees its thread after 30 s

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read events instead
        pass

    # -- plumbing ---------------------------------------------------------------------------
    def _send(self, status: int, body: dict[str, Any] | None = None,
              headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("OData-Version", "4.0")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            # Say so: a client that pools connections (requests) would reuse this one and get
            # "Remote end closed connection without response" on its next request.
            self.send_header("Connection", "close")
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"code": "Base.1.0.GeneralError", "message": message}})

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
            if hmac.compare_digest(user.encode(), self.server.user.encode()) and \
                    hmac.compare_digest(password.encode(), self.server.password.encode()):
                return True
        self._send(401, {"error": {"code": "Base.1.0.NoValidSession",
                                   "message": "authentication required"}},
                   {"WWW-Authenticate": 'Basic realm="redfish"'})
        return False

    def _body(self) -> dict[str, Any] | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 65536:
            return None
        try:
            data = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def _system(self, path: str) -> tuple[str, _System] | None:
        name = path[len(ROOT) + len("/Systems/"):].split("/")[0]
        sys_ = self.server.systems.get(name)
        return (name, sys_) if sys_ else None

    # -- resources --------------------------------------------------------------------------
    def _system_json(self, name: str, s: _System) -> dict[str, Any]:
        device, persistent = s.machine.boot_device()
        ov = s.override
        enabled, target = ov.enabled, ov.target
        if enabled == "Once" and persistent:  # the one-time override was used by a boot
            enabled, target = "Disabled", "None"
        return {
            "@odata.type": "#ComputerSystem.v1_10_0.ComputerSystem",
            "@odata.id": f"{ROOT}/Systems/{name}", "Id": name, "Name": name,
            "SystemType": "Physical", "PowerState": s.machine.power_state().capitalize(),
            "Boot": {"BootSourceOverrideEnabled": enabled,
                     "BootSourceOverrideTarget": target,
                     "BootSourceOverrideMode": ov.mode,
                     "BootSourceOverrideTarget@Redfish.AllowableValues": ["None", "Pxe", "Hdd"]},
            "Actions": {"#ComputerSystem.Reset": {
                "target": f"{ROOT}/Systems/{name}/Actions/ComputerSystem.Reset",
                "ResetType@Redfish.AllowableValues": list(RESET_TYPES)}},
        }

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?")[0].rstrip("/")
        if path == ROOT:  # the service root needs no authentication (Redfish spec)
            self._send(200, {"@odata.type": "#ServiceRoot.v1_5_0.ServiceRoot",
                             "@odata.id": f"{ROOT}/", "Id": "RootService",
                             "Name": "dynprov Redfish emulator", "RedfishVersion": "1.6.0",
                             "UUID": "7c0e1a8e-0000-4000-8000-000000000001",
                             "Systems": {"@odata.id": f"{ROOT}/Systems"}})
            return
        if not self._authorized():
            return
        if path == f"{ROOT}/Systems":
            members = [{"@odata.id": f"{ROOT}/Systems/{n}"} for n in self.server.systems]
            self._send(200, {"@odata.type": "#ComputerSystemCollection."
                                            "ComputerSystemCollection",
                             "@odata.id": f"{ROOT}/Systems", "Name": "Computer Systems",
                             "Members@odata.count": len(members), "Members": members})
            return
        found = self._system(path)
        if found and path == f"{ROOT}/Systems/{found[0]}":
            self._send(200, self._system_json(*found))
            return
        self._error(404, f"no resource {path}")

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        path = self.path.split("?")[0].rstrip("/")
        found = self._system(path)
        if not found or not path.endswith("/Actions/ComputerSystem.Reset"):
            self._error(404, f"no action {path}")
            return
        name, s = found
        body = self._body()
        reset = (body or {}).get("ResetType")
        if reset not in RESET_TYPES:
            self._error(400, f"ResetType must be one of {', '.join(RESET_TYPES)}")
            return
        m = s.machine
        if reset == "On":
            m.power_on()
        elif reset == "ForceOff":
            m.power_off()
        elif reset == "GracefulShutdown":
            getattr(m, "shutdown", m.power_off)()
        elif reset == "ForceRestart":
            if m.power_state() == "off":
                self._error(409, "the system is off")
                return
            m.reset()
        elif reset == "PowerCycle":
            m.power_off()
            m.power_on()
        self.server.event(name, "reset", reset_type=reset, power=m.power_state())
        self._send(204)

    def do_PATCH(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        path = self.path.split("?")[0].rstrip("/")
        found = self._system(path)
        if not found or path != f"{ROOT}/Systems/{found[0]}":
            self._error(404, f"no resource {path}")
            return
        name, s = found
        body = self._body()
        boot = (body or {}).get("Boot")
        if not isinstance(boot, dict) or set(boot) - {"BootSourceOverrideTarget",
                                                      "BootSourceOverrideEnabled",
                                                      "BootSourceOverrideMode"}:
            self._error(400, "only Boot.BootSourceOverride{Target,Enabled,Mode} can be set")
            return
        ov = s.override
        target = boot.get("BootSourceOverrideTarget", ov.target)
        enabled = boot.get("BootSourceOverrideEnabled", ov.enabled if
                           "BootSourceOverrideTarget" not in boot else "Once")
        mode = boot.get("BootSourceOverrideMode", ov.mode)
        if target not in ("None", *TARGETS) or enabled not in ("Once", "Continuous", "Disabled") \
                or mode not in ("UEFI", "Legacy"):
            self._error(400, "unsupported boot override value")
            return
        s.override = _Override(enabled=enabled, target=target, mode=mode)
        if target in TARGETS and enabled != "Disabled":
            s.machine.set_boot_device(TARGETS[target],  # type: ignore[arg-type]
                                      persistent=enabled == "Continuous")
            if enabled == "Continuous":
                s.persistent = TARGETS[target]
        else:  # override off: back to the device the system boots without one
            s.machine.set_boot_device(s.persistent, persistent=True)  # type: ignore[arg-type]
        self.server.event(name, "boot", target=target, enabled=enabled, mode=mode)
        self._send(204)
