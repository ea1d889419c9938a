"""`fg-moab`: the Moab side of the site - provisioning mode, moab.cfg lines, job-end marks.

    fg-moab -mode                  print the mode (perjob or ondemand)
    fg-moab -mode perjob|ondemand  set it
    fg-moab -config                print the moab.cfg lines for this site
    fg-moab -install FILE          merge them into FILE inside a marked block (idempotent, backup)
    fg-moab -used NODES [-job ID]  a job ended on NODES (the TORQUE epilogue calls this)

Per-job mode (the original design's Story A: a fresh image for every job). Moab is on-demand by
nature: it re-images a node only when the node's reported OS differs from the job's request, and
FORCENODEREPROVISION does not change that. So: TORQUE runs our epilogue
(contrib/torque/epilogue) on a node after each job, before the node is released; it calls
`fg-moab -used NODE`, which flags the node; while the mode is perjob, cluster-query reports a
flagged node's OS as `_used-<os>`, a label no image may have (labels start with a letter or a
digit), so it matches no request and Moab calls os-switch before the next job that asks for an OS
runs there. The node's "ready" report after its re-image clears the flag. In perjob mode
os-switch re-images every node it is given, even one already running the OS. On-demand mode (the
default) ignores the flag and re-images only nodes not already running the OS and healthy.

The run's timeout. Each node's provisioning deadline is its image's prov_seconds, capped at
PROVDURATION minus a margin (``[moab] provduration``, default 600 s, Moab's own default;
``[moab] margin``, default 60 s): our timeout must come first, so that the node shows Down with
our reason before Moab's osprovision job fails and it puts a prov-fail reservation on the node.
`fg-moab -config` prints that PROVDURATION.

Config section ``[moab]`` (all optional): provduration (s), margin (s), timeout (the RM TIMEOUT
Moab waits for each of our commands, s, minimum 3), tools_dir (where os-switch, cluster-query and
node-power are installed; default: beside this command, else found on PATH).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pxe.config import Config
from pxe.errors import DynprovError, InputError
from pxe.sections import SAFE_PATH as _SAFE_PATH
from pxe.sections import Section

PROG = "fg-moab"
BEGIN = "# BEGIN dynprov (fg-moab -install): generated; edits inside this block are replaced"
END = "# END dynprov"
COMMANDS = ("os-switch", "cluster-query", "node-power")
# moab.cfg keys we own: a line setting one of these outside our block is worth a warning.
_OURS = re.compile(r"^\s*(RMCFG\[prov\]|QOSCFG\[prov\]|AGGREGATENODEACTIONS\b)", re.IGNORECASE)
# Left by xCAT's Moab integration (MSM): a second provisioning resource manager, and a default
# QOS list that our own USERCFG[DEFAULT] QLIST line replaces (Moab keeps the last one it reads).
_XCAT_MSM = re.compile(r"^\s*RMCFG\[msm\]", re.IGNORECASE)
_QLIST = re.compile(r"^\s*USERCFG\[DEFAULT\]\s+.*\bQLIST\s*=\s*(\S+)", re.IGNORECASE)


@dataclass(frozen=True)
class MoabSettings:
    provduration: int = 600
    margin: int = 60
    timeout: int = 30
    tools_dir: Path | None = None
    revert_to: str | None = None  # re-image to this label at job end (`fg-moab -used`)

    @property
    def max_run_seconds(self) -> float:
        """The longest a node may take in a run: shorter than PROVDURATION by the margin."""
        return float(max(1, self.provduration - self.margin))


def settings(cfg: Config) -> MoabSettings:
    """The ``[moab]`` section, checked key by key."""
    sec = Section(cfg, "moab", {"provduration", "margin", "timeout", "tools_dir", "revert_to"})
    values: dict[str, Any] = {}
    for key, low in (("provduration", 10), ("margin", 0), ("timeout", 3)):
        if key in sec:
            values[key] = sec.integer(key, low)
    if "tools_dir" in sec:
        values["tools_dir"] = Path(str(sec.path("tools_dir")))
    if "revert_to" in sec:
        from pxe import validate

        value = sec.raw["revert_to"]
        try:
            values["revert_to"] = validate.label(value if isinstance(value, str) else "",
                                                 "OS label")
        except InputError as exc:
            raise sec.fail("revert_to", str(exc)) from None
    result = MoabSettings(**values)
    if result.margin >= result.provduration:
        raise InputError(f"{cfg.path}: moab.margin ({result.margin}) must be smaller than "
                         f"moab.provduration ({result.provduration})")
    return result


def duration(seconds: int) -> str:
    """Moab's [[HH:]MM:]SS form."""
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _tool(ms: MoabSettings, name: str) -> str:
    candidates = []
    if ms.tools_dir:
        candidates.append(ms.tools_dir / name)
    else:
        candidates.append(Path(sys.argv[0]).resolve().parent / name)
        found = shutil.which(name)
        if found:
            candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            text = str(path.absolute())
            if not _SAFE_PATH.match(text):
                raise DynprovError(f"{text}: path with characters moab.cfg cannot carry")
            return text
    where = ms.tools_dir or "beside fg-moab or on PATH"
    raise DynprovError(f"cannot find {name} ({where}); install dynprov or set moab.tools_dir")


