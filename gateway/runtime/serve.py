"""`gateway serve`: one replica's process, or a parent supervising N worker processes.

One process: embedded Redis if configured, the replica's subscriber, the proxy
and admin listeners, until SIGTERM/SIGINT. With `--workers N` the parent starts
the embedded Redis (if any), then N copies of itself with `--worker`, which
share both ports through SO_REUSEPORT and each keep their own cache,
subscription and live-replica registration; the parent forwards SIGTERM/SIGINT
and restarts a worker that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any, cast

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from gateway import config as config_mod
from gateway.admin.api import Persistence
from gateway.config import Config
from gateway.keytable.store import as_text
from gateway.runtime.connect import RedisTarget
from gateway.runtime.embedded import EmbeddedRedis
from gateway.runtime.replica import Replica, build

log = logging.getLogger("gateway")


def redis_client(url: str) -> Redis:
    """The command client for one Redis address (tests and tools; `serve` uses RedisTarget)."""
    return RedisTarget(url=url).command_client()


def listen_client(url: str) -> Redis:
    """The subscription's own client for one address: no retries (coherence/subscriber.py)."""
    return RedisTarget(url=url).listen_client()


@contextlib.asynccontextmanager
async def embedded_or_external(config: Config) -> AsyncIterator[RedisTarget]:
    """Where the replica's Redis is: redis.url, redis.sentinel, or an embedded one started here."""
    if not config.redis.embedded:
        target = RedisTarget.of(config.redis, config.redis.url)
        try:
            yield target
        finally:
            await target.aclose()
        return
    embedded = EmbeddedRedis(config.redis.data_dir)
    url = await embedded.start()
    try:
        yield RedisTarget.of(config.redis, url)
    finally:
        await embedded.stop()


# Each startup look at Redis (persistence, topology) waits this long at most: a Redis that does not
# answer (no sentinel does, or a master that hangs) must not keep the listeners closed (redis-py
# retries a refused connection with a backoff of several seconds).
STARTUP_CHECK_SECONDS = 2.0
TOPOLOGY_REFRESH_SECONDS = 5.0  # how stale the reported topology may be


async def check_topology(
    redis: Redis, config: Config, persistence: Persistence, *, quiet: bool = False
) -> dict[str, Any]:
    """Role and replicas (INFO replication), logged unless `quiet`, with a warning when an
    acknowledged change could be lost: no replica must acknowledge it and Redis does not write an AOF."""
    wanted = config.redis.min_replicas_acked
    mode = "embedded" if config.redis.embedded else "sentinel" if config.redis.sentinel else "single"
    topology: dict[str, Any] = {"mode": mode, "min_replicas_acked": wanted}
    try:
        info = await asyncio.wait_for(redis.info("replication"), STARTUP_CHECK_SECONDS)
    except (RedisError, OSError, TimeoutError):
        info = {}
    topology["role"] = str(info.get("role", "unknown"))
    replicas = info.get("connected_slaves")
    topology["replicas"] = int(replicas) if isinstance(replicas, int) else None
    if not quiet:
        log.info("redis topology: %s, role %s, %s replica(s) connected, changes wait for %d",
                 mode, topology["role"], topology["replicas"], wanted, extra={"redis_topology": topology})  # fmt: skip
    if wanted == 0 and persistence != "aof":
        aof = "Redis writes no AOF" if persistence == "off" else "Redis's AOF could not be checked"
        topology["warning"] = (
            f"an acknowledged change can be lost: {aof} and redis.min_replicas_acked is 0 "
            "(a restart or failover forgets the latest changes)"
        )
    elif wanted == 0 and mode == "sentinel":  # AOF does not help: the promoted replica never had it
        topology["warning"] = (
            "an acknowledged change can be lost in a failover: redis.min_replicas_acked is 0, so a change the "
            "master had not yet passed to a replica is gone once Sentinel promotes one (AOF does not help)"
        )
    elif isinstance(topology["replicas"], int) and topology["replicas"] < wanted:
        topology["warning"] = (
            f"{topology['replicas']} Redis replica(s) connected, fewer than redis.min_replicas_acked ({wanted}): "
            "every change will answer 503 until enough replicas are in sync"
        )
    if "warning" in topology and not quiet:
        log.warning("redis: %s", topology["warning"])
    return topology


