"""Client authentication on the router: API keys sent as ``authorization: Bearer <key>`` metadata,
with per-key limits.

The keys file (``--api-keys-file``; in Kubernetes a Secret mounted as a file) has one key a line:

    # name   key                                  max_concurrent  tokens_per_minute
    alice    9c1f0e5b6d2a4e0f8a7b3c5d1e9f2a4b                  4              200000
    batch    0d3e7a1c5b9f4e2d8c6a0b3f7e1d5c9a                  -                   -

``name`` labels the key in logs and errors (the key itself never appears there); the limits are
optional, ``-`` or absent means none. Blank lines and ``#`` comments are ignored. The file is
re-read when it changes (checked at most once a second): adding, removing or rotating a key
needs no restart. A file that fails to parse on reload leaves the previous keys in force.

Tokens per minute count prompt and completion tokens of Generate calls as they become known
(completion tokens as they stream, the prompt's at the end), over the last 60 s; a call that
finds the key's budget spent, or its concurrent calls at the limit, gets RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import grpc

from ringserve.errors import InvalidArgument

log = logging.getLogger(__name__)

_WINDOW_S = 60.0
_RECHECK_S = 1.0
GENERATE = "/ringserve.v1.Router/Generate"  # the one call the per-key limits count


@dataclass
class ApiKey:
    """One client's key and its limits (None: unlimited)."""

    name: str
    secret: bytes = field(repr=False)
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None


def _limit(word: str, what: str, line_no: int, path: str) -> int | None:
    if word == "-":
        return None
    if not word.isdigit() or int(word) < 1:
        raise InvalidArgument(f"{path} line {line_no}: {what} must be a positive integer or '-', got {word!r}")
    return int(word)


def parse_keys(text: str, path: str) -> dict[str, ApiKey]:
    """The keys of a keys file's ``text``, by name; errors name the line but never show a key."""
    keys: dict[str, ApiKey] = {}
    secrets: set[bytes] = set()
    for line_no, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if not 2 <= len(words) <= 4:
            raise InvalidArgument(
                f"{path} line {line_no}: expected `name key [max_concurrent] [tokens_per_minute]`, "
                f"got {len(words)} fields"
            )
        name, secret = words[0], words[1].encode()
        if name in keys or secret in secrets:
            raise InvalidArgument(f"{path} line {line_no}: the name {name!r} or its key is given twice")
        limits = [_limit(w, what, line_no, path) for w, what in zip(words[2:], ("max_concurrent", "tokens_per_minute"))]
        keys[name] = ApiKey(name, secret, *limits)
        secrets.add(secret)
    return keys


class KeyFile:
    """The keys of ``path``, re-read when its modification time or size changes."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.stamp, self.keys = self._load()
        self.checked = time.monotonic()
        log.info("API keys: %d from %s (%s)", len(self.keys), path, ", ".join(self.keys) or "none: every call refused")

    def _stamp(self) -> tuple:
        st = os.stat(self.path)  # follows the symlinks a Kubernetes Secret volume swaps on update
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self) -> tuple[tuple, dict[str, ApiKey]]:
        try:
            stamp = self._stamp()
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"cannot read the API keys file {self.path!r}: {e}") from e
        return stamp, parse_keys(text, self.path)

    def current(self) -> dict[str, ApiKey]:
        """The keys now: re-read if the file changed since the last look (at most once a second)."""
        with self.lock:
            now = time.monotonic()
            if now - self.checked >= _RECHECK_S:
                self.checked = now
                try:
                    if self._stamp() != self.stamp:
                        self.stamp, self.keys = self._load()
                        log.info("API keys reloaded from %s: %s", self.path, ", ".join(self.keys) or "none")
                except (OSError, InvalidArgument) as e:
                    log.error("API keys file changed but is not usable (%s): keeping the previous keys", e)
            return self.keys

    def find(self, secret: bytes) -> ApiKey | None:
        """The key whose secret is ``secret``: every key is compared, in constant time each."""
        found = None
        for key in self.current().values():
            if hmac.compare_digest(key.secret, secret):
                found = key
        return found


class _Usage:
    """What one key name uses: its running calls and its tokens of the last minute."""

    def __init__(self):
        self.running = 0
        self.tokens: collections.deque[tuple[float, int]] = collections.deque()

    def tokens_in_window(self, now: float) -> int:
        while self.tokens and now - self.tokens[0][0] > _WINDOW_S:
            self.tokens.popleft()
        return sum(n for _, n in self.tokens)


class ApiKeyAuth:
    """Authenticates every call to the router's API by its bearer key and applies the key's limits
    to Generate; health and reflection stay open (probes). A ``rpc.CallCheck``."""

    def __init__(self, path: str):
        self.keys = KeyFile(path)
        self.lock = threading.Lock()
        self.usage: dict[str, _Usage] = collections.defaultdict(_Usage)

    def _authenticate(self, context: grpc.ServicerContext, method: str) -> ApiKey:
        values = [v for k, v in context.invocation_metadata() if k == "authorization"]
        if not values:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method}: no API key: send the metadata `authorization: Bearer <key>`",
            )
        scheme, _, secret = values[0].partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method}: the authorization metadata must be `Bearer <key>` (got a {scheme!r} credential)",
            )
        key = self.keys.find(secret.strip().encode())
        if key is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method}: this API key is not valid for this router")
        return key

    def _hold(self, key: ApiKey, context: grpc.ServicerContext) -> _Usage:
        """One more running call of ``key``, or RESOURCE_EXHAUSTED when its limits are reached."""
        with self.lock:
            usage = self.usage[key.name]
            used = usage.tokens_in_window(time.monotonic())
            if key.max_concurrent is not None and usage.running >= key.max_concurrent:
                refusal = f"API key {key.name!r} is running its limit of {key.max_concurrent} concurrent requests"
            elif key.tokens_per_minute is not None and used >= key.tokens_per_minute:
                refusal = f"API key {key.name!r} used its {key.tokens_per_minute} tokens of the last minute"
            else:
                usage.running += 1
                return usage
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{refusal}: retry later")

    def _count(self, usage: _Usage, chunk) -> None:
        """A Generate response's tokens: its completion tokens, and the prompt's in the final usage."""
        tokens = len(chunk.token_ids) + (chunk.usage.prompt_tokens if chunk.HasField("usage") else 0)
        if tokens:
            with self.lock:
                usage.tokens.append((time.monotonic(), tokens))

    def guards(self, method: str, streaming: bool) -> bool:
        return method.startswith("/ringserve.")

    @contextlib.contextmanager
    def admit(self, method: str, context: grpc.ServicerContext):
        """Every call needs a valid key; Generate also counts against the key's limits, its tokens as they stream."""
        key = self._authenticate(context, method)
        if method != GENERATE:
            yield None
            return
        usage = self._hold(key, context)
        try:
            yield functools.partial(self._count, usage)
        finally:
            with self.lock:
                usage.running -= 1
