"""The Helm chart (helm/ringserve): lint, render and validate it offline with real helm and
kubernetes-validate, then run what it renders: the router, a prefill group and a decode group started
on this machine with exactly the chart's commands, arguments and environment, a request through them,
a second prefill group joining as `kubectl scale` would start it, and that group draining on SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ringserve.client import Client
from ringserve.process_group import free_port
from ringserve.redis_server import EmbeddedRedis
from ringserve.v1 import prefill_pb2, prefill_pb2_grpc
from tests.helm_tools import helm_binary

CHART = Path(__file__).resolve().parent.parent / "helm" / "ringserve"
RELEASE = "rs"
FULLNAME = "rs-ringserve"


@pytest.fixture(scope="module")
def helm() -> Path:
    try:
        return helm_binary()
    except RuntimeError as e:
        pytest.skip(f"no helm binary: {e}")


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60)
    if check:
        assert done.returncode == 0, f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def render(
    helm: Path, values: dict, tmp_path: Path, name: str = "values", kube_version: str | None = None
) -> tuple[str, list[dict]]:
    """`helm lint --strict` then `helm template` with these values (for this Kubernetes version, else helm's
    default): the manifests' text and documents."""
    values_file = tmp_path / f"{name}.yaml"
    values_file.write_text(yaml.safe_dump(values))
    version = ["--kube-version", kube_version] if kube_version else []
    run_helm(helm, "lint", "--strict", str(CHART), "-f", str(values_file), *version)
    text = run_helm(helm, "template", RELEASE, str(CHART), "-f", str(values_file), *version).stdout
    return text, [d for d in yaml.safe_load_all(text) if d]


def render_notes(helm: Path, values: dict, tmp_path: Path) -> str:
    """NOTES.txt as `helm install` prints it (helm renders NOTES only against a cluster: render a copy of
    it as an ordinary template of a copy of the chart)."""
    chart = tmp_path / "notes-chart"
    shutil.copytree(CHART, chart, dirs_exist_ok=True)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "templates" / "notes-rendered.txt")
    values_file = tmp_path / "notes-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    args = ("template", RELEASE, str(chart), "-f", str(values_file), "--show-only", "templates/notes-rendered.txt")
    return run_helm(helm, *args).stdout


def validate(manifest: str, tmp_path: Path, kube_version: str = "1.37.0") -> subprocess.CompletedProcess:
    """kubernetes-validate --strict (offline, this Kubernetes version's schemas) on a manifest file."""
    path = tmp_path / "manifest.yaml"
    path.write_text(manifest)
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", kube_version, str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name} rendered {len(matches)} times"
    return matches[0]


