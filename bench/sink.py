"""The SMTP sink (aiosmtpd in its own process) and the raw ceiling measured against it.

Recipients are tagged by the first part of their local part (``<tag>-...@bench.example``): the
sink keeps a count and the first and last arrival time per tag, and the arrival time of each
``lat-`` message (SmartPlan latency probes).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import socket
import time
from typing import Any

import aiosmtplib

#: Tags the sink counts apart; anything else is counted as "other" (e.g. usage notices).
TAGS = ("raw", "dl", "dlb", "lat", "cmp")  # dl: SmartPlan steps sent singly, dlb: in batches
_SLOTS = len(TAGS) + 1  # + other


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(port: int, ready: Any, stats: Any, arrivals: Any, parent: int) -> None:
    """The sink process: an aiosmtpd server that counts messages per tag."""
    from aiosmtpd.controller import Controller

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it (Ctrl-C reaches both)
    index = {tag: i for i, tag in enumerate(TAGS)}

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            now = time.time()
            rcpt = envelope.rcpt_tos[0]
            tag = rcpt.split("-", 1)[0]
            i = index.get(tag, len(TAGS)) * 3
            with stats.get_lock():
                stats[i] += 1
                if stats[i + 1] == 0:
                    stats[i + 1] = now
                stats[i + 2] = now
            if tag == "lat":
                arrivals.put((rcpt, now))
            return "250 2.0.0 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=port, ready_timeout=20)
    controller.start()
    ready.set()
    while os.getppid() == parent:  # the bench died without stopping us
        time.sleep(1)
    controller.stop()


class Sink:
    """An SMTP server in its own process (no STARTTLS offered), counting arrivals per tag."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.port = free_port()
        self.stats: Any = ctx.Array("d", 3 * _SLOTS)
        self.arrivals: Any = ctx.Queue()
        ready = ctx.Event()
        self.proc = ctx.Process(
            target=_serve,
            args=(self.port, ready, self.stats, self.arrivals, os.getpid()),
            daemon=True,
            name="bench-smtp-sink",
        )
        self.proc.start()
        if not ready.wait(30):
            self.stop()
            raise RuntimeError("SMTP sink did not start")

    def _i(self, tag: str) -> int:
        return (TAGS.index(tag) if tag in TAGS else len(TAGS)) * 3

    def count(self, tag: str) -> int:
        return int(self.stats[self._i(tag)])

    def first(self, tag: str) -> float:
        return float(self.stats[self._i(tag) + 1])

    def last(self, tag: str) -> float:
        return float(self.stats[self._i(tag) + 2])

    def reset(self, tag: str) -> None:
        i = self._i(tag)
        with self.stats.get_lock():
            self.stats[i] = self.stats[i + 1] = self.stats[i + 2] = 0

    def drain_arrivals(self, seconds: float = 0.5) -> dict[str, float]:
        """Arrival times of the ``lat-`` messages received since the last drain: what comes
        within ``seconds`` (arrivals may keep coming; this returns all the same)."""
        out: dict[str, float] = {}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                rcpt, at = self.arrivals.get(timeout=0.05)
            except Exception:  # noqa: BLE001 - queue.Empty from another module
                break
            out[rcpt] = at
        return out

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10)
        self.arrivals.close()
        self.arrivals.cancel_join_thread()


#: About 3.5 KB, as the per-message costs in PERFORMANCE.md were measured with.
CEILING_MESSAGE = (
    b"From: a@bench.example\r\nTo: raw-0@bench.example\r\nSubject: ceiling\r\n"
    b"Message-ID: <c@bench.example>\r\n\r\n" + (b"x" * 70 + b"\r\n") * 48
)


def raw_ceiling(port: int, messages: int, connections: int = 8) -> float:
    """Messages/s of aiosmtplib alone on reused connections sending pre-flattened bytes."""
    per_lane = max(1, messages // connections)

    async def lane() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30, start_tls=False)
        await client.connect()
        for _ in range(per_lane):
            await client.sendmail("a@bench.example", ["raw-0@bench.example"], CEILING_MESSAGE)
        await client.quit()

    async def run() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(connections)))
        return per_lane * connections / (time.perf_counter() - start)

    return asyncio.run(run())
