"""`minicache-server`: run the cache server until SIGTERM or SIGINT
(`--print-config`: print the effective settings, secrets masked, and exit).

On the signal, health turns NOT_SERVING at once (load balancers stop routing), then
in-flight calls get MINICACHE_GRACE_S seconds to finish; then what lives only on the
device tier is written down to the persistent tier below it (disk or Redis), within
another MINICACHE_GRACE_S, so that the next start recovers it; then the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

from minicache_client.serving.logs import configure_logging
from minicache_client.serving.settings import SettingsError, config_json
from minicache_server.allocator import trim_periodically, tune_allocator
from minicache_server.service.server import start_server
from minicache_server.settings import build_parser, settings_from

log = logging.getLogger("minicache_server")


def work_threads(settings) -> int:
    """`settings.work_threads`, or when 0 the number of CPUs this process may run on
    (the machine's where the system cannot say: macOS has no `sched_getaffinity`)."""
    if settings.work_threads:
        return settings.work_threads
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


async def serve(settings) -> None:
    loop = asyncio.get_running_loop()
    # Every asyncio.to_thread of the server (encodes, restores, entry (de)coding) runs
    # on this pool: its size bounds the work, and the memory it holds, at one moment.
    threads = work_threads(settings)
    loop.set_default_executor(ThreadPoolExecutor(threads, thread_name_prefix="minicache-work"))
    log.info("work threads", extra={"threads": threads})
    server = await start_server(settings)
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    trimming = None
    if settings.memory_trim_s > 0:
        trimming = asyncio.create_task(trim_periodically(settings.memory_trim_s))
    try:
        await stopping.wait()
        log.info("shutting down", extra={"grace_s": settings.grace_s})
    finally:
        await server.stop()
        if trimming is not None:
            trimming.cancel()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
    except SettingsError as exc:
        print(f"minicache-server: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_json(settings))
        return 0
    configure_logging(settings.log_level, settings.log_format)
    # Before the first request: memory it frees then goes back to the system.
    log.info("malloc settings", extra={"mallopt": tune_allocator()})
    try:
        asyncio.run(serve(settings))
    except SettingsError as exc:
        log.error("cannot start: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
