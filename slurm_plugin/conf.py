"""slurm.conf and helpers.conf lines for this site, and merging them into marked blocks.

Features are image labels: every node of the scheduler's pool can boot every image of its
architecture, so its Feature= list is the catalog's labels for that architecture; the one
active feature is the label the node runs (the helper reads it from the booted image).
Slurm 22.05 wants one ``Feature=`` line per feature in helpers.conf (the comma form fails to
parse). A label uploaded later needs `dynprov-slurm config -install` again and
`scontrol reconfigure`.

Slurm runs Helper=, ResumeProgram= and SuspendProgram= without arguments of our choosing, so
each has its own command: dynprov-slurm-helper, -reboot, -resume, -suspend (the same code as
`dynprov-slurm helper|reboot|resume|suspend`).

Config section ``[slurm]`` (all optional): tools_dir (where the dynprov-slurm commands are
installed on the nodes and the slurmctld host; default: beside this command, else on PATH),
helper (the Helper= program; default tools_dir's dynprov-slurm-helper, else the sh fast path
contrib/slurm/dynprov-slurm-helper as installed with dynprov - never the Python one),
resume_timeout (seconds; default the longest image prov_seconds plus 60), exec_time (helper
ExecTime, s, default 10), slurm_conf (the slurm.conf the run driver's hook hands scontrol as
SLURM_CONF when it sets a failed node DOWN; default Slurm's own).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pxe.config import Config
from pxe.errors import DynprovError
from pxe.sections import SAFE_PATH, Section

BEGIN = "# BEGIN dynprov (dynprov-slurm config -install): generated; edits inside are replaced"
END = "# END dynprov"
_SAFE_PATH = SAFE_PATH
REALMEMORY_HEADROOM = 0.02  # RealMemory this far below the reported MemTotal (see below)
# slurm.conf keys we own: set outside our block too, Slurm would read both.
_OURS = re.compile(r"^\s*(NodeFeaturesPlugins|RebootProgram|ResumeProgram|SuspendProgram|"
                   r"ResumeTimeout)\s*=", re.IGNORECASE)


@dataclass(frozen=True)
class SlurmSettings:
    tools_dir: str | None = None
    helper: str | None = None
    resume_timeout: int | None = None
    exec_time: int = 10
    slurm_conf: str | None = None


def settings(cfg: Config) -> SlurmSettings:
    sec = Section(cfg, "slurm", {"tools_dir", "helper", "resume_timeout", "exec_time",
                                 "slurm_conf"})
    values: dict[str, Any] = {}
    for key, low in (("resume_timeout", 30), ("exec_time", 1)):
        if key in sec:
            values[key] = sec.integer(key, low)
    for key in ("tools_dir", "helper", "slurm_conf"):
        if key in sec:
            values[key] = sec.path(key)
    return SlurmSettings(**values)


def tool(ss: SlurmSettings, name: str) -> str:
    """Where slurmd and slurmctld find the command ``name`` (dynprov-slurm-helper ...)."""
    if ss.tools_dir:
        return str(Path(ss.tools_dir) / name)
    for candidate in (Path(sys.argv[0]).resolve().parent / name,
                      Path(shutil.which(name) or "/nonexistent")):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            text = str(candidate.absolute())
            if not _SAFE_PATH.match(text):
                raise DynprovError(f"{text}: a path slurm.conf cannot carry")
            return text
    raise DynprovError(f"cannot find {name} beside this command or on PATH; "
                       "set slurm.tools_dir")


def resume_timeout(ss: SlurmSettings, conn: Any) -> int:
    if ss.resume_timeout:
        return ss.resume_timeout
    longest = conn.execute("SELECT MAX(prov_seconds) FROM images").fetchone()[0] or 600
    return int(longest) + 60


def slurm_lines(cfg: Config, conn: Any) -> list[str]:
    from pxe import hwfacts
    from slurm_plugin import toolkit

    ss = settings(cfg)
    by_arch = toolkit.image_labels(conn)
    lines = [
        "# dynprov: node features are OS images; slurmd asks the helper (helpers.conf beside",
        "# this file) which one a node runs and to switch it before a reboot",
        "NodeFeaturesPlugins=node_features/helpers",
        f"RebootProgram={tool(ss, 'dynprov-slurm-reboot')}",
        f"ResumeTimeout={resume_timeout(ss, conn)}",
        "# power saving (takes effect with SuspendTime=...): on into the jobs' OS, off when idle",
        f"ResumeProgram={tool(ss, 'dynprov-slurm-resume')}",
        f"SuspendProgram={tool(ss, 'dynprov-slurm-suspend')}",
        "# for your NodeName lines: CPUs= and RealMemory= (MiB) as each node reported them at",
        f"# its last dynprov boot ({REALMEMORY_HEADROOM:.0%} below its MemTotal: Slurm drains a "
        "node whose",
        "# memory is below RealMemory); and the OSes it can boot, for reference only:",
        "# node_features/helpers offers every helpers.conf feature to every node",
    ]
    nodes = toolkit.scheduler_nodes(cfg, conn)
    resources = hwfacts.scheduler_resources(conn, [name for name, _ in nodes])
    for name, arch in nodes:
        words = node_resource_words(resources.get(name, {}))
        if by_arch.get(arch):
            words.append(f"Feature={','.join(by_arch[arch])}")
        if words:
            lines.append(f"# NodeName={name} {' '.join(words)}")
    return lines


def helper_program(ss: SlurmSettings) -> str:
    """The Helper= program: ``[slurm] helper``, else ``tools_dir``'s dynprov-slurm-helper, else
    the sh fast path shipped with dynprov (contrib/slurm/dynprov-slurm-helper, a few ms per call),
    never the Python console script (100+ ms): slurmd runs it at every registration."""
    if ss.helper:
        return ss.helper
    if ss.tools_dir:
        return tool(ss, "dynprov-slurm-helper")
    from pxe import assets

    path = str((assets.slurm() / "dynprov-slurm-helper").absolute())
    if not _SAFE_PATH.match(path):
        raise DynprovError(f"{path}: a path helpers.conf cannot carry; set [slurm] helper")
    return path


def slow_helper_warning(helper: str) -> str | None:
    """A warning when the Helper= program, as found on this host, is a Python script."""
    try:
        with open(helper, "rb") as fh:
            first = fh.readline(256)
    except OSError:
        return None
    if first.startswith(b"#!") and b"python" in first:
        return (f"Helper={helper} is a Python program (about 100 ms or more per call, run at "
                "every slurmd registration); the sh fast path is "
                "contrib/slurm/dynprov-slurm-helper (set [slurm] helper to its path)")
    return None


def node_resource_words(res: dict[str, int]) -> list[str]:
    """``CPUs=`` and ``RealMemory=`` for a node's NodeName line, never above what it has.

    slurmd reports CPUs (logical processors) and RealMemory (MemTotal in MiB) at registration
    and slurmctld drains a node that has less than its line says ("Low RealMemory", "Low
    CPUs"); less than it has is accepted. The facts come from the kernel that sent them, and
    each image's kernel keeps a slightly different amount of memory for itself, so RealMemory
    is rounded down by REALMEMORY_HEADROOM; the CPU count does not change with the kernel."""
    words = []
    if res.get("procs"):
        words.append(f"CPUs={int(res['procs'])}")
    if res.get("memory_mb"):
        words.append(f"RealMemory={max(1, int(res['memory_mb'] * (1 - REALMEMORY_HEADROOM)))}")
    return words


def helpers_lines(cfg: Config, conn: Any) -> list[str]:
    from slurm_plugin import toolkit

    ss = settings(cfg)
    helper = helper_program(ss)
    labels = sorted({label for labels in toolkit.image_labels(conn).values() for label in labels})
    lines = [f"ExecTime={ss.exec_time}"]
    lines += [f"Feature={label} Helper={helper}" for label in labels]
    return lines


# -- -install -------------------------------------------------------------------------------------
def merge(text: str, block: Sequence[str]) -> tuple[str, list[str]]:
    """``text`` with our marked block replaced (or appended), and warnings for our keys set
    outside it. Damaged markers raise (nothing is written then)."""
    from pxe import sitefile

    out, outside = sitefile.splice(text, BEGIN, END, block)
    warnings = [f"also set outside the dynprov block (Slurm reads both): {ln.strip()}"
                for ln in outside if _OURS.match(ln)]
    return out, warnings


def install(path: Path, block: Sequence[str], *, create: bool = False
            ) -> tuple[bool, Path | None, list[str]]:
    """Merge the block into ``path`` (atomically, after a backup); (changed, backup, warnings)."""
    from pxe import sitefile

    return sitefile.rewrite(path, lambda text: merge(text, block), create=create)
