"""One action on many nodes: a result per node, failures named, no node stopping another.

- Nodes are checked first (driver ``validate()``), then secrets are resolved; an unsafe secrets
  file refuses the whole call before any node is touched.
- IPMI nodes go to the IPMI driver's event loop (``power.ipmi_sessions`` sessions in flight at once,
  each with its own timeout and retries), in a thread of its own.
- Every other node runs on a pool of ``workers`` threads (default 64): one node at a time per
  thread, ``timeout`` per attempt, ``retries`` more attempts after a timeout or an unreachable BMC.
- The whole call is bounded: a node that is still running when the call's time limit is reached
  gets a "timeout" result; the daemon thread left behind cannot keep the process alive, and the
  call's ``cancelled`` flag (checked by the drivers before every step that changes a node, and by
  the IPMI event loop) keeps it from acting on a node after the call has answered for it.
So 500 dead BMCs cost about one timeout times (retries + 1), not 500 of them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from pxe.config import Config
from pxe.errors import DynprovError, InputError
from pxe.inventory import Node
from pxe.power import settings as power_settings
from pxe.power.base import ACTIONS, POWER_STATES, Job, PowerError, PowerResult, boot_action
from pxe.power.secrets import SecretError, SecretStore
from pxe.power.settings import Settings

log = logging.getLogger("pxe.power")
NEEDS_SECRET = ("ipmi", "redfish")


def drivers() -> dict[str, Any]:
    from pxe.power.ipmi import IpmiDriver
    from pxe.power.manual import ManualDriver
    from pxe.power.redfish import RedfishDriver
    from pxe.power.wol import WolDriver

    return {"ipmi": IpmiDriver(), "redfish": RedfishDriver(), "wol": WolDriver(),
            "none": ManualDriver()}


def resolve_nodes(cfg: Config, nodes: str | Iterable[Node]) -> list[Node]:
    """Nodes from a node set string (every unknown name refused at once) or Node objects."""
    if isinstance(nodes, str):
        from pxe.inventory import Inventory

        return Inventory(cfg).select(nodes)
    out: dict[str, Node] = {}
    for node in nodes:
        if not isinstance(node, Node):
            raise InputError(f"pxe.power.run: expected Node objects or a node set, got "
                             f"{type(node).__name__}")
        out.setdefault(node.name, node)
    return list(out.values())


def perform(driver: Any, job: Job, action: str, s: Settings) -> str:
    """One attempt of ``action`` through a per-node driver."""
    if action == "status":
        return str(driver.get_power_state(job, s))
    if action in POWER_STATES:
        return str(driver.set_power_state(job, action, s))
    if action == "netboot":
        return str(driver.netboot(job, s))
    boot = boot_action(action)
    assert boot is not None
    return str(driver.set_next_boot(job, boot[0], boot[1], s))


def attempt_all(driver: Any, job: Job, action: str, s: Settings) -> PowerResult:
    """``perform`` with retries for retryable failures; every exception becomes a result."""
    backoff = min(max(s.timeout / 4, 0.05), 1.0)
    name = job.node.name
    for attempt in range(s.retries + 1):
        try:
            job.go_ahead(action)
            return PowerResult(name, True, value=perform(driver, job, action, s))
        except PowerError as exc:
            if exc.retryable and attempt < s.retries:
                time.sleep(backoff)
                continue
            tries = f" ({attempt + 1} attempts)" if attempt else ""
            return PowerResult(name, False, error=f"{exc}{tries}", kind=exc.kind)
        except DynprovError as exc:
            return PowerResult(name, False, error=str(exc), kind="error")
        except Exception as exc:  # a driver bug must not stop the other nodes
            log.debug("power %s on %s", action, name, exc_info=True)
            return PowerResult(name, False, error=f"{type(exc).__name__}: {exc}", kind="error")
    raise AssertionError("unreachable")


def run(cfg: Config, nodes: str | Iterable[Node], action: str, *, workers: int | None = None,
        timeout: float | None = None, retries: int | None = None,
        progress: Callable[[PowerResult], None] | None = None,
        time_limit: float | None = None) -> dict[str, PowerResult]:
    """``action`` on every node; a result per node. ``time_limit`` (s) replaces the call's
    computed bound (see the module's notes), e.g. a caller's own deadline."""
    if action not in ACTIONS:
        raise InputError(f"unknown power action {action!r} (expected one of {', '.join(ACTIONS)})")
    s = power_settings.load(cfg).with_overrides(workers=workers, timeout=timeout, retries=retries)
    node_list = resolve_nodes(cfg, nodes)
    table = drivers()
    results: dict[str, PowerResult] = {}
    lock = threading.Lock()
    cancelled = threading.Event()

    def done(result: PowerResult) -> None:
        with lock:
            if result.node in results:
                return
            results[result.node] = result
        if not result.ok:
            log.debug("%s %s: %s (%s)", action, result.node, result.error, result.kind)
        if progress is not None:
            progress(result)

    # 1. check every node, 2. resolve secrets (an unsafe file stops everything here).
    ready: list[tuple[Node, Any]] = []
    for node in node_list:
        driver = table.get(node.bmc_type)
        if driver is None:
            done(PowerResult(node.name, False, kind="error",
                             error=f"unknown bmc_type {node.bmc_type!r}"))
            continue
        problems = driver.validate(node, s)
        if problems:
            done(PowerResult(node.name, False, kind="error", error="; ".join(problems)))
            continue
        if action == "status" and node.bmc_type == "wol":
            done(_wol_status(cfg, s, node.name))  # no BMC: what the node's agent last said
            continue
        ready.append((node, driver))
    store = SecretStore(cfg.paths.secrets_file)
    jobs: list[tuple[Job, Any]] = []
    failed_secrets: list[PowerResult] = []
    for node, driver in ready:
        secret = None
        if node.bmc_type in NEEDS_SECRET:
            try:
                secret = store.lookup(node.bmc_secret)
            except SecretError as exc:
                if exc.fatal:
                    raise
                failed_secrets.append(PowerResult(node.name, False, kind="auth", error=str(exc)))
                continue
        jobs.append((Job(node, secret, cancelled), driver))
    for result in failed_secrets:
        done(result)

    # 3. act: IPMI in one event loop, the rest on the worker pool, side by side.
    batch = [job for job, driver in jobs if hasattr(driver, "run_many")]
    single = [(job, driver) for job, driver in jobs if not hasattr(driver, "run_many")]
    threads: list[threading.Thread] = []
    if batch:
        ipmi = table["ipmi"]

        def run_batch() -> None:
            try:
                ipmi.run_many(batch, action, s, done, cancelled=cancelled)
            except Exception as exc:  # never leave IPMI nodes without a result
                log.debug("IPMI fan-out failed", exc_info=True)
                for job in batch:
                    done(PowerResult(job.node.name, False, kind="error",
                                     error=f"IPMI fan-out failed: {type(exc).__name__}: {exc}"))

        threads.append(threading.Thread(target=run_batch, name="power-ipmi", daemon=True))
    work: queue.Queue[tuple[Job, Any]] = queue.Queue()
    for item in single:
        work.put(item)

    def worker() -> None:
        for _ in range(len(single)):  # bounded by the number of jobs
            if cancelled.is_set():
                return
            try:
                job, driver = work.get_nowait()
            except queue.Empty:
                return
            done(attempt_all(driver, job, action, s))

    for i in range(min(s.workers, len(single))):
        threads.append(threading.Thread(target=worker, name=f"power-{i}", daemon=True))
    for t in threads:
        t.start()
    # Generous bound for the whole call; a Redfish attempt is a few HTTP requests of `timeout`,
    # the IPMI engine bounds itself (rounds of ipmi_sessions) and is given the same slack.
    rounds = -(-len(single) // s.workers) + 1
    ipmi_rounds = -(-len(batch) // s.ipmi_sessions) + 1
    bound = max(rounds * (4 * s.timeout + 1), ipmi_rounds * (s.timeout + 1)) * (s.retries + 2) + 10
    limit = time.monotonic() + (bound if time_limit is None else max(0.0, time_limit))
    for t in threads:
        t.join(max(0.0, limit - time.monotonic()))
    cancelled.set()  # a thread still running must not act on a node from now on
    for node in node_list:
        if node.name not in results:
            done(PowerResult(node.name, False, kind="timeout",
                             error="no result within the call's time limit"))
    with lock:
        return {node.name: results[node.name] for node in node_list}


def check(cfg: Config, nodes: str | Iterable[Node]) -> dict[str, list[str]]:
    """Per node, what would stop a power action (driver problems, missing secret); [] = ready.

    Touches no BMC. An unsafe secrets file is a problem of every node that needs a secret."""
    s = power_settings.load(cfg)
    table = drivers()
    store = SecretStore(cfg.paths.secrets_file)
    out: dict[str, list[str]] = {}
    for node in resolve_nodes(cfg, nodes):
        driver = table.get(node.bmc_type)
        if driver is None:
            out[node.name] = [f"unknown bmc_type {node.bmc_type!r}"]
            continue
        problems = list(driver.validate(node, s))
        if node.bmc_type in NEEDS_SECRET:
            try:
                store.lookup(node.bmc_secret)
            except SecretError as exc:
                problems.append(str(exc))
        if node.bmc_type == "none":
            problems.append("no BMC: power is manual")
        out[node.name] = problems
    return out


def _wol_status(cfg: Config, s: Any, name: str) -> PowerResult:
    """A Wake-on-LAN node has no BMC to ask: it is "on" while its image's agent keeps polling
    (within ``power.agent_stale``); otherwise nobody knows, and the answer says so."""
    from pxe import db
    from pxe.power import agent

    conn = db.connect(cfg.database)
    try:
        age = agent.heartbeat_age(conn, name)
    finally:
        conn.close()
    if age is not None and age <= s.agent_stale:
        return PowerResult(name, True, value="on")
    heard = "no agent has polled since its last boot" if age is None else \
        f"its agent was last heard {age:.0f} s ago"
    return PowerResult(name, False, kind="unsupported",
                       error=f"Wake-on-LAN cannot read the power state (no BMC) and {heard}")
