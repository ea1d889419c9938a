"""Shared pieces of tools/bench_tftp.py, bench_http.py and bench_boot.py.

Network rule: everything listens on 127.0.0.1 and every client talks to 127.0.0.1. Every wait
is bounded; only the processes started here are stopped, by PID (a server's leftover children
are found by the process group it was started in).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOOPBACK = "127.0.0.1"

from lab.ports import free_port  # noqa: E402,F401 (after sys.path above; for the benches)


def make_site(root: Path, serve: dict[str, object]) -> Path:
    """A throw-away dynprov site under ``root`` with a [serve] section; returns the config."""
    from pxe import config

    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    lines = ["", "[serve]"]
    for key, value in serve.items():
        text = (str(value).lower() if isinstance(value, bool)
                else f'"{value}"' if isinstance(value, str) else str(value))
        lines.append(f"{key} = {text}")
    path = root / "dynprov.toml"
    path.write_text(config.example(root) + "\n".join(lines) + "\n")
    for sub in ("tftp", "http", "state"):
        (root / sub).mkdir(exist_ok=True)
        os.chmod(root / sub, 0o755)
    return path


def run_in_workdir(prefix: str, bench: Callable[[Path, Any], int], args: Any,
                   keep: bool = False) -> int:
    """bench(work_dir, args) in a fresh temp dir (world-readable: tftpd-hpa and nginx run as
    other users), removed afterwards unless ``keep``."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(work, 0o755)
    try:
        return bench(work, args)
    finally:
        if keep:
            print(f"work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def serve_argv(config_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pxe.cli.main", "--config", str(config_path), "serve", *extra]


def group_stats(pgid: int) -> Iterator[tuple[int, list[str]]]:
    """(pid, /proc/PID/stat fields after the command name) of each live process in the group."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields[2] is the process group
            yield int(entry), fields


def _group_members(pgid: int) -> list[int]:
    return [pid for pid, _ in group_stats(pgid) if pid != pgid]


@contextlib.contextmanager
def server(argv: Sequence[str], log: Path, cwd: Path | None = None) -> Iterator[int]:
    """Run a server in its own process group; on exit stop it and what it forked, by PID.

    Not a new session: with the kernel's autogroup scheduling a session is a CPU group of its
    own, which would give the servers and the clients different shares of the 2 cores.
    """
    with open(log, "ab") as fh:
        proc = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT,
                                process_group=0, cwd=cwd, env={**os.environ,
                                "PYTHONPATH": str(ROOT)})
    try:
        yield proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for pid in _group_members(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def wait_until(check, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")


def curl_ok(url: str, *args: str) -> bool:
    proc = subprocess.run(["curl", "-s", "-S", "--max-time", "5", "-o", "/dev/null", *args, url],
                          capture_output=True, timeout=10)
    return proc.returncode == 0


def parallel(argvs: Sequence[Sequence[str]], timeout: float = 900) -> tuple[float, list[str]]:
    """Start every command at once; (wall seconds, each command's stdout or 'FAILED ...')."""
    start = time.monotonic()
    procs = [subprocess.Popen(list(a), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for a in argvs]
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
            stderr = "timed out " + stderr
        out.append(stdout if p.returncode == 0 else f"FAILED rc={p.returncode} {stderr.strip()}")
    return time.monotonic() - start, out


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
            for r in cells]
    return "\n".join([line, rule, *body])


def load_note() -> str:
    with contextlib.suppress(OSError):
        return "load average " + open("/proc/loadavg").read().split()[0]
    return ""


def spread(values: Sequence[float]) -> str:
    """min-max of the repeats, for the report next to the median."""
    return f"{min(values):.4g}-{max(values):.4g}" if values else "-"


def result(fields: dict[str, object], as_json: bool = False) -> None:
    """Print the benchmark's last line: `RESULT key=value ...` (with --json, a JSON line
    before it). Every tools/bench_*.py ends with this line; tools/bench_readme.py reads it."""
    import json

    fields = {"load": load_average(), **fields}
    if as_json:
        print(json.dumps(fields, sort_keys=True))
    text = " ".join(f"{k}={_plain(v)}" for k, v in fields.items())
    print(f"RESULT {text}", flush=True)


def _plain(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace(" ", "_")


def load_average() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return float(open("/proc/loadavg").read().split()[0])
    return float("nan")