async def follow_topology(replica: Replica, redis: Redis, config: Config) -> None:
    """The topology /readyz and /v1/status report, again every few seconds: a replica lost (or
    back) or a failover changes what a change waits for. Logged when it changes."""
    while True:
        await asyncio.sleep(TOPOLOGY_REFRESH_SECONDS)
        topology = await check_topology(redis, config, replica.api.persistence, quiet=True)
        if topology == replica.api.topology:
            continue
        log.info("redis topology now: role %s, %s replica(s) connected", topology["role"], topology["replicas"],
                 extra={"redis_topology": topology})  # fmt: skip
        if "warning" in topology and topology["warning"] != replica.api.topology.get("warning"):
            log.warning("redis: %s", topology["warning"])
        replica.api.topology = topology


async def check_persistence(redis: Redis, config: Config | None = None) -> Persistence:
    """'aof', 'off' or 'unknown' (CONFIG refused, as managed Redis often does, or no answer); logged."""
    try:
        reply = await asyncio.wait_for(redis.config_get("appendonly"), STARTUP_CHECK_SECONDS)
    except ResponseError:
        log.info("redis persistence cannot be checked (CONFIG GET not allowed); make sure AOF is on")
        return "unknown"
    except (RedisError, OSError, TimeoutError) as exc:
        _no_answer(exc, config)
        return "unknown"
    settings = {as_text(k): as_text(v) for k, v in cast(dict[Any, Any], reply).items()}
    value = settings.get("appendonly")
    if value == "yes":
        return "aof"
    log.warning(
        "redis persistence is off (appendonly no): a disable acknowledged by the admin API "
        "can be lost if Redis restarts; turn on appendonly with appendfsync always or everysec"
    )
    return "off"


def _no_answer(exc: BaseException, config: Config | None) -> None:
    """Why Redis did not answer at startup, for the operator: the error's type only (its text may
    name an address from a URL that holds a password) and the settings to look at."""
    sentinel = config.redis.sentinel if config is not None else None
    where = (
        "redis.url and redis.password"
        if sentinel is None
        else f"redis.sentinel (master_name {sentinel.master_name!r}, the sentinels' addresses, the passwords)"
    )
    log.error(
        "redis does not answer at startup (%s): readiness and every key answer 503 until it does; check %s",
        type(exc).__name__, where,
    )  # fmt: skip


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def serve(
    config: Config,
    *,
    config_path: str | None = None,
    reuse_port: bool = False,
    stop: asyncio.Event | None = None,
) -> None:
    """Until SIGTERM/SIGINT (or `stop`): then drain, and close. SIGHUP reloads routes from `config_path`."""
    stop = stop or asyncio.Event()
    _stop_on_signals(stop)
    if config_path is not None:  # until the replica is up, a SIGHUP must not kill the process
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, log.info, "SIGHUP before start: ignored")
    async with embedded_or_external(config) as target:
        log.info("redis: %s", target.describe())
        redis, listener = target.command_client(), target.listen_client()
        writer = target.writer_client() if config.redis.min_replicas_acked > 0 else None
        try:
            await _serve_replica(config, config_path, redis, listener, reuse_port, stop, writer)
        finally:
            if writer is not None:
                await writer.aclose()
            await listener.aclose()
            await redis.aclose()


def reload_routes(replica: Replica, config_path: str) -> bool:
    """SIGHUP: re-read the file; apply its routes, or keep the old ones and log every problem."""
    try:
        new = config_mod.load(config_path, os.environ)
    except config_mod.ConfigError as exc:
        replica.metrics.reloads.labels("rejected").inc()
        log.error("config reload rejected: %d problem(s); the running routes stay", len(exc.problems))
        for problem in exc.problems:
            log.error("config reload: %s", problem.format(exc.source))
        return False
    needs_restart = replica.reload_routes(new)
    replica.metrics.reloads.labels("applied").inc()
    log.info("config reloaded: %d route(s)", len(new.routes), extra={"routes": [r.name for r in new.routes]})
    if needs_restart:
        log.warning("config reload: changes to %s take effect only on restart", ", ".join(needs_restart))
    return True