def container(workload: dict) -> dict:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict:
    """A container's literal env values (valueFrom entries as their source dict)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


# Value sets CI renders: the defaults and several non-default installs.
VALUE_SETS = {
    "default": {},
    "external-redis": {  # TLS with a private CA: its certificate from a Secret, mounted in every pod
        "redis": {"enabled": False, "external": {"url": "rediss://redis.example:6380/0", "existingSecret": "rs-redis"}},
        "extraVolumes": [{"name": "redis-ca", "secret": {"secretName": "redis-ca"}}],
        "extraVolumeMounts": [{"name": "redis-ca", "mountPath": "/etc/redis-ca", "readOnly": True}],
        "config": {"extraEnv": {"RINGSERVE_REDIS_CA_CERT": "/etc/redis-ca/ca.crt"}},
    },
    "gpu-counts": {"prefill": {"cpSize": 4, "tpSize": 2}, "decode": {"kvpSize": 2, "tpSize": 4}},
    "scaled": {
        "router": {"replicas": 2, "service": {"type": "LoadBalancer"}},
        "prefill": {"replicas": 3},
        "decode": {"replicas": 2},
    },
    "pvc-model": {
        "model": {"source": "pvc", "pvc": {"claimName": "weights"}, "path": "Llama-3.1-8B-Instruct"},
        "prefill": {"nodeSelector": {"gpu": "h200"}, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]},
    },
    "tls-cert-manager": {  # certificates from cert-manager; API keys and client certificates required
        "tls": {"enabled": True, "certManager": {"enabled": True, "issuerRef": {"name": "ringserve-ca"}}},
        "apiKeys": {"existingSecret": "api-keys"},
        "tests": {"apiKeySecret": "test-key"},
    },
    "tls-secrets": {  # certificates from Secrets the user made
        "tls": {
            "enabled": True,
            "secrets": {"router": "r-tls", "prefill": "p-tls", "decode": "d-tls", "redis": "x-tls"},
        },
    },
    "planner": {  # with TLS: the planner's own certificate is its client certificate for Redis
        "planner": {
            "enabled": True,
            "dryRun": True,
            "prefill": {"min": 2, "max": 6},
            "prometheusUrl": "http://prometheus.monitoring:9090",
        },
        "tls": {
            "enabled": True,
            "secrets": {r: f"{r}-tls" for r in ("router", "prefill", "decode", "redis", "planner")},
        },
    },
    "hostpath-model-cpu": {
        "gpu": {"enabled": False},
        "model": {"source": "hostPath", "hostPath": {"path": "/data/models"}, "path": "smollm2.gguf"},
        "router": {"service": {"type": "NodePort", "nodePort": 30050}},
    },
}


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_chart_lints_renders_and_validates(helm, tmp_path, name):
    values = VALUE_SETS[name]
    text, docs = render(helm, values, tmp_path)
    done = validate(text, tmp_path)
    assert done.returncode == 0, f"kubernetes-validate --strict rejected the {name} manifests:\n{done.stdout}"

    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    redis = values.get("redis", {}).get("enabled", True)
    assert ("Deployment/rs-ringserve-redis" in kinds) == redis
    for kind in ("ConfigMap", "ServiceAccount", "Service"):
        assert f"{kind}/{FULLNAME}" in kinds or f"{kind}/{FULLNAME}-router" in kinds
    assert sum(k.startswith("PodDisruptionBudget/") for k in kinds) == 3

    router = find(docs, "Deployment", f"{FULLNAME}-router")
    prefill = find(docs, "StatefulSet", f"{FULLNAME}-prefill")
    decode = find(docs, "StatefulSet", f"{FULLNAME}-decode")
    config = find(docs, "ConfigMap", FULLNAME)["data"]
    service = find(docs, "Service", f"{FULLNAME}-router")
    assert service["spec"]["type"] == values.get("router", {}).get("service", {}).get("type", "ClusterIP")
    assert container(router)["command"] == ["ringserve", "router"]
    http = {p["name"]: p for p in service["spec"]["ports"]}["http"]  # the OpenAI-compatible API
    assert http["targetPort"] == "http" and env_of(container(router))["RINGSERVE_HTTP_PORT"] == "8000"
    assert container(prefill)["command"] == ["ringserve", "prefill"]
    assert container(decode)["command"] == ["ringserve", "decode"]

    check_security(values, docs, router, prefill, decode)
    check_planner(values, docs, prefill)
    tls = values.get("tls", {}).get("enabled", False)
    gpu = values.get("gpu", {}).get("enabled", True)
    cp = values.get("prefill", {}).get("cpSize", 2)
    kvp = values.get("decode", {}).get("kvpSize", 1)
    ptp, dtp = (values.get(tier, {}).get("tpSize", 1) for tier in ("prefill", "decode"))
    assert container(prefill)["args"][:4] == ["--cp", str(cp), "--tp", str(ptp)]
    assert container(decode)["args"][:4] == ["--kvp", str(kvp), "--tp", str(dtp)]
    assert router["spec"]["replicas"] == values.get("router", {}).get("replicas", 1)
    for workload in (router, prefill, decode):  # long enough to drain: the drain timeout and time to stop
        drain_s = float(env_of(container(workload))["RINGSERVE_DRAIN_TIMEOUT_S"])
        assert workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= drain_s + 10
    for tier, workload, gpus in (("prefill", prefill, cp * ptp), ("decode", decode, kvp * dtp)):  # the whole group
        limits = container(workload)["resources"]["limits"]
        assert limits.get("nvidia.com/gpu") == (str(gpus) if gpu else None)  # a string: a quantity
        assert workload["spec"]["replicas"] == values.get(tier, {}).get("replicas", 1)
        probes = container(workload)
        if tls:  # the kubelet's gRPC probes speak no TLS: `ringserve health` with the pod's certificate
            assert probes["readinessProbe"]["exec"]["command"][-2:] == ["--service", "ringserve.ready"]
            assert probes["livenessProbe"]["exec"]["command"][-2:] == ["--service", "ringserve.live"]
        else:
            assert probes["readinessProbe"]["grpc"]["service"] == "ringserve.ready"
            assert probes["livenessProbe"]["grpc"]["service"] == "ringserve.live"
    assert config["RINGSERVE_DEVICE"] == ("cuda" if gpu else "cpu")
    assert config["RINGSERVE_DTYPE"] == ("bfloat16" if gpu else "float32")

    if redis:
        assert config["RINGSERVE_REDIS_URL"] == f"{'rediss' if tls else 'redis'}://{FULLNAME}-redis:6379/0"
    else:
        assert config["RINGSERVE_REDIS_URL"] == "rediss://redis.example:6380/0"
        assert config["RINGSERVE_REDIS_CA_CERT"] == "/etc/redis-ca/ca.crt"
        for workload in (router, prefill, decode):
            ref = env_of(container(workload))["RINGSERVE_REDIS_PASSWORD"]["secretKeyRef"]
            assert ref == {"name": "rs-redis", "key": "password"}
            mounts = {m["name"]: m["mountPath"] for m in container(workload)["volumeMounts"]}
            assert mounts["redis-ca"] == "/etc/redis-ca"
    source = values.get("model", {}).get("source", "embedded")
    if source == "embedded":
        assert "RINGSERVE_MODEL" not in config
    else:
        assert config["RINGSERVE_MODEL"] == "/models/" + values["model"]["path"]
        volumes = {v["name"]: v for v in prefill["spec"]["template"]["spec"]["volumes"]}
        assert ("persistentVolumeClaim" if source == "pvc" else "hostPath") in volumes["model"]

    notes = render_notes(helm, values, tmp_path)
    assert f"statefulset/{FULLNAME}-prefill --replicas=N" in notes
    assert "ringserve generate --url" in notes and "<no value>" not in notes

    test_pod = find(docs, "Pod", f"{FULLNAME}-test-request")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert f"{FULLNAME}-router:50050" in test_pod["spec"]["containers"][0]["args"]


def check_security(values: dict, docs: list[dict], router: dict, prefill: dict, decode: dict) -> None:
    """TLS env and volumes per role, plaintext only with RINGSERVE_INSECURE, Redis auth from a file, the
    deployment secret for both tiers, and no secret value on any command line."""
    tls = values.get("tls", {})
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    for role, workload in (("router", router), ("prefill", prefill), ("decode", decode)):
        env = env_of(container(workload))
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        if tls.get("enabled"):
            assert env["RINGSERVE_TLS_CERT"] == "/etc/ringserve/tls/tls.crt" and "RINGSERVE_INSECURE" not in env
            wanted = f"{FULLNAME}-{role}-tls" if tls.get("certManager") else tls["secrets"][role]
            assert volumes["tls"]["secret"]["secretName"] == wanted
        else:
            assert env["RINGSERVE_INSECURE"] == "true" and "tls" not in volumes
        if role != "router":
            ref = env["RINGSERVE_DEPLOYMENT_SECRET"]["secretKeyRef"]
            assert ref["name"] in secrets and ref["key"] == "deployment-secret"
        elif values.get("apiKeys"):
            assert env["RINGSERVE_API_KEYS_FILE"] == "/etc/ringserve/api-keys/api-keys"
            assert volumes["api-keys"]["secret"]["secretName"] == "api-keys"
    if tls.get("certManager"):
        certs = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
        assert certs[f"{FULLNAME}-prefill"]["uris"] == [f"spiffe://ringserve/{FULLNAME}/prefill"]
        assert f"*.{FULLNAME}-decode.default.svc" in certs[f"{FULLNAME}-decode"]["dnsNames"]
        advertised = env_of(container(decode))["RINGSERVE_ADVERTISE_HOST"]
        assert advertised == f"$(POD_NAME).{FULLNAME}-decode.default.svc"
    if values.get("redis", {}).get("enabled", True):
        redis = find(docs, "Deployment", f"{FULLNAME}-redis")
        args = named(redis, "redis")["args"]
        assert args[0] == "/etc/redis-auth/auth.conf" and args[args.index("--protected-mode") + 1] == "yes"
        auth = secrets[f"{FULLNAME}-redis-auth"]["data"]
        password = base64.b64decode(auth["password"]).decode()
        assert base64.b64decode(auth["auth.conf"]).decode() == f"requirepass {password}\n" and len(password) >= 32
        check_redis_tls(values, docs, redis, [router, prefill, decode])
    values_of_secrets = [base64.b64decode(v).decode() for s in secrets.values() for v in s["data"].values()]
    for d in docs:
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            line = " ".join(c.get("command", []) + c.get("args", []))
            assert not any(v.strip() in line for v in values_of_secrets if v.strip())


def named(workload: dict, name: str) -> dict:
    """A workload's container called ``name``."""
    (c,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def check_redis_tls(values: dict, docs: list[dict], redis: dict, services: list[dict]) -> None:
    """The in-chart Redis under tls.enabled: TLS only on 6379, client certificates required, its certificate
    from its Secret (a Certificate naming its Service), the reloader beside it; every client (the planner
    too) presents its pod's certificate and verifies Redis's against the deployment CA."""
    tls = values.get("tls", {})
    args = named(redis, "redis")["args"]
    flags = dict(zip(args[1::2], args[2::2]))
    volumes = {v["name"]: v for v in redis["spec"]["template"]["spec"]["volumes"]}
    containers = [c["name"] for c in redis["spec"]["template"]["spec"]["containers"]]
    if not tls.get("enabled"):
        assert "--tls-port" not in args and "tls" not in volumes and containers == ["redis"]
        return
    assert (flags["--port"], flags["--tls-port"], flags["--tls-auth-clients"]) == ("0", "6379", "yes")
    assert (
        flags["--tls-cert-file"] == "/etc/redis-tls/tls.crt" and flags["--tls-ca-cert-file"] == "/etc/redis-tls/ca.crt"
    )
    wanted = f"{FULLNAME}-redis-tls" if tls.get("certManager") else tls["secrets"]["redis"]
    assert volumes["tls"]["secret"]["secretName"] == wanted and containers == ["redis", "tls-reload"]
    reload = named(redis, "tls-reload")
    assert env_of(reload)["REDISCLI_AUTH"]["secretKeyRef"] == {"name": f"{FULLNAME}-redis-auth", "key": "password"}
    assert "CONFIG SET tls-cert-file" in reload["args"][0]
    if tls.get("certManager"):
        certs = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
        assert f"{FULLNAME}-redis" in certs[f"{FULLNAME}-redis"]["dnsNames"]
    planner = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"{FULLNAME}-planner"]
    for workload in services + planner:
        env = env_of(container(workload))
        assert env["RINGSERVE_REDIS_CA_CERT"] == "/etc/ringserve/tls/ca.crt"
        assert (env["RINGSERVE_REDIS_CLIENT_CERT"], env["RINGSERVE_REDIS_CLIENT_KEY"]) == (
            "/etc/ringserve/tls/tls.crt",
            "/etc/ringserve/tls/tls.key",
        )
        mounts = {m["name"]: m["mountPath"] for m in container(workload)["volumeMounts"]}
        assert mounts["tls"] == "/etc/ringserve/tls"
    for workload in planner:
        wanted = f"{FULLNAME}-planner-tls" if tls.get("certManager") else tls["secrets"]["planner"]
        assert workload["spec"]["template"]["spec"]["volumes"] == [{"name": "tls", "secret": {"secretName": wanted}}]


