"""The virtual cluster: plays the hardware only (machines, BMCs, Wake-on-LAN listeners).

- ``machine.py``: the ``Machine`` protocol every virtual node implements (power state, on, off,
  reset, boot device) and ``SimulatedMachine``, an in-memory node for the power tests.
- ``vbmc.py``: a real IPMI-over-LAN BMC (pyghmi's server-side ``Bmc``, two faults fixed) that
  drives a Machine; many per process, one UDP port each. Launched by ``python3 -m lab.vbmc``.
- ``redfish_emulator.py``: a real HTTP Redfish service (enough for sushy) driving Machines.

Nothing under ``pxe/`` imports this package (tests/test_import_graph_lab.py): it is test and demo hardware.
"""