def config_lines(cfg: Config, conn: Any) -> list[str]:
    """The moab.cfg lines for this site (absolute paths, ENV and TIMEOUT explicit)."""
    from msm_plugin import wiki
    from pxe.pools import scheduler_pool
    from pxe.run import oslists

    ms = settings(cfg)
    conf = str(Path(cfg.path).resolve())
    if not _SAFE_PATH.match(conf):
        raise DynprovError(f"{conf}: the config path has characters moab.cfg cannot carry")
    tools = {name: _tool(ms, name) for name in COMMANDS}
    report = str(wiki.report_path(cfg.paths.state_dir))
    lines = [
        "# dynprov: the provisioning resource manager (native WIKI interface)",
        "RMCFG[prov] TYPE=NATIVE RESOURCETYPE=PROV",
        f"RMCFG[prov] PROVDURATION={duration(ms.provduration)}",
        f"RMCFG[prov] NODEMODIFYURL=exec://{tools['os-switch']}",
        f"RMCFG[prov] CLUSTERQUERYURL=exec://{tools['cluster-query']}",
        "# or, costing Moab no process (keep it fresh: cluster-query --refresh from a timer):",
        f"# RMCFG[prov] CLUSTERQUERYURL=file://{report}",
        f"RMCFG[prov] NODEPOWERURL=exec://{tools['node-power']}",
        "RMCFG[prov] FLAGS=noCreateResource",
        f"RMCFG[prov] ENV=DYNPROV_CONFIG={conf}",
        f"RMCFG[prov] TIMEOUT={ms.timeout}",
        "QOSCFG[prov] QFLAGS=PROVISION",
        "USERCFG[DEFAULT] QLIST=prov",
        "AGGREGATENODEACTIONS TRUE",
    ]
    by_arch = oslists(conn)
    rows = conn.execute("SELECT name, arch FROM nodes WHERE pool = ? ORDER BY name",
                        (scheduler_pool(cfg),)).fetchall()
    for name, arch in rows:
        if by_arch.get(arch):
            lines.append(f"NODECFG[{name}] OSLIST={','.join(by_arch[arch])}")
    return lines


# -- -install ------------------------------------------------------------------------------------
def merge(text: str, block: Sequence[str]) -> tuple[str, list[str]]:
    """``text`` with our marked block replaced (or appended); also warnings for our keys found
    outside it. Raises if the markers are damaged (nothing is written then)."""
    from pxe import sitefile

    out, outside = sitefile.splice(text, BEGIN, END, block)
    warnings = []
    msm = 0
    for ln in outside:
        if _OURS.match(ln):
            warnings.append(f"also set outside the dynprov block (Moab reads both): "
                            f"{ln.strip()}")
        elif _XCAT_MSM.match(ln):
            msm += 1
        elif (q := _QLIST.match(ln)) and q.group(1).lower() != "prov":
            warnings.append(f"{ln.strip()} is overridden by the dynprov block's "
                            f"USERCFG[DEFAULT] QLIST=prov (Moab keeps the last); to keep both, "
                            f"set QLIST={q.group(1)},prov there by hand")
    if msm:
        warnings.append(f"xCAT's MSM is configured ({msm} RMCFG[msm] line(s)): two provisioning "
                        "resource managers would both answer OS requests; comment its RMCFG[msm] "
                        "lines out (admin guide: \"Moving from xCAT's MSM\")")
    return out, warnings


def install(path: Path, block: Sequence[str]) -> tuple[bool, Path | None, list[str]]:
    """Merge the block into ``path``; returns (changed, backup path, warnings)."""
    from pxe import sitefile

    return sitefile.rewrite(path, lambda text: merge(text, block))


