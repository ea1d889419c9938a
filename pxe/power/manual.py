"""bmc_type "none": power by hand. Every action fails with kind "no-bmc" and tells the admin what
to do, so a fan-out names these nodes instead of pretending."""

from __future__ import annotations

from pxe.inventory import Node
from pxe.power.base import Job, PowerError
from pxe.power.settings import Settings

WHAT_TO_DO = {
    "status": "look at the node's power LED",
    "on": "press its power button",
    "off": "hold its power button (or shut it down from its console)",
    "soft-off": "shut it down from its console (or press its power button briefly)",
    "cycle": "power it off and on again by hand",
    "reset": "press its reset button",
}


def _manual(node: Node, what: str) -> PowerError:
    return PowerError("no-bmc", f"{node.name} has no BMC (bmc_type none): {what}")


class ManualDriver:
    name = "none"

    def validate(self, node: Node, settings: Settings) -> list[str]:
        return []

    def get_power_state(self, job: Job, settings: Settings) -> str:
        raise _manual(job.node, WHAT_TO_DO["status"])

    def set_power_state(self, job: Job, state: str, settings: Settings) -> str:
        raise _manual(job.node, WHAT_TO_DO[state])

    def netboot(self, job: Job, settings: Settings) -> str:
        raise _manual(job.node, "choose network boot in its firmware (e.g. F12) and power it "
                                "on, or power-cycle it")

    def set_next_boot(self, job: Job, device: str, persistent: bool, settings: Settings) -> str:
        raise _manual(job.node, f"choose {device} boot in its firmware boot menu")
