"""A real Kubernetes control plane on loopback for tests: etcd, kube-apiserver and kube-controller-manager.

The binaries (v1.20.2, built from Debian's `kubernetes` source package by tests/tools/build_kube.sh, which
also unpacks Debian's Prometheus for the planner's optional signal)
are built once per machine into a cache outside the repository; a build already under way (the one
.ci/run starts in the background) is waited for through the script's lock. A failed build raises
with the tail of its log, so the tests fail saying why instead of skipping.

There is no kubelet and no scheduler: the controller manager creates a StatefulSet's pods and they stay
Pending. A test that needs a pod ready would patch its status, as a kubelet does (`kubectl patch pod P
--subresource=status --type=merge -p '{"status": {"phase": "Running", "conditions": [{"type": "Ready",
"status": "True"}]}}'`); none does today.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from ringserve.process_group import free_port
from tests.helm_tools import TOOLS_DIR

CACHE = Path(os.environ.get("RINGSERVE_KUBE_CACHE", TOOLS_DIR / "k8s-1.20.2"))
STAMP = "complete-v2"  # build_kube.sh writes it last
BUILD = Path(__file__).resolve().parent / "tools" / "build_kube.sh"
ADMIN_TOKEN = "ringserve-test-admin"


def kube_binaries(timeout_s: float = 3600) -> Path:
    """The directory with etcd, kube-apiserver, kube-controller-manager and prometheus, built if not cached yet."""
    if not (CACHE / STAMP).exists():
        done = subprocess.run(["bash", str(BUILD), str(CACHE)], capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0 or not (CACHE / STAMP).exists():
            log = Path(f"{CACHE}.log")
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:]) if log.exists() else ""
            raise RuntimeError(
                f"building kube-apiserver with {BUILD} failed (exit {done.returncode}) {done.stderr.strip()}; "
                f"the last lines of {log}:\n{tail}"
            )
    return CACHE / "bin"


def _wait_http(url: str, procs: dict[str, subprocess.Popen], timeout_s: float, context=None, headers=None) -> None:
    """Until ``url`` answers 200; raises if one of ``procs`` exits first or time runs out."""
    request = urllib.request.Request(url, headers=headers or {})
    deadline = time.monotonic() + timeout_s
    while True:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(request, context=context, timeout=5) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer in {timeout_s} s")
        time.sleep(0.5)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM all, then wait for each (SIGKILL after 30 s)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _openssl(command: str) -> None:
    subprocess.run(["openssl", *command.split()], check=True, capture_output=True)


def _make_pki(pki: Path) -> None:
    """A CA, the API server's serving certificate for 127.0.0.1, and the service-account signing key."""
    pki.mkdir(parents=True)
    _openssl(f"req -x509 -newkey rsa:2048 -nodes -keyout {pki}/ca.key -out {pki}/ca.crt -days 2 -subj /CN=test-kube-ca")
    _openssl(f"req -newkey rsa:2048 -nodes -keyout {pki}/apiserver.key -out {pki}/apiserver.csr -subj /CN=apiserver")
    (pki / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost\n")
    _openssl(
        f"x509 -req -in {pki}/apiserver.csr -CA {pki}/ca.crt -CAkey {pki}/ca.key -CAcreateserial "
        f"-out {pki}/apiserver.crt -days 2 -extfile {pki}/ext.cnf"
    )
    _openssl(f"genrsa -out {pki}/sa.key 2048")
    _openssl(f"rsa -in {pki}/sa.key -pubout -out {pki}/sa.pub")
    (pki / "tokens.csv").write_text(f"{ADMIN_TOKEN},admin,admin,system:masters\n")


class KubeCluster:
    """etcd, kube-apiserver (RBAC, token auth) and kube-controller-manager under ``work``, on free ports."""

    def __init__(self, bin_dir: Path, work: Path):
        self.bin, self.work = bin_dir, work
        self.pki = work / "pki"
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = work / "kubeconfig"
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, timeout_s: float = 180) -> KubeCluster:
        _make_pki(self.pki)
        self.write_kubeconfig(self.kubeconfig, ADMIN_TOKEN)
        pki, etcd, peer = self.pki, f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
        self._spawn(
            f"etcd --data-dir={self.work}/etcd-data --listen-client-urls={etcd} --advertise-client-urls={etcd} "
            f"--listen-peer-urls={peer} --initial-advertise-peer-urls={peer} --initial-cluster=default={peer}"
        )
        self._spawn(
            f"kube-apiserver --etcd-servers={etcd} --bind-address=127.0.0.1 --advertise-address=127.0.0.1 "
            f"--secure-port={self.port} --insecure-port=0 --tls-cert-file={pki}/apiserver.crt "
            f"--tls-private-key-file={pki}/apiserver.key --token-auth-file={pki}/tokens.csv --authorization-mode=RBAC "
            f"--service-account-key-file={pki}/sa.pub --service-account-signing-key-file={pki}/sa.key "
            "--service-account-issuer=https://kubernetes.default.svc --service-cluster-ip-range=10.0.0.0/24"
        )
        self._wait_ready(timeout_s)
        self._spawn(
            f"kube-controller-manager --kubeconfig={self.kubeconfig} --leader-elect=false --port=0 --secure-port=0 "
            f"--service-account-private-key-file={pki}/sa.key --root-ca-file={pki}/ca.crt"
        )
        return self

    def _spawn(self, command: str) -> None:
        """Start bin/<first word> with the rest as its arguments (no spaces in them), logging to <name>.log."""
        binary, *args = command.split()
        with open(self.work / f"{binary}.log", "w") as out:
            self.procs[binary] = subprocess.Popen([str(self.bin / binary), *args], stdout=out, stderr=subprocess.STDOUT)

    def _wait_ready(self, timeout_s: float) -> None:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        try:
            _wait_http(f"{self.url}/readyz", self.procs, timeout_s, context, headers)
        except RuntimeError as e:
            raise RuntimeError(f"kube-apiserver not ready: {e}\n{self.log_tail('kube-apiserver')}") from None

    def write_kubeconfig(self, path: Path, token: str, namespace: str = "default") -> Path:
        """A kubeconfig for this API server that authenticates with ``token``."""
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: t, cluster: {{server: '{self.url}', certificate-authority: '{self.pki}/ca.crt'}}}}]\n"
            f"users: [{{name: u, user: {{token: '{token}'}}}}]\n"
            f"contexts: [{{name: t, context: {{cluster: t, user: u, namespace: {namespace}}}}}]\n"
            "current-context: t\n"
        )
        return path

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.work / f"{name}.log"
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        """Controller manager and API server first, then etcd (which they write to)."""
        _stop([self.procs[n] for n in ("kube-controller-manager", "kube-apiserver") if n in self.procs])
        _stop([self.procs[n] for n in ("etcd",) if n in self.procs])


class Prometheus:
    """A real Prometheus server scraping ``targets`` (host:port of /metrics endpoints) every second."""

    def __init__(self, bin_dir: Path, work: Path, targets: list[str]):
        self.bin, self.work, self.targets = bin_dir, work, targets
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> Prometheus:
        config = self.work / "prometheus.yml"
        targets = ", ".join(f"'{t}'" for t in self.targets)
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"scrape_configs: [{{job_name: ringserve, static_configs: [{{targets: [{targets}]}}]}}]\n"
        )
        with open(self.work / "prometheus.log", "w") as out:
            argv = [
                str(self.bin / "prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.work}/tsdb",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ]
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        _wait_http(f"{self.url}/-/ready", {"prometheus": self.proc}, timeout_s)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop([self.proc])