# -- the command ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Moab integration of dynprov: the provisioning mode (per-job re-imaging or "
                    "on-demand), the moab.cfg lines that point Moab at os-switch, cluster-query "
                    "and node-power, and the job-end mark the TORQUE epilogue sends.",
        epilog="Per-job mode: after each job TORQUE runs contrib/torque/epilogue, which calls "
               "'fg-moab -used NODE'; cluster-query then reports that node's OS as "
               "_used-<os>, which matches no request, so Moab re-images it before the next job "
               "that asks for an OS; its ready report clears the mark. The run's timeout is the "
               "image's prov_seconds capped at PROVDURATION minus [moab] margin. "
               "Exit status: 0 ok, 1 failed, 2 bad usage. "
               "Site config: --site-config, else $DYNPROV_CONFIG, else /etc/dynprov/dynprov.toml.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("-mode", "--mode", nargs="?", const="", metavar="perjob|ondemand",
                      help="print the provisioning mode, or set it")
    what.add_argument("-config", "--print-config", dest="print_config", action="store_true",
                      help="print the moab.cfg lines for this site")
    what.add_argument("-install", "--install", metavar="FILE", type=Path,
                      help="merge those lines into FILE (a moab.cfg) inside a marked block; "
                           "keeps a backup; a second run changes nothing")
    what.add_argument("-used", "--used", metavar="NODES",
                      help="mark NODES as having run a job (per-job mode re-images them)")
    p.add_argument("-job", "--job", default="", metavar="ID", help="the job id, for the log")
    p.add_argument("--site-config", metavar="FILE", help="dynprov site configuration (TOML)")
    from pxe.cli.guard import add_debug_flag

    add_debug_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from pxe.cli import guard

    return guard.run(PROG, lambda args: _run(build_parser().parse_args(args)), argv)


def _refresh(cfg: Config) -> None:
    from msm_plugin import wiki

    try:
        wiki.refresh_cfg(cfg)
    except Exception as exc:  # noqa: BLE001 - the next cluster-query rebuilds it anyway
        print(f"{PROG}: warning: cannot rewrite the node report: {exc}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from pxe import audit, authz, config, db
    from pxe import run as prun

    cfg = config.load(args.site_config)
    conn = db.connect(cfg.database)
    if args.mode is not None:
        if args.mode == "":
            print(prun.get_mode(conn))
            return 0
        mode = args.mode.lower()
        if mode not in prun.MODES:
            raise InputError(f"invalid mode {args.mode!r}: expected perjob or ondemand")
        user = authz.real_user()
        old = prun.get_mode(conn)
        prun.set_mode(conn, mode)
        audit.append(cfg.paths.state_dir, user, "moab-mode", old=old, new=mode)
        _refresh(cfg)
        print(f"mode {mode}" + ("" if old != mode else " (unchanged)"))
        return 0
    if args.print_config:
        print("\n".join(config_lines(cfg, conn)))
        return 0
    if args.install is not None:
        changed, backup, warnings = install(args.install, config_lines(cfg, conn))
        for w in warnings:
            print(f"{PROG}: warning: {args.install}: {w}", file=sys.stderr)
        if changed:
            audit.append(cfg.paths.state_dir, authz.real_user(), "moab-install",
                         file=str(args.install), backup=str(backup))
            print(f"{args.install}: dynprov block written (backup: {backup})")
        else:
            print(f"{args.install}: already up to date")
        return 0
    from pxe.nodeset import expand, fold, max_nodes

    names = expand(args.used, max_nodes(cfg))
    if args.job and not re.fullmatch(r"[A-Za-z0-9._\[\]@-]{1,128}", args.job):
        raise InputError(f"invalid job id {args.job!r}")
    prun.mark_used(conn, names, args.job)
    print(f"{fold(names)}: marked used" + (f" by job {args.job}" if args.job else ""))
    code = _revert(cfg, conn, names)
    _refresh(cfg)
    return code


def _revert(cfg: Config, conn: Any, names: list[str]) -> int:
    """``[moab] revert_to``: re-image the nodes to the site default right after the job."""
    from pxe import run as prun
    from pxe.nodeset import fold
    from pxe.pools import scheduler_pool

    ms = settings(cfg)
    if not ms.revert_to:
        return 0
    req = prun.request(cfg, conn, names, ms.revert_to, force=True,
                       max_seconds=ms.max_run_seconds, pool=scheduler_pool(cfg))
    if req.started or req.joined:
        prun.spawn_driver(cfg)
    if req.accepted:
        print(f"{fold(req.accepted)}: reverting to {ms.revert_to}")
    for refusal in req.refused:
        print(f"{PROG}: {refusal.node}: cannot revert to {ms.revert_to}: {refusal.reason}",
              file=sys.stderr)
    return 1 if req.refused else 0


if __name__ == "__main__":
    sys.exit(main())
