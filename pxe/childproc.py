"""A short-lived child (the DHCP daemon's config check, its reload) started with posix_spawn.

Why not subprocess: importing it (with selectors, signal handling, threading) costs ~4 ms,
a tenth of the `dhcpd -t` that `set-boot --render` is measured against, on a path that runs for
every provisioning batch. The child gets /dev/null as stdin and one pipe for stdout and stderr
(kept in the order written, the last OUTPUT_KEEP bytes), the signal dispositions Python changed
(SIGPIPE, SIGXFSZ) back to their defaults as subprocess does, and no other descriptor: Python
opens every one close-on-exec, and those this process inherited open (from a scheduler, a
shell) are closed in the child, as subprocess's close_fds does. Waiting is bounded by a
timeout, after which the child is killed and reaped; a child is never left behind.
"""

from __future__ import annotations

import os
import select
import time

OUTPUT_KEEP = 64 << 10  # what a daemon's complaint needs: its last lines
_SIGPIPE, _SIGXFSZ, _SIGKILL = 13, 25, 9  # Linux numbers (no `import signal`: its enums)


class Child:
    """``argv`` running; ``wait()`` gives (exit status, output), ``kill()`` stops it."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.pid: int | None = None
        self.returncode: int | None = None
        read_end, write_end = os.pipe()  # both close-on-exec; dup2 gives the child its own
        try:
            self.pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=[
                *((os.POSIX_SPAWN_CLOSE, fd) for fd in _inherited()),
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, write_end, 1),
                (os.POSIX_SPAWN_DUP2, write_end, 2)], setsigdef=(_SIGPIPE, _SIGXFSZ))
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self._out = read_end

    def wait(self, timeout: float) -> tuple[int, str]:
        """Exit status (negative: killed by that signal) and output, once the child ended.
        TimeoutError after ``timeout`` seconds, the child then killed and reaped."""
        if self.pid is None:
            raise RuntimeError("child already reaped")
        deadline = time.monotonic() + timeout
        chunks: list[bytes] = []
        kept = 0
        poller = select.poll()
        poller.register(self._out, select.POLLIN)
        try:
            while True:  # bounded: ends at EOF or at the deadline
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                if not poller.poll(left * 1000):
                    continue
                data = os.read(self._out, 65536)
                if not data:
                    break
                chunks.append(data)
                kept += len(data)
                while kept - len(chunks[0]) >= OUTPUT_KEEP:
                    kept -= len(chunks.pop(0))
            status = self._reap(deadline)
        except BaseException:
            self.kill()
            raise
        finally:
            self._close()
        return status, b"".join(chunks)[-OUTPUT_KEEP:].decode("utf-8", "replace")

    def _reap(self, deadline: float) -> int:
        """Wait for the exit (output closed: it is ending) until ``deadline``."""
        pid, delay = self.pid, 0.0005
        assert pid is not None
        while True:  # bounded by the deadline
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.pid = None
                self.returncode = os.waitstatus_to_exitcode(status)
                return self.returncode
            if time.monotonic() >= deadline:
                raise TimeoutError
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def kill(self) -> None:
        """Stop the child if it still runs and reap it (idempotent)."""
        pid, self.pid = self.pid, None
        if pid is not None:
            try:
                os.kill(pid, _SIGKILL)
            except ProcessLookupError:
                pass
            _, status = os.waitpid(pid, 0)  # SIGKILL cannot be ignored: this returns
            self.returncode = os.waitstatus_to_exitcode(status)
        self._close()

    def _close(self) -> None:
        out, self._out = getattr(self, "_out", None), None
        if out is not None:
            os.close(out)


def _inherited() -> list[int]:
    """Descriptors above 2 that would pass to a child: inherited by this process, not made by
    Python (~50 us: one /proc listing)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    found.append(fd)
            except OSError:  # the listing's own descriptor, closed by now
                pass
    return found
