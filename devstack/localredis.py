"""Redis for the local stack: ``REDIS_URL``, a private ``redis-server``, or embedded fakeredis.

Each is a :class:`RedisHandle` with a URL the stack's processes use and a ``stop`` that undoes
only what the stack itself started.
"""

from __future__ import annotations

import enum
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import redis
from redis.exceptions import RedisError, ResponseError

from devstack.processes import HOST, Child, Say, StackError, free_port
from dispatcher.db import redact


class RedisChoice(enum.StrEnum):
    """Where ``dispatcher run`` gets Redis from."""

    AUTO = "auto"  # REDIS_URL if it answers, else redis-server, else embedded
    SERVER = "server"  # a private redis-server (the binary must be on PATH)
    EMBEDDED = "embedded"  # fakeredis in this process: an in-memory stand-in


def redis_answers(url: str, timeout: float = 2.0) -> bool:
    """True when the Redis at ``url`` answers PING."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except (RedisError, OSError):
        return False
    finally:
        client.close()


def _wait_for_redis(url: str, alive: Callable[[], bool], timeout: float = 10.0) -> bool:
    """True once ``url`` answers PING; false if ``alive()`` turns false or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if redis_answers(url, timeout=1.0):
            return True
        if not alive():
            return False
        time.sleep(0.05)
    return False


class RedisHandle(Protocol):
    """A Redis the stack uses: its URL, what it is, and how to stop it."""

    url: str
    description: str

    def alive(self) -> bool:
        """False once a Redis the stack started has gone away."""
        ...

    def stop(self) -> None:
        """Stop it if the stack started it; an external Redis is left alone."""
        ...


@dataclass
class ExternalRedis:
    """``REDIS_URL``: someone else's Redis; the stack never stops it."""

    url: str
    description: str = "REDIS_URL"

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        return None


@dataclass
class PrivateRedisServer:
    """A ``redis-server`` child on a free port, without persistence, its files in the run dir."""

    child: Child
    url: str
    description: str = "private redis-server (no persistence; data is lost at stop)"

    def alive(self) -> bool:
        return self.child.alive()

    def stop(self) -> None:
        self.child.stop(10)


@dataclass
class EmbeddedRedis:
    """A fakeredis TCP server in a thread of this process: an in-memory stand-in for Redis."""

    server: Any  # fakeredis.TcpFakeServer
    thread: threading.Thread
    url: str
    description: str = "embedded fakeredis (an in-memory stand-in for Redis, not a real server)"

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def start_redis_server(directory: Path, log_path: Path, binary: str) -> PrivateRedisServer:
    """Start a private ``redis-server`` and wait until it answers PING."""
    port = free_port()
    data = directory / "redis"
    data.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(data), "--daemonize", "no"]
    child = Child("redis", argv, os.environ, log_path)
    child.start()
    url = f"redis://{HOST}:{port}/0"
    if not _wait_for_redis(url, child.alive):
        child.stop(5)
        raise StackError(f"redis-server did not answer on port {port}; see {log_path}")
    return PrivateRedisServer(child, url)


def start_embedded_redis() -> EmbeddedRedis:
    """Serve fakeredis over TCP on a free port from a thread of this process."""
    from fakeredis import TcpFakeServer  # only the embedded path needs it

    port = free_port()
    server = TcpFakeServer((HOST, port))
    server.RequestHandlerClass = _error_replies_keep_connection(server.RequestHandlerClass)
    thread = threading.Thread(target=server.serve_forever, name="fakeredis", daemon=True)
    thread.start()
    url = f"redis://{HOST}:{port}/0"
    if not _wait_for_redis(url, thread.is_alive):
        server.shutdown()
        server.server_close()
        raise StackError(f"the embedded fakeredis server did not answer on port {port}")
    return EmbeddedRedis(server, thread, url)


def _error_replies_keep_connection(handler: Any) -> Any:
    """fakeredis's TCP handler class, changed so that an error reply keeps the connection open.

    fakeredis 2.40 closes the connection after any error reply. Real Redis does not, and
    redis-py's scripts depend on it: EVALSHA answers NOSCRIPT, then SCRIPT LOAD follows on the
    same connection and finds it closed, so every first use of a Lua script failed
    (https://github.com/cunla/fakeredis-py/issues/432).
    """

    class KeepAlive(handler):  # type: ignore[misc]
        """The request handler, with error replies returned instead of raised."""

        def setup(self) -> None:
            super().setup()
            client = self.current_client
            read_response = client.read_response

            def read_reply(*args: Any, **kwargs: Any) -> Any:
                try:
                    return read_response(*args, **kwargs)
                except ResponseError as exc:  # an error reply, written out as one
                    return exc

            client.read_response = read_reply

    return KeepAlive


def choose_redis(
    choice: RedisChoice, configured_url: str | None, directory: Path, log_path: Path, say: Say
) -> RedisHandle:
    """Pick Redis as ``choice`` says; ``auto`` goes REDIS_URL, redis-server, then embedded."""
    if choice is RedisChoice.AUTO and configured_url:
        if redis_answers(configured_url):
            return ExternalRedis(configured_url)
        say(f"REDIS_URL {redact(configured_url)} does not answer PING; starting a Redis of our own")
    if choice is RedisChoice.EMBEDDED:
        return start_embedded_redis()
    binary = shutil.which("redis-server")
    if binary is not None:
        try:
            return start_redis_server(directory, log_path, binary)
        except StackError as exc:
            if choice is RedisChoice.SERVER:
                raise
            say(f"{exc}; falling back to the embedded Redis stand-in")
    elif choice is RedisChoice.SERVER:
        raise StackError("--redis server needs `redis-server` on PATH (install redis)")
    return start_embedded_redis()