def check_planner(values: dict, docs: list[dict], prefill: dict) -> None:
    """planner.enabled: its Deployment and flags, a Role that allows the two StatefulSets' scale subresource
    and reading them, nothing else, bound to its own ServiceAccount; groups advertise their pod DNS names."""
    planner = values.get("planner", {})
    names = {f"{d['kind']}/{d['metadata']['name']}" for d in docs}
    if not planner.get("enabled"):
        assert not any(n.endswith(f"/{FULLNAME}-planner") for n in names)
        return
    statefulsets = [f"{FULLNAME}-prefill", f"{FULLNAME}-decode"]
    assert find(docs, "Role", f"{FULLNAME}-planner")["rules"] == [
        {"apiGroups": ["apps"], "resources": ["statefulsets"], "resourceNames": statefulsets, "verbs": ["get"]},
        {
            "apiGroups": ["apps"],
            "resources": ["statefulsets/scale"],
            "resourceNames": statefulsets,
            "verbs": ["get", "patch"],
        },
    ]
    binding = find(docs, "RoleBinding", f"{FULLNAME}-planner")
    assert binding["roleRef"]["name"] == f"{FULLNAME}-planner"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{FULLNAME}-planner", "namespace": "default"}]
    deployment = find(docs, "Deployment", f"{FULLNAME}-planner")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == f"{FULLNAME}-planner" and pod["automountServiceAccountToken"] is True
    c = container(deployment)
    assert c["command"] == ["ringserve", "planner"]
    args = dict(zip(c["args"][::2], c["args"][1::2]))
    assert args["--prefill-statefulset"] == statefulsets[0] and args["--decode-statefulset"] == statefulsets[1]
    assert (args["--prefill-min"], args["--prefill-max"]) == ("2", "6") and "--dry-run" in c["args"]
    assert args["--prometheus-url"] == "http://prometheus.monitoring:9090" and "--prometheus-query" not in args
    assert env_of(c)["RINGSERVE_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env_of(container(prefill))["RINGSERVE_ADVERTISE_HOST"] == f"$(POD_NAME).{FULLNAME}-prefill.default.svc"


@pytest.mark.parametrize("kube_version", ["1.29.0", "1.33.0", "1.37.0"])
def test_chart_validates_for_each_supported_version(helm, tmp_path, kube_version):
    """Rendered for a cluster of this version (what `.Capabilities` says there), valid against its schemas."""
    text, docs = render(helm, VALUE_SETS["planner"], tmp_path, kube_version=kube_version)
    done = validate(text, tmp_path, kube_version)
    assert done.returncode == 0, f"kubernetes-validate --strict -k {kube_version} rejected:\n{done.stdout}"
    pre_stop = container(find(docs, "Deployment", f"{FULLNAME}-router"))["lifecycle"]["preStop"]
    assert pre_stop == (
        {"exec": {"command": ["sleep", "5"]}} if kube_version == "1.29.0" else {"sleep": {"seconds": 5}}
    )


def test_chart_falls_back_on_older_clusters(helm, tmp_path):
    """On 1.20 (the API server tests/test_kube.py runs): policy/v1beta1 PDBs, `ringserve health` exec probes,
    an exec sleep before the router stops; below the declared kubeVersion, helm refuses."""
    _, docs = render(helm, {}, tmp_path, kube_version="1.20.2")
    assert sorted(d["apiVersion"] for d in docs if d["kind"] == "PodDisruptionBudget") == ["policy/v1beta1"] * 3
    for kind, name, port in (("Deployment", "router", 50050), ("StatefulSet", "prefill", 50051)):
        c = container(find(docs, kind, f"{FULLNAME}-{name}"))
        for probe, service in (
            ("startupProbe", "ringserve.live"),
            ("readinessProbe", "" if name == "router" else "ringserve.ready"),
        ):
            assert "grpc" not in c[probe]
            assert c[probe]["exec"]["command"] == ["ringserve", "health", "--port", str(port), "--service", service]
    pre_stop = container(find(docs, "Deployment", f"{FULLNAME}-router"))["lifecycle"]["preStop"]
    assert pre_stop == {"exec": {"command": ["sleep", "5"]}}
    done = run_helm(helm, "template", RELEASE, str(CHART), "--kube-version", "1.19.0", check=False)
    assert done.returncode != 0 and "kubeVersion" in done.stderr, done.stderr


def test_validation_rejects_broken_manifests_and_values(helm, tmp_path):
    """The checks above can fail: kubernetes-validate --strict rejects an unknown field and a wrong type
    in otherwise rendered manifests, and the values schema rejects bad values before anything renders."""
    text, docs = render(helm, {}, tmp_path)
    prefill = find(docs, "StatefulSet", f"{FULLNAME}-prefill")
    container(prefill)["gpus"] = 2  # not a Container field
    done = validate(yaml.safe_dump(prefill), tmp_path)
    assert done.returncode != 0 and "gpus" in done.stdout, done.stdout
    del container(prefill)["gpus"]
    assert validate(yaml.safe_dump(prefill), tmp_path).returncode == 0
    prefill["spec"]["replicas"] = "two"
    done = validate(yaml.safe_dump(prefill), tmp_path)
    assert done.returncode != 0 and "two" in done.stdout, done.stdout

    bad_values = {
        "cp-zero": ({"prefill": {"cpSize": 0}}, "cpSize"),
        "typo": ({"prefil": {"replicas": 2}}, "prefil"),
        "external-redis-without-url": ({"redis": {"enabled": False}}, "url"),
        "pvc-without-path": ({"model": {"source": "pvc", "pvc": {"claimName": "w"}}}, "path"),
        "policy": ({"router": {"policy": "random"}}, "policy"),
        "planner-hysteresis": ({"planner": {"enabled": True, "scaleDownBelow": 1.5}}, "scaleDownBelow"),
    }
    for name, (values, word) in bad_values.items():
        values_file = tmp_path / f"{name}.yaml"
        values_file.write_text(yaml.safe_dump(values))
        done = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(values_file), check=False)
        assert done.returncode != 0 and word in done.stdout + done.stderr, f"{name}: {done.stdout}{done.stderr}"
    values_file = tmp_path / "tls-redis-without-secret.yaml"  # `required` fails the render (lint only logs it)
    values_file.write_text(
        yaml.safe_dump({"tls": {"enabled": True, "secrets": {"router": "r", "prefill": "p", "decode": "d"}}})
    )
    done = run_helm(helm, "template", RELEASE, str(CHART), "-f", str(values_file), check=False)
    assert done.returncode != 0 and "tls.secrets.redis (a Secret with tls.crt" in done.stderr, done.stderr


