"""Transport security: TLS credentials for servers and channels, the bind policy, and the role check.

One deployment CA signs every service's certificate (``--tls-cert``/``--tls-key``, CA in
``--tls-ca``). Each certificate names its service's role as a URI SAN ``spiffe://ringserve/<cluster>/<role>``
and the addresses it serves as DNS/IP SANs. Internal servers (prefill, decode) require a client
certificate of that CA (mutual TLS), and ``RoleCheck`` lets only the router role call their APIs.
Channels present the service's own certificate and verify the peer against the CA with hostname
verification on: a registry record naming an address its certificate does not cover gets no traffic.

Certificates reload without restart. A server's next handshake re-reads its files when they changed;
a channel's next call after its files changed goes over a new connection made with them
(``FollowingChannel``), so the router's long-lived channels to its groups follow a rotation too.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import grpc.aio

from ringserve.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

_SAN = "x509_subject_alternative_name"


def role_uri(cluster: str, role: str) -> str:
    """The URI SAN a service certificate carries for ``role`` in deployment ``cluster``."""
    return f"spiffe://ringserve/{cluster}/{role}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except (socket.gaierror, ValueError):
            return False


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InvalidArgument(f"cannot read the {what} file {path!r}: {e.strerror}") from e


def files_stamp(paths: list[str]) -> tuple:
    """What changes when one of ``paths`` is rewritten or replaced (os.stat follows the symlinks a
    Kubernetes Secret volume swaps on update)."""
    return tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in (os.stat(p) for p in paths))


@dataclass(frozen=True)
class ChannelTls:
    """What a channel presents and verifies: the CA that signs peers, and optionally our own certificate."""

    ca: str
    cert: str | None = None
    key: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """Credentials read from the files now (new channels see rotated certificates)."""
        own = (_read(self.key, "TLS key"), _read(self.cert, "TLS certificate")) if self.cert else (None, None)
        return grpc.ssl_channel_credentials(_read(self.ca, "TLS CA"), *own)

    def stamp(self) -> tuple:
        """Changes whenever one of the files does."""
        return files_stamp([p for p in (self.ca, self.cert, self.key) if p])


def check_tls_args(cfg) -> bool:
    """Whether ``cfg`` (a ``GrpcArgs``) turns TLS on; all three files or none."""
    given = [bool(cfg.tls_cert), bool(cfg.tls_key), bool(cfg.tls_ca)]
    if any(given) and not all(given):
        raise InvalidArgument("TLS needs all of --tls-cert, --tls-key and --tls-ca (the deployment CA), or none")
    return all(given)


def channel_tls(cfg) -> ChannelTls | None:
    """The channel TLS of a service with config ``cfg``: its own certificate, verified peers."""
    return ChannelTls(cfg.tls_ca, cfg.tls_cert, cfg.tls_key) if check_tls_args(cfg) else None


def check_bind(host: str, cfg, service: str) -> None:
    """Refuse a plaintext listener on a non-loopback address unless ``--insecure`` says so (then warn)."""
    if check_tls_args(cfg) or is_loopback(host):
        return
    if not cfg.insecure:
        raise FailedPrecondition(
            f"{service}: refusing to listen on {host} without TLS: give --tls-cert, --tls-key and --tls-ca, "
            "or --insecure to serve plaintext to the network on purpose"
        )
    log.warning("%s: listening on %s WITHOUT TLS (--insecure): anyone who can reach it can call it", service, host)


class _Reloading:
    """The certificate fetcher of ``grpc.dynamic_ssl_server_credentials``: new files on the next handshake."""

    def __init__(self, cert: str, key: str, client_ca: str | None):
        self.paths = [p for p in (cert, key, client_ca) if p]
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.lock = threading.Lock()
        self.stamp = files_stamp(self.paths)

    def config(self) -> grpc.ServerCertificateConfiguration:
        pairs = [(_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))]
        ca = _read(self.client_ca, "TLS client CA") if self.client_ca else None
        return grpc.ssl_server_certificate_configuration(pairs, root_certificates=ca)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            with self.lock:
                stamp = files_stamp(self.paths)
                if stamp == self.stamp:
                    return None
                config = self.config()
                self.stamp = stamp
        except (OSError, InvalidArgument) as e:  # a half-written rotation: keep serving the old one
            log.warning("TLS certificate files changed but could not be read (%s): keeping the current ones", e)
            return None
        log.info("TLS certificate files changed: new handshakes use them")
        return config


def server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    """TLS server credentials that reload on change; with ``client_ca``, clients must present a
    certificate that CA signed (mutual TLS)."""
    fetcher = _Reloading(cert, key, client_ca)
    return grpc.dynamic_ssl_server_credentials(fetcher.config(), fetcher, require_client_authentication=bool(client_ca))


class _Current:
    """The channel made with a ``ChannelTls``'s files as they are now: a new one once they change. The
    old one is dropped, not closed, so calls in flight on it end as they would have."""

    def __init__(self, tls: ChannelTls, make: Callable[[grpc.ChannelCredentials], object]):
        self.tls, self.make = tls, make
        self.lock = threading.Lock()
        self.stamp = tls.stamp()
        self.channel = make(tls.credentials())

    def get(self):
        try:
            stamp = self.tls.stamp()  # a few stat calls: cheap next to the call itself
            if stamp == self.stamp:
                return self.channel
            with self.lock:
                if stamp != self.stamp:
                    self.channel, self.stamp = self.make(self.tls.credentials()), stamp
                    log.info("TLS files %s changed: new calls connect with them", self.tls.cert or self.tls.ca)
                return self.channel
        except (OSError, InvalidArgument) as e:  # a rotation half done: the next call looks again
            log.warning("TLS files changed but could not be read (%s): keeping the current channel", e)
            return self.channel


class _Method:
    """A multicallable whose every call runs over the current channel."""

    def __init__(self, current: _Current, kind: str, args: tuple, kwargs: dict):
        self.current, self.kind, self.args, self.kwargs = current, kind, args, kwargs
        self.bound: tuple = (None, None)  # (channel, its multicallable), replaced as one

    def _callable(self):
        channel = self.current.get()
        bound_to, method = self.bound
        if bound_to is not channel:
            method = getattr(channel, self.kind)(*self.args, **self.kwargs)
            self.bound = (channel, method)
        return method

    def __call__(self, *args, **kwargs):
        return self._callable()(*args, **kwargs)

    def future(self, *args, **kwargs):
        return self._callable().future(*args, **kwargs)

    def with_call(self, *args, **kwargs):
        return self._callable().with_call(*args, **kwargs)


class _Methods:
    current: _Current

    def unary_unary(self, *args, **kwargs):
        return _Method(self.current, "unary_unary", args, kwargs)

    def unary_stream(self, *args, **kwargs):
        return _Method(self.current, "unary_stream", args, kwargs)

    def stream_unary(self, *args, **kwargs):
        return _Method(self.current, "stream_unary", args, kwargs)

    def stream_stream(self, *args, **kwargs):
        return _Method(self.current, "stream_stream", args, kwargs)


class FollowingChannel(_Methods, grpc.Channel):
    """A TLS channel to ``address`` that follows ``tls``'s files: once they change (a rotated
    certificate), each new call goes over a new channel made with them, without a restart."""

    def __init__(self, address: str, tls: ChannelTls, options: list):
        self.current = _Current(tls, lambda creds: grpc.secure_channel(address, creds, options=options))

    def subscribe(self, callback, try_to_connect=False):
        self.current.get().subscribe(callback, try_to_connect)

    def unsubscribe(self, callback):
        self.current.get().unsubscribe(callback)

    def close(self):
        self.current.get().close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class FollowingAioChannel(_Methods, grpc.aio.Channel):
    """``FollowingChannel`` for asyncio."""

    def __init__(self, address: str, tls: ChannelTls, options: list):
        self.current = _Current(tls, lambda creds: grpc.aio.secure_channel(address, creds, options=options))

    def get_state(self, try_to_connect: bool = False):
        return self.current.get().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state):
        return await self.current.get().wait_for_state_change(last_observed_state)

    async def channel_ready(self):
        return await self.current.get().channel_ready()

    async def close(self, grace: float | None = None):
        await self.current.get().close(grace)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


def peer_uris(context: grpc.ServicerContext) -> list[str]:
    """The URI SANs of the peer's verified certificate (none on plaintext)."""
    sans = context.auth_context().get(_SAN, [])
    return [s.decode() for s in sans if s.startswith(b"spiffe://")]


class RoleCheck:
    """Lets only peers whose certificate names one of ``roles`` in ``cluster`` call the
    ringserve APIs of this server (health and reflection stay open to any peer the handshake admitted);
    a ``rpc.CallCheck``."""

    def __init__(self, cluster: str, roles: tuple[str, ...], service: str):
        self.allowed = {role_uri(cluster, r) for r in roles}
        self.service, self.roles = service, roles

    def guards(self, method: str, streaming: bool) -> bool:
        return method.startswith("/ringserve.")

    @contextlib.contextmanager
    def admit(self, method: str, context: grpc.ServicerContext):
        uris = peer_uris(context)
        if not self.allowed.intersection(uris):
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method}: the {self.service} API accepts calls only from {' or '.join(self.roles)} services "
                f"of this deployment; the caller's certificate names {', '.join(uris) or 'no ringserve role'}",
            )
        yield None
