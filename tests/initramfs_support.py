"""Helpers for tests/test_initramfs*.py (no tests here): the cached kernel, a PATH of busybox
applets, running lib.sh with busybox sh, and a call-home + blob listener on 127.0.0.1."""

from __future__ import annotations

import http.server
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pxe import assets

ROOT = Path(__file__).resolve().parent.parent
SHELL_DIR = assets.initramfs()  # the checkout's initramfs/, or an installed wheel's copy
LIB = SHELL_DIR / "lib.sh"
BUSYBOX = Path("/bin/busybox")


def kernel_root() -> Path:
    """Debian's kernel package, unpacked with its modules.dep (tools/fetch-kernel caches it)."""
    out = subprocess.run([str(ROOT / "tools/fetch-kernel")], capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        pytest.skip(f"no kernel: {out.stderr.strip()}")
    return Path(out.stdout.strip())


def busybox_path(d: Path) -> Path:
    """Fill ``d`` with one symlink per busybox applet: a PATH with only what the node has."""
    if not BUSYBOX.is_file():
        pytest.skip("busybox-static not installed (tools/install-deps)")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    for applet in applets:
        (d / applet).symlink_to(BUSYBOX)
    return d


def bbsh(bbpath: Path, script: str, env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``script`` with busybox sh after sourcing lib.sh (short pauses, few retries)."""
    full = {"PATH": str(bbpath), "HOME": "/tmp", "DYNPROV_REPORT_PAUSE": "0",
            "DYNPROV_REPORT_TRIES": "2", "DYNPROV_REPORT_TIMEOUT": "5", **(env or {})}
    return subprocess.run([str(BUSYBOX), "sh", "-c", f". {LIB}\n{script}"], capture_output=True,
                          text=True, env=full, timeout=timeout)


class Listener:
    """The call-home contract on 127.0.0.1: POST /report (form) and GET of blobs."""

    def __init__(self) -> None:
        self.reports: list[dict[str, str]] = []
        self.agent_polls: list[dict[str, str]] = []  # the image's agent (POST /agent), apart
        self.content_types: list[str] = []
        self.blobs: dict[str, bytes] = {}
        self.refused_tokens = {"used-token"}
        self.hang_seconds = 0.0
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, code: int, body: bytes = b"ok") -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the timeout test)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                data = listener.blobs.get(self.path.lstrip("/"))
                self._answer(200, data) if data is not None else self._answer(404, b"no")

            def do_POST(self) -> None:  # noqa: N802
                if listener.hang_seconds:
                    time.sleep(listener.hang_seconds)  # bounded: the client's timeout is shorter
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode(),
                                             keep_blank_values=True)
                fields = {k: v[0] for k, v in form.items()}
                if self.path == "/agent":  # the booted image's agent polling: nothing to do
                    listener.agent_polls.append(fields)
                    self._answer(200, b"ok")
                    return
                listener.reports.append(fields)
                listener.content_types.append(self.headers.get("Content-Type", ""))
                if self.path != "/report" or \
                        set(fields) - {"facts"} != {"node", "token", "kind", "detail"}:
                    self._answer(400, b"bad request")
                elif fields["token"] in listener.refused_tokens:
                    self._answer(403, b"refused")
                elif fields["node"] == "nosuchnode":
                    self._answer(404, b"unknown node")
                else:
                    self._answer(200)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def cmdline_env(self, tmp: Path, **fields: str) -> dict[str, str]:
        words = {"server": self.url, "node": "n001", "image": "centos5", "mode": "stateless",
                 "token": "tok-123_ABC", **fields}
        path = tmp / "cmdline"
        path.write_text("console=ttyS0,115200 quiet " +
                        " ".join(f"dynprov.{k}={v}" for k, v in words.items()) + "\n")
        return {"DYNPROV_CMDLINE_FILE": str(path)}


@contextmanager
def running_listener() -> Iterator[Listener]:
    srv = Listener()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.server.shutdown()
        srv.server.server_close()
        srv.thread.join(timeout=10)