# The LeaderWorkerSet's own fields, from the LWS v1 API reference (leaderworkerset.x-k8s.io/v1): only the ones the
# chart renders, nothing else allowed. The upstream CRD is not vendored (1.2 MB, not ours); the pod templates inside
# are validated as core/v1 PodTemplates by kubernetes-validate instead.
_POD_TEMPLATE = {"type": "object", "required": ["metadata", "spec"]}
LWS_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"},
        "kind": {"const": "LeaderWorkerSet"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["replicas", "leaderWorkerTemplate"],
            "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                "rolloutStrategy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "type": {"const": "RollingUpdate"},
                        "rollingUpdateConfiguration": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "maxUnavailable": {"type": ["integer", "string"]},
                                "maxSurge": {"type": ["integer", "string"]},
                            },
                        },
                    },
                },
                "leaderWorkerTemplate": {
                    "type": "object",
                    "required": ["size", "workerTemplate"],
                    "additionalProperties": False,
                    "properties": {
                        "size": {"type": "integer", "minimum": 1},
                        "restartPolicy": {"enum": ["RecreateGroupOnPodRestart", "None"]},
                        "leaderTemplate": _POD_TEMPLATE,
                        "workerTemplate": _POD_TEMPLATE,
                    },
                },
            },
        },
    },
}

SPAN_HOSTS = {
    "gpu": {"enabled": False},
    "prefill": {"spanHosts": True, "cpSize": 2, "replicas": 2, "extraArgs": ["--calibrate-tokens", "256"]},
    "decode": {"spanHosts": True, "kvpSize": 2, "extraArgs": ["--shard-tokens", "32"]},
}


def leader_and_worker(lws: dict) -> tuple[dict, dict]:
    """The leader's and the worker's pod template of a LeaderWorkerSet."""
    t = lws["spec"]["leaderWorkerTemplate"]
    return t["leaderTemplate"], t["workerTemplate"]


def pod_container(template: dict) -> dict:
    (c,) = template["spec"]["containers"]
    return c


@pytest.mark.parametrize("kube_version", ["1.29.0", "1.33.0", "1.37.0"])
def test_span_hosts_renders_leader_worker_sets(helm, tmp_path, kube_version):
    """spanHosts: each tier a LeaderWorkerSet of `replicas` groups, one pod per CP/KVP rank holding its TP group
    (tpSize GPUs, a process each); the leader serves gRPC with the usual probes and runs world ranks 0..tp-1 at its
    pod IP, the workers join it by the controller's LWS_* env. The LWS's fields pass the API reference's schema; its
    pod templates, and everything else, kubernetes-validate."""
    import jsonschema

    values = {
        **SPAN_HOSTS,
        "gpu": {"enabled": True},
        "prefill": {**SPAN_HOSTS["prefill"], "tpSize": 4},
        "decode": {**SPAN_HOSTS["decode"], "tpSize": 2},
    }
    text, docs = render(helm, values, tmp_path, kube_version=kube_version)
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    groups = {d["metadata"]["name"]: d for d in docs if d["kind"] == "LeaderWorkerSet"}
    assert sorted(groups) == [f"{FULLNAME}-decode", f"{FULLNAME}-prefill"]
    templates = []
    for tier, flag, replicas, port, group_port, tp in (
        ("prefill", "--cp", 2, 50051, 29500, "4"),
        ("decode", "--kvp", 1, 50061, 29501, "2"),
    ):
        lws = groups[f"{FULLNAME}-{tier}"]
        jsonschema.validate(lws, LWS_SCHEMA)
        assert (lws["spec"]["replicas"], lws["spec"]["leaderWorkerTemplate"]["size"]) == (replicas, 2)
        assert lws["spec"]["startupPolicy"] == "LeaderCreated", "a leader is ready only once its workers joined"
        leader, worker = leader_and_worker(lws)
        for role, template in (("leader", leader), ("worker", worker)):
            templates.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{tier}-{role}"}})
            templates[-1]["template"] = template
            c = pod_container(template)
            assert c["command"] == ["ringserve", tier] and c["args"][:4] == [flag, "2", "--tp", tp]
            assert c["resources"]["limits"]["nvidia.com/gpu"] == tp, "a TP group, a GPU per rank, per pod"
            env = env_of(c)
            assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
            assert env["RINGSERVE_GROUP_PORT"] == str(group_port)
            assert env["RINGSERVE_DEPLOYMENT_SECRET"]["secretKeyRef"]["key"] == "deployment-secret"
        leader_c, worker_c = pod_container(leader), pod_container(worker)
        args = leader_c["args"]
        assert args[args.index("--local-ranks") + 1] == tp and args[args.index("--group-host") + 1] == "$(POD_IP)"
        assert leader_c["readinessProbe"]["grpc"] == {"port": port, "service": "ringserve.ready"}
        assert {p["name"]: p["containerPort"] for p in leader_c["ports"]}["rank-link"] == group_port
        args = worker_c["args"]
        assert args[args.index("--group-rank") + 1] == "$(LWS_WORKER_INDEX)"
        assert args[args.index("--local-ranks") + 1] == tp, "the pod's TP group: world ranks R*tp .. R*tp+tp-1"
        assert args[args.index("--group-leader") + 1] == "$(LWS_LEADER_ADDRESS):$(RINGSERVE_GROUP_PORT)"
        assert not any(k in worker_c for k in ("startupProbe", "livenessProbe", "readinessProbe")), "no gRPC there"
        if tier == "decode":  # world rank r's KV receiver: kvPort + r, ranks 0 and 1 (TP 2) in the leader pod
            assert [p["containerPort"] for p in leader_c["ports"] if p["name"].startswith("kv-")] == [50062, 50063]
            assert [p["containerPort"] for p in worker_c["ports"]] == [50064, 50065]

    others = [d for d in docs if d["kind"] != "LeaderWorkerSet"]
    done = validate(yaml.safe_dump_all(others + templates), tmp_path, kube_version)
    assert done.returncode == 0, f"kubernetes-validate --strict -k {kube_version} rejected:\n{done.stdout}"
    notes = render_notes(helm, values, tmp_path)
    assert f"lws/{FULLNAME}-prefill --replicas=N" in notes and f"lws/{FULLNAME}-decode --replicas=N" in notes

    # The checks can fail: a field the LWS API does not have, and a wrong restart policy.
    lws = groups[f"{FULLNAME}-prefill"]
    for path, bad in ((("spec",), {"groups": 2}), (("spec", "leaderWorkerTemplate"), {"restartPolicy": "Always"})):
        broken = json.loads(json.dumps(lws))
        target = broken
        for key in path:
            target = target[key]
        target.update(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, LWS_SCHEMA)
    # The planner scales StatefulSets only: spanned tiers with the planner on are refused with a clear message.
    values_file = tmp_path / "span-planner.yaml"
    values_file.write_text(yaml.safe_dump({**values, "planner": {"enabled": True}}))
    done = run_helm(helm, "template", RELEASE, str(CHART), "-f", str(values_file), check=False)
    assert done.returncode != 0 and "planner scales StatefulSets only" in done.stderr, done.stderr


