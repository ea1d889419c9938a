"""Free loopback port ranges for virtual BMCs (tests, benchmarks, the lab)."""

from __future__ import annotations

import random
import socket


def free_udp_base(count: int, attempts: int = 50, host: str = "127.0.0.1") -> int:
    """A base port such that base..base+count-1 are all free for UDP on ``host`` right now."""
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(20000, 60000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no free range of {count} UDP ports on {host}")


def free_port(host: str = "127.0.0.1", attempts: int = 50) -> int:
    """A port free for both UDP and TCP on ``host`` right now (a server that speaks both)."""
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
        return port
    raise RuntimeError(f"no port free for both UDP and TCP on {host}")
