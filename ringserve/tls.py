"""Transport security: TLS credentials for servers and channels, the bind policy, and the role check.

One deployment CA signs every service's certificate (``--tls-cert``/``--tls-key``, CA in
``--tls-ca``). Each certificate names its service's role as a URI SAN ``spiffe://ringserve/<cluster>/<role>``
and the addresses it serves as DNS/IP SANs. Internal servers (prefill, decode) require a client
certificate of that CA (mutual TLS), and ``RoleCheck`` lets only the router role call their APIs.
Channels present the service's own certificate and verify the peer against the CA with hostname
verification on: a registry record naming an address its certificate does not cover gets no traffic.

Server certificates reload without restart: each new handshake re-reads the files when they changed.
Channel credentials are read when a channel is made, so rotated client certificates apply to new channels.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import threading
from dataclasses import dataclass

import grpc

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
        self.stamp = self._stamp()

    def _stamp(self) -> tuple:
        return tuple(os.stat(p).st_mtime_ns for p in self.paths)

    def config(self) -> grpc.ServerCertificateConfiguration:
        pairs = [(_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))]
        ca = _read(self.client_ca, "TLS client CA") if self.client_ca else None
        return grpc.ssl_server_certificate_configuration(pairs, root_certificates=ca)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            with self.lock:
                stamp = self._stamp()
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
