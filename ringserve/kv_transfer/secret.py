"""The deployment secret, and what it keys: MACs over KV landings and TCP KV frames, and the
prefill side's memory of landings it has admitted (replays refused).

Both tiers read the same secret (``--deployment-secret-file``, or its value in
RINGSERVE_DEPLOYMENT_SECRET): a decode worker signs each landing it hands out (HMAC-SHA256 over
the landing's bytes: its agent, incarnation, epoch, expiry, blocks and NIXL metadata), and a
prefill group verifies it before any WRITE, so only a decode worker of this deployment can direct
one. Without a secret (a loopback deployment) landings carry a checksum only.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time

from ringserve.config import read_secret
from ringserve.errors import InvalidArgument, PermissionDenied

SECRET_ENV = "RINGSERVE_DEPLOYMENT_SECRET"
MIN_SECRET_BYTES = 16
TAG_BYTES = 32  # HMAC-SHA256
CLOCK_SKEW_S = 30.0  # hosts' clocks may differ by this much (run NTP)


def deployment_secret(path: str | None) -> bytes | None:
    """The secret from ``path`` (surrounding whitespace dropped), else from RINGSERVE_DEPLOYMENT_SECRET,
    else None (landings and frames unsigned). Never logged."""
    secret = read_secret(path, SECRET_ENV, "--deployment-secret-file")
    if secret is None:
        return None
    if len(secret) < MIN_SECRET_BYTES:
        raise InvalidArgument(
            f"the deployment secret in {path or SECRET_ENV} has {len(secret)} bytes; use at least "
            f"{MIN_SECRET_BYTES} random ones (e.g. `openssl rand -hex 32`)"
        )
    return secret


def tag(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 of ``data`` under ``key``."""
    return hmac.new(key, data, hashlib.sha256).digest()


def verify(key: bytes, data: bytes, given: bytes) -> bool:
    """Whether ``given`` is ``data``'s tag under ``key`` (compared in constant time)."""
    return hmac.compare_digest(tag(key, data), given)


class ReplayGuard:
    """The landings a prefill group has admitted, by (agent, incarnation, epoch), until they expire:
    a landing is admitted once, before its expiry; a second Prefill with it is refused."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen: dict[tuple[str, int, int], float] = {}  # -> wall time after which it is forgotten

    def admit(self, agent: str, incarnation: int, epoch: int, expires: float, request_id: str) -> None:
        """Record a landing's first use; raise PermissionDenied if it expired or was admitted before."""
        now = time.time()
        if expires and expires + CLOCK_SKEW_S < now:
            raise PermissionDenied(
                f"request {request_id}: the KV landing expired {now - expires:.0f} s ago: reserve again "
                "(or check that the hosts' clocks agree)"
            )
        key = (agent, incarnation, epoch)
        with self.lock:
            self.seen = {k: until for k, until in self.seen.items() if until > now}
            if key in self.seen:
                raise PermissionDenied(
                    f"request {request_id}: the KV landing of reservation {epoch} at decode agent {agent} was "
                    "used before: a landing directs one prefill only (replay refused)"
                )
            self.seen[key] = max(expires, now) + CLOCK_SKEW_S