async def _serve_replica(
    config: Config,
    config_path: str | None,
    redis: Redis,
    listener: Redis,
    reuse_port: bool,
    stop: asyncio.Event,
    writer: Redis | None = None,
) -> None:
    replica = build(config, redis, listener, writer=writer)
    replica.api.persistence = await check_persistence(redis, config)
    log.info("redis persistence: %s", replica.api.persistence)
    replica.api.topology = await check_topology(redis, config, replica.api.persistence)
    drain = config.lifecycle.drain_seconds
    # The proxy's shutdown: stop accepting, close idle keep-alive connections, let
    # in-flight requests finish for up to `drain` seconds, then close the upstream pool.
    proxy = replica.proxy_server
    listeners = [proxy] + ([replica.verify_server] if replica.verify_server is not None else [])
    admin = web.AppRunner(replica.admin_app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await admin.setup()
    loop = asyncio.get_running_loop()
    if config_path is not None:
        loop.add_signal_handler(signal.SIGHUP, reload_routes, replica, config_path)
    drained = False
    topology: asyncio.Task[None] | None = None
    try:
        async with replica.running():
            await web.TCPSite(admin, config.admin.listen.host, config.admin.listen.port, reuse_port=reuse_port).start()
            try:
                await proxy.start(config.listen.host, config.listen.port, reuse_port=reuse_port)
                if replica.verify_server is not None and config.verify is not None:
                    listen = config.verify.listen
                    await replica.verify_server.start(listen.host, listen.port, reuse_port=reuse_port)
                _log_start(config, replica)
                topology = asyncio.get_running_loop().create_task(follow_topology(replica, redis, config))
                await stop.wait()
            finally:
                if topology is not None:
                    topology.cancel()
                # Still subscribed while draining: a disable during the drain applies to
                # requests that arrive on connections that are still open.
                replica.api.draining = True
                inflight = sum(gate.inflight for gate in (replica.proxy, replica.verifier) if gate is not None)
                log.info("gateway stopping: draining %d in-flight request(s) for up to %gs", inflight, drain)
                drained = True
                await asyncio.gather(*(server.shutdown(drain) for server in listeners))
                log.info("proxy drained; closing the subscription, Redis and the admin listener")
    finally:
        if config_path is not None:
            loop.add_signal_handler(signal.SIGHUP, log.info, "SIGHUP while stopping: ignored")
        if not drained:
            for server in listeners:
                await server.shutdown(0)
        await admin.cleanup()


def _log_start(config: Config, replica: Replica) -> None:
    mode = "embedded" if config.redis.embedded else "sentinel" if config.redis.sentinel else "external"
    log.info(
        "gateway listening: proxy %s:%d, admin %s:%d, %d route(s), redis %s, replica %s, event loop %s",
        config.listen.host, config.listen.port, config.admin.listen.host, config.admin.listen.port,
        len(config.routes), mode, replica.replica_id, type(asyncio.get_running_loop()).__module__.split(".")[0],
        extra={"redis_mode": mode, "replica": replica.replica_id, "pid": os.getpid()},
    )  # fmt: skip
    if config.verify is not None:
        log.info("verify listener: %s:%d", config.verify.listen.host, config.verify.listen.port)
    for route in config.routes:
        log.info(
            "route %s: %s -> %s (auth %s)", route.name, route.path_prefix,
            route.upstream if route.mode == "proxy" else "verify", route.auth, extra={"route": route.name},
        )  # fmt: skip


async def supervise_workers(config: Config, config_path: str, workers: int, log_args: list[str]) -> int:
    """The parent of `--workers N`: embedded Redis if any, N workers, signals forwarded (SIGHUP too)."""
    stop = asyncio.Event()
    _stop_on_signals(stop)
    procs: list[asyncio.subprocess.Process] = []

    def forward_hangup() -> None:
        log.info("SIGHUP: asking %d worker(s) to reload their routes", len(procs))
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGHUP)

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, forward_hangup)
    async with embedded_or_external(config) as target:
        # The workers find an embedded Redis by its URL; any other they find as the config says.
        env = dict(os.environ)
        if config.redis.embedded and target.url is not None:
            env["GATEWAY_REDIS_URL"] = target.url
        argv = [sys.executable, "-m", "gateway", "serve", "--config", config_path, "--worker", *log_args]

        async def start(index: int) -> asyncio.subprocess.Process:
            proc = await asyncio.create_subprocess_exec(*argv, env=env)
            log.info("worker %d started (pid %d)", index, proc.pid)
            return proc

        for i in range(workers):
            procs.append(await start(i))
        log.info("supervising %d workers on proxy port %d and admin port %d", workers, config.listen.port,
                 config.admin.listen.port)  # fmt: skip
        while not stop.is_set():
            waits = {asyncio.ensure_future(p.wait()): i for i, p in enumerate(procs)}
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait([*waits, stopper], return_when=asyncio.FIRST_COMPLETED)
            for fut in waits:
                fut.cancel()
            stopper.cancel()
            if stop.is_set():
                break
            for fut in done:
                if fut in waits:
                    index = waits[fut]
                    log.error("worker %d exited with status %s; restarting", index, procs[index].returncode)
                    await asyncio.sleep(0.5)
                    procs[index] = await start(index)
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), config.lifecycle.drain_seconds + 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.info("all workers stopped")
        return 0
