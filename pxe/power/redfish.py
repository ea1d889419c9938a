"""Redfish through sushy: power actions and a one-time PXE boot override.

The node's BMC is ``{redfish_scheme}://bmc_address[:bmc_port]/redfish/v1``; its system is the member
of ``/Systems`` whose Id is the node name, else the only member (one BMC per node). Basic auth
(every Redfish service must accept it over HTTPS); sushy's own retries are cut to the minimum,
so our per-node timeout and retries are what counts. sushy is imported on first use only.
"""

from __future__ import annotations

from typing import Any

from pxe.inventory import Node
from pxe.power.base import Job, PowerError, bmc_address_problems
from pxe.power.settings import Settings


def _classify(exc: Exception, node: Node) -> PowerError:
    from sushy import exceptions as sx

    where = f"Redfish BMC {node.bmc_address}"
    if isinstance(exc, sx.AccessError) or getattr(exc, "status_code", None) in (401, 403):
        return PowerError("auth", f"{where}: access denied (wrong user or password)")
    if isinstance(exc, sx.ConnectionError):
        text = str(exc)
        if "timed out" in text.lower() or "timeout" in text.lower():
            return PowerError("timeout", f"{where}: no answer in time", retryable=True)
        return PowerError("unreachable", f"{where} unreachable: connection failed", retryable=True)
    if isinstance(exc, sx.MissingActionError | sx.MissingAttributeError |
                  sx.InvalidParameterValueError):
        return PowerError("unsupported", f"{where}: {exc}")
    if isinstance(exc, sx.HTTPError):
        return PowerError("error", f"{where}: HTTP {getattr(exc, 'status_code', '?')}: "
                                   f"{getattr(exc, 'detail', '') or exc}")
    return PowerError("error", f"{where}: {type(exc).__name__}: {exc}")


class RedfishDriver:
    name = "redfish"

    def validate(self, node: Node, settings: Settings) -> list[str]:
        problems = bmc_address_problems(node)
        if not node.bmc_user:
            problems.append("no bmc_user (Redfish needs a user name)")
        return problems

    def _call(self, job: Job, settings: Settings, fn: Any) -> str:
        try:
            return fn(self._system(job, settings))
        except PowerError:
            raise
        except Exception as exc:  # sushy's and requests' errors, classified for the admin
            raise _classify(exc, job.node) from None

    def _system(self, job: Job, settings: Settings) -> Any:
        import sushy
        from sushy import auth

        node = job.node
        port = f":{node.bmc_port}" if node.bmc_port else ""
        url = f"{settings.redfish_scheme}://{node.bmc_address}{port}/redfish/v1"
        # sushy 5 retries a refused connection 3 times 2 s apart when server_side_retries is 0
        # ("0 or 3"): 1 means a single try here, and at most one quick retry of a 5xx GET.
        conn = sushy.Sushy(url, auth=auth.BasicAuth(node.bmc_user or "", job.secret or ""),
                           verify=settings.redfish_verify, server_side_retries=1,
                           server_side_retries_delay=0.1, read_timeout=settings.timeout,
                           connect_timeout=settings.timeout)
        members = conn.get_system_collection().members_identities
        mine = [m for m in members if m.rstrip("/").rsplit("/", 1)[-1] == node.name]
        if not mine and len(members) == 1:
            mine = list(members)
        if not mine:
            raise PowerError("error", f"Redfish BMC {node.bmc_address}: {len(members)} systems, "
                                      f"none with Id {node.name!r}")
        return conn.get_system(mine[0])

    # -- PowerInterface ------------------------------------------------------------------------
    def get_power_state(self, job: Job, settings: Settings) -> str:
        return self._call(job, settings, _power_state)

    def set_power_state(self, job: Job, state: str, settings: Settings) -> str:
        return self._call(job, settings, lambda system: _set_power(system, state, job))

    def netboot(self, job: Job, settings: Settings) -> str:
        def go(system: Any) -> str:
            _set_boot(system, "network", False, job.node.firmware == "uefi", job)
            return "next boot network; " + _set_power(system, "cycle", job)

        return self._call(job, settings, go)

    # -- BootInterface ---------------------------------------------------------------------------
    def set_next_boot(self, job: Job, device: str, persistent: bool, settings: Settings) -> str:
        uefi = job.node.firmware == "uefi"
        return self._call(job, settings, lambda system: _set_boot(system, device, persistent,
                                                                  uefi, job))


def _power_state(system: Any) -> str:
    import sushy

    state = system.power_state
    if state in (sushy.PowerState.ON, sushy.PowerState.POWERING_OFF):
        return "on"
    if state in (sushy.PowerState.OFF, sushy.PowerState.POWERING_ON):
        return "off"
    return str(getattr(state, "value", state)).lower()


def _set_power(system: Any, state: str, job: Job) -> str:
    import sushy

    rt = sushy.ResetType
    if state in ("cycle", "reset"):
        if _power_state(system) == "off":
            if state == "reset":
                raise PowerError("error", "reset: the node is off (reset needs a running node; "
                                          "use 'on')")
            job.go_ahead("power on")
            system.reset_system(rt.ON)
            return "on (was off)"
        allowed = system.get_allowed_reset_system_values()
        job.go_ahead(state)
        if state == "cycle" and rt.POWER_CYCLE in allowed:
            system.reset_system(rt.POWER_CYCLE)
        else:
            system.reset_system(rt.FORCE_RESTART)
        return "cycled" if state == "cycle" else "reset"
    reset = {"on": rt.ON, "off": rt.FORCE_OFF, "soft-off": rt.GRACEFUL_SHUTDOWN}[state]
    job.go_ahead(state)
    system.reset_system(reset)
    return "soft-off sent" if state == "soft-off" else state


def _set_boot(system: Any, device: str, persistent: bool, uefi: bool, job: Job) -> str:
    import sushy

    target = sushy.BootSource.PXE if device == "network" else sushy.BootSource.HDD
    enabled = (sushy.BootSourceOverrideEnabled.CONTINUOUS if persistent
               else sushy.BootSourceOverrideEnabled.ONCE)
    # Only UEFI nodes get a mode: forcing "Legacy" on a BIOS node's BMC is refused by some.
    mode = sushy.BootSourceOverrideMode.UEFI if uefi else None
    job.go_ahead(f"set boot device {device}")
    system.set_system_boot_options(target=target, enabled=enabled, mode=mode)
    return f"{device}{' (UEFI)' if uefi else ''}, {'persistent' if persistent else 'next boot only'}"