# --- Running what the chart renders ------------------------------------------------------------------


def resolved_env(c: dict, config: dict, secrets: dict, pod: dict[str, str] | None = None) -> dict[str, str]:
    """A container's environment as the kubelet builds it: what the controller injected (``pod``: LWS_* for a
    LeaderWorkerSet's pods), envFrom, then env, each value's $(VAR) expanded from those defined before it; the
    downward API's pod IP is POD_IP of ``pod`` (default: this machine's loopback), Secret references take the
    test's secrets."""
    pod = {"POD_IP": "127.0.0.1", **(pod or {})}
    env = {k: v for k, v in pod.items() if k.startswith("LWS_")}
    for source in c.get("envFrom", []):
        assert source["configMapRef"]["name"] == FULLNAME
        env.update(config)
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "fieldRef" in e["valueFrom"]:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            env[e["name"]] = pod["POD_IP"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion of args and env values: a defined variable's value, $$ a literal $, an
    undefined reference left as it is."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        text,
    )


class Pod:
    """One rendered container run as a local process: its command and args verbatim ($(VAR)s expanded as the
    kubelet does), its env resolved, with only the ports replaced by free ones (all pods share this machine's
    network) unless ``pod`` sets them, as it sets POD_IP and the LWS_* variables."""

    def __init__(
        self, name: str, template: dict, config: dict, secrets: dict, log_dir: Path, pod: dict[str, str] | None = None
    ):
        c = pod_container(template)
        self.name = name
        self.env = resolved_env(c, config, secrets, pod)
        for port_var in ("RINGSERVE_PORT", "RINGSERVE_METRICS_PORT", "RINGSERVE_KV_PORT", "RINGSERVE_HTTP_PORT"):
            if port_var in self.env:
                self.env[port_var] = str(free_port())
        self.env.update({k: v for k, v in (pod or {}).items() if k.startswith("RINGSERVE_")})
        self.port = int(self.env["RINGSERVE_PORT"])
        self.address = f"127.0.0.1:{self.port}"
        probes = ("startupProbe", "livenessProbe", "readinessProbe")
        self.probes = {k: c[k]["grpc"] for k in probes if k in c}  # none: a joining rank serves no gRPC
        assert all(p["port"] == int(c["ports"][0]["containerPort"]) for p in self.probes.values())
        executable = shutil.which(c["command"][0], path=str(Path(sys.executable).parent))
        assert executable, f"the {c['command'][0]} console script is not installed next to {sys.executable}"
        argv = [executable, *c["command"][1:], *(expand(a, self.env) for a in c.get("args", []))]
        # The container's environment is the image's (PATH, HOME, ...) plus what the pod spec sets.
        base = {k: v for k, v in os.environ.items() if not k.startswith("RINGSERVE_")}
        base["RINGSERVE_CACHE_DIR"] = os.environ["RINGSERVE_CACHE_DIR"]  # the session's model cache
        self.log = log_dir / f"{name}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(argv, env={**base, **self.env}, stdout=out, stderr=subprocess.STDOUT)

    def probe(self, kind: str) -> bool:
        """The rendered probe, as the kubelet sends it: a gRPC health Check on its service name."""
        with grpc.insecure_channel(self.address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=self.probes[kind].get("service", "")), timeout=5
                )
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_ready(self, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.probe("readinessProbe"):
            assert self.proc.poll() is None, f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
            assert time.monotonic() < deadline, f"{self.name} not ready in {timeout_s} s:\n{self.tail()}"
            time.sleep(0.2)

    def metric(self, sample: str) -> float:
        url = f"http://127.0.0.1:{self.env['RINGSERVE_METRICS_PORT']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(sample + " "):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def active_requests(self) -> int:
        with grpc.insecure_channel(self.address) as channel:
            stub = prefill_pb2_grpc.PrefillStub(channel)
            return stub.GetInfo(prefill_pb2.GetPrefillInfoRequest(), timeout=10).active_requests

    def tail(self) -> str:
        return "".join(self.log.read_text().splitlines(keepends=True)[-30:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def api_objects(docs: list[dict]) -> tuple[dict, dict]:
    """The ConfigMap's data and the Secrets as the API server would hold them: the chart's own (the deployment
    secret) plus the external Redis's password Secret the run tests' values name."""
    secrets = {"redis-auth": {"password": REDIS_PASSWORD}}
    for d in docs:
        if d["kind"] == "Secret":
            secrets[d["metadata"]["name"]] = {k: base64.b64decode(v).decode() for k, v in d["data"].items()}
    return find(docs, "ConfigMap", FULLNAME)["data"], secrets


REDIS_PASSWORD = "s3cret-test"
LEADER_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"  # two "hosts" (all of 127.0.0.0/8 is loopback)


def test_rendered_leader_worker_sets_serve_exact_tokens(helm, tmp_path, gqa_dir):
    """The TP 2 x CP 2 prefill and KVP 2 decode LeaderWorkerSets the chart renders (conftest's small GQA model),
    each pod run as the LWS controller and the kubelet would start it: the leaders on one "host", the workers on
    another, given LWS_LEADER_ADDRESS, LWS_WORKER_INDEX and their pod IPs; the prefill worker pod runs CP rank 1's
    TP group (world ranks 2 and 3). With the rendered router they serve the single-process engine's tokens, and
    the workers end when their leaders stop."""
    from ringserve import rpc
    from ringserve.engine.engine import Engine
    from ringserve.engine.model import Llama
    from ringserve.engine.sampling import SamplingParams
    from ringserve.engine.tokenizer import Tokenizer
    from ringserve.v1 import decode_pb2, decode_pb2_grpc

    redis = EmbeddedRedis(password=REDIS_PASSWORD).start()
    values = {
        **SPAN_HOSTS,
        "prefill": {**SPAN_HOSTS["prefill"], "replicas": 1, "tpSize": 2},
        "model": {"source": "image", "path": str(gqa_dir)},
        "redis": {"enabled": False, "external": {"url": redis.url, "existingSecret": "redis-auth"}},
        "config": {"extraEnv": {"RINGSERVE_GROUP_TIMEOUT_S": "300"}},  # seven processes loading on two cores
    }
    _, docs = render(helm, values, tmp_path)
    config, secrets = api_objects(docs)
    leaders, workers = {}, []
    router = None
    try:
        for tier in ("prefill", "decode"):
            lws = find(docs, "LeaderWorkerSet", f"{FULLNAME}-{tier}")
            leader, worker = leader_and_worker(lws)
            size = lws["spec"]["leaderWorkerTemplate"]["size"]
            # Group 0: LWS_LEADER_ADDRESS names the leader pod (its DNS name there, its IP here).
            group = {"LWS_LEADER_ADDRESS": LEADER_IP, "LWS_GROUP_SIZE": str(size)}
            group["RINGSERVE_GROUP_PORT"] = str(free_port(LEADER_IP))
            if tier == "decode":  # one base port for the group: rank r listens on it + r, on its own host
                group["RINGSERVE_KV_PORT"] = str(free_port())
            leaders[tier] = Pod(
                f"{tier}-0", leader, config, secrets, tmp_path, {**group, "POD_IP": LEADER_IP, "LWS_WORKER_INDEX": "0"}
            )
            for index in range(1, size):
                pod = {**group, "POD_IP": WORKER_IP, "LWS_WORKER_INDEX": str(index)}
                workers.append(Pod(f"{tier}-0-{index}", worker, config, secrets, tmp_path, pod))
        router_template = find(docs, "Deployment", f"{FULLNAME}-router")["spec"]["template"]
        router = Pod("router", router_template, config, secrets, tmp_path)
        for pod in (*leaders.values(), router):
            pod.wait_ready(timeout_s=400)

        with rpc.channel(f"{LEADER_IP}:{leaders['decode'].port}") as channel:
            stub = decode_pb2_grpc.DecodeStub(channel)
            reserved = stub.Reserve(decode_pb2.ReserveRequest(request_id="where", prompt_tokens=100, max_tokens=4))
            # Rank 1's KV receiver is in the worker pod, at the pod IP the downward API gave it.
            assert sorted(t.address.rsplit(":", 1)[0] for t in reserved.targets) == [LEADER_IP, WORKER_IP]
            assert stub.Release(decode_pb2.ReleaseRequest(request_id="where", landing_unused=True)).released
        engine = Engine(Llama.load(gqa_dir, progress=False), Tokenizer.from_checkpoint(gqa_dir))
        tokenizer = engine.tokenizer
        with Client(router.address, timeout=180) as client:
            for prompt in ("The capital of France is", "Once upon a time " * 40):  # the long one: every rank
                ids = [e.token_id for e in engine.generate(tokenizer.encode(prompt), SamplingParams(max_tokens=12))]
                got = [t for chunk in client.generate(prompt, max_tokens=12) for t in chunk.token_ids]
                assert got == ids, prompt
        router.stop()
        for pod in leaders.values():
            pod.stop()
        for pod, ranks in zip(workers, ([2, 3], [1])):  # a worker ends when its leader hangs up
            assert pod.proc.wait(timeout=60) == 0, pod.tail()
            for rank in ranks:
                assert f"rank {rank} joined its leader at {LEADER_IP}:" in pod.log.read_text(), pod.tail()
    finally:
        for pod in [router, *leaders.values(), *workers]:
            if pod is not None:
                pod.stop()
        redis.stop()


PREFILL_OK = 'ringserve_requests_total{method="Prefill",service="prefill",status="OK"}'


@pytest.fixture(scope="module")
def deployment(helm, tmp_path_factory):
    """The chart rendered for a CPU cluster with an external, password-protected Redis (a real one
    here, its password in the Secret the values name), and its router, prefill and decode pods running."""
    tmp = tmp_path_factory.mktemp("helm-run")
    redis = EmbeddedRedis(password=REDIS_PASSWORD).start()
    values = {
        "gpu": {"enabled": False},
        "prefill": {"cpSize": 1},  # two cores here: one rank per group
        "redis": {"enabled": False, "external": {"url": redis.url, "existingSecret": "redis-auth"}},
    }
    _, docs = render(helm, values, tmp)
    config, secrets = api_objects(docs)
    workloads = {
        "decode": find(docs, "StatefulSet", f"{FULLNAME}-decode"),
        "prefill": find(docs, "StatefulSet", f"{FULLNAME}-prefill"),
        "router": find(docs, "Deployment", f"{FULLNAME}-router"),
    }
    pods = {}
    try:
        for name, workload in workloads.items():  # all at once, as the cluster starts them
            pods[name] = Pod(name, workload["spec"]["template"], config, secrets, tmp)
        for pod in pods.values():
            pod.wait_ready()
        notes = render_notes(helm, values, tmp)
        yield {"docs": docs, "config": config, "secrets": secrets, "pods": pods, "tmp": tmp, "notes": notes}
    finally:
        for pod in pods.values():
            pod.stop()
        redis.stop()


def test_rendered_pods_serve_a_request(deployment):
    pods = deployment["pods"]
    for pod in pods.values():
        assert pod.probe("livenessProbe") and pod.probe("startupProbe"), pod.name
    # The helm test pod's command, with the router Service's name resolved to the router here.
    test_pod = find(deployment["docs"], "Pod", f"{FULLNAME}-test-request")["spec"]["containers"][0]
    args = [a.replace(f"{FULLNAME}-router:50050", pods["router"].address) for a in test_pod["args"]]
    executable = shutil.which(test_pod["command"][0], path=str(Path(sys.executable).parent))
    done = subprocess.run([executable, *test_pod["command"][1:], *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(" Paris"), done.stdout
    # NOTES.txt's first request, through `kubectl port-forward svc/...-router 50050:50050` (here: the router).
    (line,) = [x for x in deployment["notes"].splitlines() if x.strip().startswith("ringserve generate --url 127")]
    argv = [a.replace("127.0.0.1:50050", pods["router"].address) for a in shlex.split(line)]
    done = subprocess.run([executable, *argv[1:]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Paris" in done.stdout, done.stdout + done.stderr
    # NOTES.txt's first HTTP request, through the port-forward of the router Service's http port.
    (line,) = [x for x in deployment["notes"].splitlines() if x.strip().startswith("curl http://127")]
    http = f"127.0.0.1:{pods['router'].env['RINGSERVE_HTTP_PORT']}"
    if shutil.which("curl"):
        done = subprocess.run(shlex.split(line.replace("127.0.0.1:8000", http)), capture_output=True, text=True)
        assert done.returncode == 0 and "Paris" in json.loads(done.stdout)["choices"][0]["text"], done.stdout
    with Client(pods["router"].address, timeout=60) as client:
        info = client.model_info()
        assert (info.prefill_groups, info.decode_groups) == (1, 1)


def test_exec_probes_of_older_clusters_pass_on_running_pods(deployment, helm):
    """The `ringserve health` exec probes the chart renders for 1.20 (no gRPC probes there), run as the kubelet
    runs them in each container (its env; the port replaced by the pod's here): each passes."""
    values = {"gpu": {"enabled": False}, "prefill": {"cpSize": 1}}
    _, docs = render(helm, values, deployment["tmp"], name="values-1.20", kube_version="1.20.2")
    workloads = {
        "router": ("Deployment", "router"),
        "prefill": ("StatefulSet", "prefill"),
        "decode": ("StatefulSet", "decode"),
    }
    for name, pod in deployment["pods"].items():
        kind, suffix = workloads[name]
        c = container(find(docs, kind, f"{FULLNAME}-{suffix}"))
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = c[probe]["exec"]["command"]
            command[command.index("--port") + 1] = str(pod.port)
            executable = shutil.which(command[0], path=str(Path(sys.executable).parent))
            base = {k: v for k, v in os.environ.items() if not k.startswith("RINGSERVE_")}
            done = subprocess.run(
                [executable, *command[1:]], env={**base, **pod.env}, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0 and done.stdout.strip() == "SERVING", (
                f"{name} {probe}: {done.stdout}{done.stderr}"
            )


def test_scaled_prefill_pod_gets_traffic_and_drains_on_sigterm(deployment):
    """`kubectl scale statefulset/...-prefill --replicas=2`: a second pod from the same spec joins and gets
    traffic within 5 s of becoming ready, nothing restarted. Then it is deleted as a scale-down does
    (SIGTERM) while it prefills a request: no request fails, it turns unready, exits within its grace period."""
    pods = deployment["pods"]
    prefill = find(deployment["docs"], "StatefulSet", f"{FULLNAME}-prefill")
    second = Pod(
        "prefill-1", prefill["spec"]["template"], deployment["config"], deployment["secrets"], deployment["tmp"]
    )
    try:
        second.wait_ready()
        ready = time.monotonic()
        with Client(pods["router"].address, timeout=60) as client:
            while second.metric(PREFILL_OK) == 0:
                assert time.monotonic() - ready < 5.0, "a new prefill pod gets traffic within 5 s"
                assert client.complete("The capital of France is", max_tokens=1)
            assert client.model_info().prefill_groups == 2
        assert all(p.proc.poll() is None for p in pods.values()), "nothing restarted"

        results, errors = [], []

        def request(i: int, prompt_tokens: int = 1000) -> None:
            prompt = [100 + (i * 7 + j) % 900 for j in range(prompt_tokens)]  # a different prompt each: no cache hits
            try:
                with Client(pods["router"].address, timeout=120) as client:
                    ids = [t for c in client.generate(token_ids=prompt, max_tokens=2) for t in c.token_ids]
                    results.append(len(ids))
            except grpc.RpcError as e:
                errors.append(f"{e.code().name}: {e.details()}")

        threads: list[threading.Thread] = []
        deadline = time.monotonic() + 60
        while not second.active_requests():  # long prompts until one is prefilling on the second pod
            assert time.monotonic() < deadline, "no request reached the second prefill pod"
            if not any(t.is_alive() for t in threads):
                threads += [threading.Thread(target=request, args=(len(threads) + k,)) for k in range(2)]
                threads[-2].start()
                threads[-1].start()
            time.sleep(0.05)
        terminated = time.monotonic()
        second.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert second.proc.poll() is None, "it drains before exiting"
        assert not second.probe("readinessProbe"), "a draining pod is not ready"
        assert second.probe("livenessProbe"), "a draining pod is alive: the kubelet must not kill it"
        more = [threading.Thread(target=request, args=(100 + k, 64)) for k in range(2)]  # arrive during the drain
        for t in more:
            t.start()
        for t in threads + more:
            t.join(timeout=180)
        grace_s = prefill["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert second.proc.wait(timeout=grace_s) == 0, second.tail()
        assert time.monotonic() - terminated < grace_s
        assert errors == [] and results == [2] * len(threads + more), (errors, results)
        with Client(pods["router"].address, timeout=60) as client:
            assert client.complete("The capital of France is", max_tokens=4).startswith(" Paris")
    finally:
        second.stop()


def test_router_finishes_running_streams_on_sigterm(deployment):
    """A router pod deleted (rolling update, scale-down) finishes the streams it serves within its grace
    period and takes no new requests. Runs last: it stops the module's router."""
    router = deployment["pods"]["router"]
    grace_s = find(deployment["docs"], "Deployment", f"{FULLNAME}-router")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    tokens, started = [], threading.Event()

    def stream() -> None:
        with Client(router.address, timeout=120) as client:
            for chunk in client.generate(prompt="Tell me a story.", max_tokens=20, ignore_eos=True):
                tokens.extend(chunk.token_ids)
                started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(timeout=60), "the stream started"
    terminated = time.monotonic()
    router.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert not router.probe("readinessProbe"), "a stopping router is not ready"
    with Client(router.address, timeout=10) as client, pytest.raises(grpc.RpcError) as refused:
        client.complete("The capital of France is", max_tokens=1)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    thread.join(timeout=grace_s)
    assert len(tokens) == 20, "the running stream finished"
    assert router.proc.wait(timeout=grace_s) == 0
    assert time.monotonic() - terminated < grace_s


def health_check(port: int, service: str) -> str:
    """What a kubelet gRPC probe sees: SERVING, NOT_SERVING, or an error code name (NOT_FOUND: unknown name)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_probe_health_names_follow_registration_drain_and_failure(redis_server):
    """The names the chart's probes check, on real gRPC servers and a real Redis: ``ringserve.ready``
    turns SERVING when Redis accepts the registration (never without it) and NOT_SERVING on drain;
    ``ringserve.live`` stays SERVING while draining and fails once the server gives up."""
    from ringserve.config import WorkerArgs
    from ringserve.drain import Drain, DrainGate
    from ringserve.heartbeat import Registration
    from ringserve.registry_schema import Load
    from ringserve.rpc import LIVE, READY, start_server

    servers = []
    try:
        for redis_url in (redis_server.url, f"redis://127.0.0.1:{free_port()}/0"):  # reachable, then not
            server, port, health = start_server([], [], "127.0.0.1", 0)
            servers.append(server)
            assert health_check(port, LIVE) == "SERVING" and health_check(port, READY) == "NOT_FOUND"
            cfg = WorkerArgs(redis_url=redis_url, cluster=f"helm-probes-{port}")
            registration = Registration(cfg, "prefill", 1, 64, Load).start(f"127.0.0.1:{port}")
            drain = Drain(registration, DrainGate("test group", []), health, timeout_s=5)
            if redis_url != redis_server.url:
                assert health_check(port, READY) == "NOT_FOUND", "not registered: not ready"
                registration.stop()
                continue
            assert health_check(port, READY) == "SERVING"
            drain()
            assert health_check(port, READY) == "NOT_SERVING" and health_check(port, "") == "NOT_SERVING"
            assert health_check(port, LIVE) == "SERVING", "alive while draining"

        server, port, health = start_server([], [], "127.0.0.1", 0)
        servers.append(server)
        health.enter_graceful_shutdown()  # what a prefill group does when it breaks
        assert health_check(port, LIVE) == "NOT_SERVING", "a broken server fails liveness: restarted"
    finally:
        for server in servers:
            server.stop(grace=0)


def test_rendered_redis_serves_tls_only_and_loads_renewed_certificates(helm, tmp_path, tls_redis_binary, monkeypatch):
    """The in-chart Redis of a tls.enabled render, its two containers run as the kubelet would start them
    (Debian's TLS-capable redis-server and redis-cli for the image's; the mounted Secrets as local
    directories, port 6379 a free one): the rendered router's Redis settings (URL, password, CA, its
    certificate) reach it; a client without a certificate is refused; and once the mounted certificate is
    renewed, the tls-reload container has Redis serve the new one to new connections, without a restart."""
    import socket
    import ssl

    import redis as redis_client
    from cryptography import x509

    from ringserve.config import RedisArgs, config_from_args
    from ringserve.registry import connect
    from tests.certs import CA

    secret_names = {r: f"{r}-tls" for r in ("router", "prefill", "decode", "redis")}
    values = {"tls": {"enabled": True, "secrets": secret_names}, "redis": {"certReloadSeconds": 1}}
    _, docs = render(helm, values, tmp_path)
    config, secrets = api_objects(docs)
    redis = find(docs, "Deployment", f"{FULLNAME}-redis")
    port, ca = free_port(), CA(tmp_path / "ca")
    mounts = {"/etc/redis-auth": tmp_path / "redis-auth", "/etc/redis-tls": tmp_path / "redis-tls"}
    mounts["/etc/ringserve/tls"] = tmp_path / "router-tls"
    for path in mounts.values():
        path.mkdir()
    for name, text in secrets[f"{FULLNAME}-redis-auth"].items():  # the generated Secret's files
        (mounts["/etc/redis-auth"] / name).write_text(text)

    def mount(issued, where: Path) -> None:
        """A TLS Secret's files (tls.crt, tls.key, ca.crt) as the kubelet updates them: each replaced whole."""
        for name, source in (("tls.crt", issued.cert), ("tls.key", issued.key), ("ca.crt", issued.ca)):
            (where / f".{name}").write_bytes(Path(source).read_bytes())
            (where / f".{name}").replace(where / name)

    def local(text: str) -> str:
        for path, directory in mounts.items():
            text = text.replace(path, str(directory))
        return text.replace("6379", str(port)).replace(f"{FULLNAME}-redis:", "127.0.0.1:")

    first = ca.issue("redis-1")  # for 127.0.0.1 and localhost: the Service's name here
    mount(first, mounts["/etc/redis-tls"])
    mount(ca.issue("router", role="router"), mounts["/etc/ringserve/tls"])
    server_c, reload_c = named(redis, "redis"), named(redis, "tls-reload")
    out = (tmp_path / "redis.log").open("w")
    procs = [subprocess.Popen([tls_redis_binary, *map(local, server_c["args"])], stdout=out, stderr=out)]
    reload_env = {"PATH": f"{Path(tls_redis_binary).parent}:{os.environ['PATH']}"}
    reload_env["REDISCLI_AUTH"] = secrets[f"{FULLNAME}-redis-auth"]["password"]
    argv = [*reload_c["command"], *map(local, reload_c["args"])]
    procs.append(subprocess.Popen(argv, env=reload_env, stdout=out, stderr=out))
    try:
        router_env = resolved_env(container(find(docs, "Deployment", f"{FULLNAME}-router")), config, secrets)
        for name, value in router_env.items():
            if name.startswith("RINGSERVE_REDIS_"):
                monkeypatch.setenv(name, local(value))
        cfg = config_from_args(RedisArgs, argparse.Namespace())
        assert cfg.redis_url == f"rediss://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 20
        while True:
            try:
                assert connect(cfg).ping()
                break
            except redis_client.ConnectionError:
                assert time.monotonic() < deadline, (tmp_path / "redis.log").read_text()
                time.sleep(0.1)
        without = dataclasses.replace(cfg, redis_client_cert=None, redis_client_key=None)
        with pytest.raises(redis_client.ConnectionError):
            connect(without).ping()

        def served() -> int:
            """The serial number of the certificate a new connection gets."""
            context = ssl.create_default_context(cafile=cfg.redis_ca_cert)
            context.load_cert_chain(cfg.redis_client_cert, cfg.redis_client_key)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number

        def serial(issued) -> int:
            return x509.load_pem_x509_certificate(Path(issued.cert).read_bytes()).serial_number

        assert served() == serial(first)
        renewed = ca.issue("redis-2")
        mount(renewed, mounts["/etc/redis-tls"])
        deadline = time.monotonic() + 20
        while served() != serial(renewed):
            assert time.monotonic() < deadline, (tmp_path / "redis.log").read_text()
            time.sleep(0.2)
        assert "tls-reload: Redis loaded the changed certificate files" in (tmp_path / "redis.log").read_text()
        assert connect(cfg).ping() and procs[0].poll() is None  # the same server, serving the renewed file
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
        out.close()
