"""The QEMU machine: the command line that honours the boot device, and the Machine contract."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
from test_e2e_support import need_root_tools

from lab import netns
from lab.machine import Machine
from lab.qemu import QemuMachine, VmSpec, qemu_argv
from pxe.errors import InputError


def spec(tmp: Path, **kw) -> VmSpec:
    return VmSpec(name="n1", mac="52:54:00:00:00:01", tap="tap0", run_dir=tmp,
                  serial_log=tmp / "n1.log", **kw)


def device(argv: list[str], prefix: str) -> str:
    return next(argv[i + 1] for i, a in enumerate(argv) if a == "-device"
                and argv[i + 1].startswith(prefix))


@pytest.mark.unit
def test_bios_network_vs_disk(tmp_path):
    net = qemu_argv(spec(tmp_path, disk=tmp_path / "d.img"), "network")
    assert net[net.index("-boot") + 1] == "order=n"
    assert "romfile=" not in device(net, "e1000")
    disk = qemu_argv(spec(tmp_path, disk=tmp_path / "d.img"), "disk")
    assert disk[disk.index("-boot") + 1] == "order=c"
    # SeaBIOS boots the NIC's iPXE ROM even with order=c: no ROM at all for "disk".
    assert "romfile=" in device(disk, "e1000").split(",")
    assert "-enable-kvm" not in net and "-no-reboot" not in net
    assert any("append=on" in a for a in net)  # every boot stays in the serial log


@pytest.mark.unit
def test_uefi_uses_bootindex(tmp_path):
    net = qemu_argv(spec(tmp_path, firmware="uefi", disk=tmp_path / "d.img"), "network")
    assert "-boot" not in net and "-bios" in net
    assert "bootindex=1" in device(net, "e1000")
    assert "bootindex=2" in device(net, "virtio-blk")
    disk = qemu_argv(spec(tmp_path, firmware="uefi", disk=tmp_path / "d.img"), "disk")
    assert "bootindex=1" in device(disk, "virtio-blk")
    assert "bootindex" not in device(disk, "e1000")


@pytest.mark.unit
def test_in_namespace_and_bad_device(tmp_path):
    argv = qemu_argv(spec(tmp_path, netns="lab1", nic="virtio"), "network")
    assert argv[:4] == ["ip", "netns", "exec", "lab1"]
    assert device(argv, "virtio-net-pci")
    with pytest.raises(InputError):
        qemu_argv(spec(tmp_path), "floppy")


@pytest.mark.unit
def test_boot_device_once_and_persistent(tmp_path):
    m = QemuMachine(spec(tmp_path))
    assert isinstance(m, Machine)
    assert m.boot_device() == ("network", True)
    m.set_boot_device("disk")
    assert m.boot_device() == ("disk", False)
    m.set_boot_device("disk", persistent=True)
    assert m.boot_device() == ("disk", True)
    with pytest.raises(ValueError):
        m.set_boot_device("cdrom")  # type: ignore[arg-type]
    assert m.power_state() == "off"
    m.reset()  # off stays off
    assert m.power_state() == "off"


@pytest.mark.integration
def test_power_on_reset_onto_disk_and_off(tmp_path):
    need_root_tools()
    run_dir = Path(f"/tmp/dpq-{uuid.uuid4().hex[:8]}")
    ns = netns.Netns(f"dpt-{uuid.uuid4().hex[:8]}")
    events: list[tuple[str, str]] = []
    try:
        ns.create()
        ns.add_tap("tap0")
        m = QemuMachine(spec(run_dir, netns=ns.name), on_event=lambda n, e, d: events.append(
            (e, d)))
        m.power_on()
        first = m.pid
        assert m.power_state() == "on" and first
        m.reset()  # same device: a warm reset over QMP, same process
        assert m.pid == first
        m.set_boot_device("disk")
        m.reset()  # another device: the firmware must start again with it
        assert m.pid and m.pid != first
        m.power_off()
        assert m.power_state() == "off"
        assert events == [("power-on", "network"), ("reset", "network"),
                          ("power-off", ""), ("power-on", "disk"), ("power-off", "")]
        assert m.boot_device() == ("network", True)  # the one-time override was used up
    finally:
        ns.destroy()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not netns.exists(ns.name)
