"""Certificates for tests, made with ``cryptography``: a deployment CA and the certificates it
issues (a role as a SPIFFE URI SAN, addresses as DNS/IP SANs), written to files as services read them.

And the two ways test clusters run (``Security``, the ``security`` fixture in conftest.py), with what a
test needs to call a cluster either way: ``router_client``, ``async_router_client``, ``router_channel``,
``cli_generate``.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import itertools
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ringserve.client import AsyncClient, Client
from ringserve.launch import Cluster, start_cluster
from ringserve.tls import ChannelTls, role_uri


@dataclass(frozen=True)
class Issued:
    """A certificate's files: its chain's CA, the certificate and its key."""

    ca: str
    cert: str
    key: str

    def flags(self) -> list[str]:
        return ["--tls-cert", self.cert, "--tls-key", self.key, "--tls-ca", self.ca]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class CA:
    """A deployment CA in ``directory`` (``ca.pem``); ``issue`` writes leaf certificates beside it."""

    def __init__(self, directory: Path, name: str = "ringserve-test-ca"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = str(self.dir / "ca.pem")
        Path(self.path).write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        name: str,
        role: str | None = None,
        cluster: str = "ringserve",
        hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    ) -> Issued:
        """A certificate for ``name`` (file stem), naming ``role`` of ``cluster`` and valid for ``hosts``."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        if role:
            sans.append(x509.UniformResourceIdentifier(role_uri(cluster, role)))
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = self.dir / f"{name}.pem", self.dir / f"{name}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return Issued(self.path, str(cert_path), str(key_path))


API_KEY = "test-key-5f0c2a9d81b34e67"  # the one key of every secure test cluster's router
SECRET = "deployment-secret-for-tests-0123456789"  # the deployment secret of every secure test cluster
ROLES = ("decode", "prefill", "router")


class Security:
    """How a test module's clusters run. ``plain``: plaintext on loopback, no keys, no secret.
    ``secure``: mutual TLS between all services, each with its role's certificate of a CA made here;
    TLS and the API key ``API_KEY`` on the router's client port (and its HTTP API); the deployment
    secret ``SECRET`` on the KV path (MAC'd NIXL landings and TCP frames)."""

    def __init__(self, mode: str, directory: Path):
        self.mode = mode
        self.dir = Path(directory)
        self.ca = CA(self.dir / "ca") if self.secure else None
        self._serial = itertools.count()
        if self.secure:
            (self.dir / "secret").write_text(SECRET + "\n")
            (self.dir / "keys").write_text(f"tests {API_KEY}\n")

    @property
    def secure(self) -> bool:
        return self.mode == "secure"

    def issue(self, cluster: str, role: str) -> Issued:
        """A fresh certificate for ``role`` of ``cluster`` (files of its own: a running service's stay as they are)."""
        return self.ca.issue(f"{cluster}-{next(self._serial)}-{role}", role=role, cluster=cluster)

    def role_flags(self, cluster: str) -> dict[str, list[str]]:
        """Each role's flags for the services of ``cluster`` (``launch.Cluster.role_flags``; none when plain)."""
        if not self.secure:
            return {}
        flags = {role: self.issue(cluster, role).flags() for role in ROLES}
        for role in ("decode", "prefill"):
            flags[role] += ["--deployment-secret-file", str(self.dir / "secret")]
        flags["router"] += ["--api-keys-file", str(self.dir / "keys")]
        return flags

    def tls(self, cluster: str) -> ChannelTls | None:
        """What a test presents to ``cluster``'s services: a router's certificate (their APIs take no other)."""
        if not self.secure:
            return None
        tester = self.issue(cluster, "router")
        return ChannelTls(self.ca.path, tester.cert, tester.key)

    def config(self, cfg, cluster: str, role: str):
        """A service config ``cfg`` in this mode (TLS as ``role`` of ``cluster``), for servers run in the test."""
        if not self.secure:
            return cfg
        issued = self.issue(cluster, role)
        return dataclasses.replace(cfg, cluster=cluster, tls_cert=issued.cert, tls_key=issued.key, tls_ca=issued.ca)

    def add_port(self, server: grpc.Server, cluster: str, role: str) -> int:
        """A loopback port on a bare ``grpc.Server`` (a test's stand-in for a service): TLS with a ``role``
        certificate of ``cluster`` that requires the caller's certificate of the CA when secure."""
        if not self.secure:
            return server.add_insecure_port("127.0.0.1:0")
        issued = self.issue(cluster, role)
        pair = (Path(issued.key).read_bytes(), Path(issued.cert).read_bytes())
        credentials = grpc.ssl_server_credentials([pair], Path(issued.ca).read_bytes(), require_client_auth=True)
        return server.add_secure_port("127.0.0.1:0", credentials)

    def start_cluster(self, **kwargs) -> Cluster:
        """``launch.start_cluster`` in this mode, under a fresh cluster name unless ``name`` is given."""
        name = kwargs.pop("name", None) or f"{self.mode}-{uuid.uuid4().hex[:8]}"
        return start_cluster(name=name, role_flags=self.role_flags(name), tls=self.tls(name), **kwargs)

    def cluster(self, redis_url: str, name: str, log_dir: str) -> Cluster:
        """An empty ``launch.Cluster`` in this mode, for a test that spawns its services one by one."""
        return Cluster(
            "", "", "", redis_url, name, log_dir=log_dir, tls=self.tls(name), role_flags=self.role_flags(name)
        )


def router_client(cluster: Cluster, timeout: float | None = None, api_key: str | None = API_KEY) -> Client:
    """A client of ``cluster``'s router, with TLS and the API key when the cluster runs them."""
    key = api_key if cluster.tls else None
    return Client(cluster.addresses["router"], timeout=timeout, tls=cluster.tls, api_key=key)


def async_router_client(cluster: Cluster, timeout: float | None = None) -> AsyncClient:
    """``router_client`` for asyncio."""
    key = API_KEY if cluster.tls else None
    return AsyncClient(cluster.addresses["router"], timeout=timeout, tls=cluster.tls, api_key=key)


def router_channel(cluster: Cluster) -> grpc.Channel:
    """A bare channel to ``cluster``'s router whose every call carries the API key, over TLS, when
    the cluster runs them (for tests that send what ``Client`` would not)."""
    address = cluster.addresses["router"]
    if cluster.tls is None:
        return grpc.insecure_channel(address)
    key = grpc.access_token_call_credentials(API_KEY)  # sends `authorization: Bearer <key>`
    return grpc.secure_channel(address, grpc.composite_channel_credentials(cluster.tls.credentials(), key))


def cli_generate(cluster: Cluster) -> tuple[list[str], dict[str, str]]:
    """`ringserve generate --url` to ``cluster``'s router, and the environment to run it in: TLS and
    the API key (from RINGSERVE_API_KEY, never a flag) when the cluster runs them."""
    argv = [sys.executable, "-m", "ringserve.cli", "generate", "--url", cluster.addresses["router"]]
    env = dict(os.environ)
    if cluster.tls:
        argv += ["--tls-ca", cluster.tls.ca]
        env["RINGSERVE_API_KEY"] = API_KEY
    return argv, env
