"""The chart and `ringserve planner` against a real Kubernetes API server (v1.20.2, tests/kube.py): helm install,
upgrade, rollback and uninstall; kubectl scale of each tier; the planner's RBAC; the planner scaling each tier on
its own load, written to a real Redis by real registrations of test groups, and on missed deadlines read from a
real Prometheus.

No kubelet runs: the controller manager creates the StatefulSets' pods and they stay Pending, which is all these
tests need (no test needs a pod ready, so none patches pod status). One API server serves the whole module; the
tests run in order on one release, and the last one uninstalls it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helm_tools import helm_binary, kubectl_binary
from tests.kube import KubeCluster, kube_binaries

pytestmark = pytest.mark.timeout(2400)  # the first test may wait for the build .ci/run started (16+ min cold)

CHART = Path(__file__).resolve().parent.parent / "helm" / "ringserve"
NS, RELEASE, FULLNAME = "rs", "rs", "rs-ringserve"
PREFILL, DECODE = f"{FULLNAME}-prefill", f"{FULLNAME}-decode"
VALUES = {"gpu": {"enabled": False}, "prefill": {"cpSize": 1}, "planner": {"enabled": True}}


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    cluster = KubeCluster(kube_binaries(), tmp_path_factory.mktemp("kube"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def api(kube):
    """Admin clients: (AppsV1Api, CoreV1Api)."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(kube.kubeconfig))
    return client.AppsV1Api(api), client.CoreV1Api(api)


def run(kube: KubeCluster, tool: str, *args: str) -> str:
    binary = helm_binary() if tool == "helm" else kubectl_binary()
    env = {
        **os.environ,
        "KUBECONFIG": str(kube.kubeconfig),
        "HELM_CACHE_HOME": str(kube.work / "helm-cache"),
        "HELM_CONFIG_HOME": str(kube.work / "helm-config"),
        "HELM_DATA_HOME": str(kube.work / "helm-data"),
    }
    done = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, f"{tool} {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def wait_for(what: str, check, timeout_s: float = 90):
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.5)
    return result


def pods_of(api, statefulset: str) -> list[str]:
    pods = api[1].list_namespaced_pod(NS, label_selector=f"app.kubernetes.io/component={statefulset.rsplit('-')[-1]}")
    return sorted(p.metadata.name for p in pods.items if p.metadata.deletion_timestamp is None)


def kv_blocks(api, statefulset: str) -> str:
    args = api[0].read_namespaced_stateful_set(statefulset, NS).spec.template.spec.containers[0].args
    return args[args.index("--kv-blocks") + 1]


@pytest.fixture(scope="module")
def release(kube, api, tmp_path_factory):
    """helm install of the chart (CPU, planner on) into namespace rs; its StatefulSets' first pods exist."""
    values = tmp_path_factory.mktemp("values") / "values.yaml"
    values.write_text(yaml.safe_dump(VALUES))
    run(kube, "helm", "install", RELEASE, str(CHART), "-n", NS, "--create-namespace", "-f", str(values))
    for statefulset in (PREFILL, DECODE):
        wait_for(f"{statefulset}-0 created", lambda s=statefulset: pods_of(api, s) == [f"{s}-0"])
    return values


def test_helm_install_and_upgrade_and_rollback(kube, api, release):
    kinds = run(
        kube,
        "kubectl",
        "get",
        "statefulsets,deployments,pdb,roles,rolebindings,serviceaccounts",
        "-n",
        NS,
        "-o",
        "jsonpath={range .items[*]}{.apiVersion}/{.kind}/{.metadata.name} {end}",
    ).split()
    for name in ("router", "prefill", "decode"):  # 1.20 has no policy/v1: the chart falls back
        assert f"policy/v1beta1/PodDisruptionBudget/{FULLNAME}-{name}" in kinds, kinds
    assert f"apps/v1/Deployment/{FULLNAME}-planner" in kinds and f"apps/v1/StatefulSet/{PREFILL}" in kinds
    assert f"rbac.authorization.k8s.io/v1/Role/{FULLNAME}-planner" in kinds
    probe = api[0].read_namespaced_stateful_set(PREFILL, NS).spec.template.spec.containers[0].readiness_probe
    assert probe._exec.command[:2] == ["ringserve", "health"], "no gRPC probes on 1.20: exec probes"
    assert kv_blocks(api, PREFILL) == "256" and kv_blocks(api, DECODE) == "512"

    run(kube, "helm", "upgrade", RELEASE, str(CHART), "-n", NS, "-f", str(release), "--set", "prefill.kvBlocks=128")
    assert kv_blocks(api, PREFILL) == "128" and kv_blocks(api, DECODE) == "512", "the changed value reached it"
    run(kube, "helm", "rollback", RELEASE, "1", "-n", NS)
    assert kv_blocks(api, PREFILL) == "256"
    history = yaml.safe_load(run(kube, "helm", "history", RELEASE, "-n", NS, "-o", "yaml"))
    assert [h["revision"] for h in history] == [1, 2, 3] and history[-1]["status"] == "deployed"


@pytest.mark.parametrize("statefulset", [PREFILL, DECODE])
def test_kubectl_scale_each_tier(kube, api, release, statefulset):
    run(kube, "kubectl", "scale", f"statefulset/{statefulset}", "-n", NS, "--replicas=3")
    assert api[0].read_namespaced_stateful_set_scale(statefulset, NS).spec.replicas == 3
    expected = [f"{statefulset}-{i}" for i in range(3)]
    wait_for("the controller manager creates the new pods", lambda: pods_of(api, statefulset) == expected)
    run(kube, "kubectl", "scale", f"statefulset/{statefulset}", "-n", NS, "--replicas=1")
    wait_for("the highest ordinals go", lambda: pods_of(api, statefulset) == [f"{statefulset}-0"])


@pytest.fixture(scope="module")
def planner_kubeconfig(kube, api, tmp_path_factory) -> Path:
    """A kubeconfig with a token of the chart's planner ServiceAccount (TokenRequest API)."""
    from kubernetes import client

    request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    token = api[1].create_namespaced_service_account_token(f"{FULLNAME}-planner", NS, request).status.token
    return kube.write_kubeconfig(tmp_path_factory.mktemp("planner") / "kubeconfig", token, NS)


def test_planner_role_allows_scaling_and_nothing_else(release, planner_kubeconfig):
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    from ringserve.planner import Scaler

    scaler = Scaler(NS, str(planner_kubeconfig))  # the planner's own client, with its token
    for statefulset in (PREFILL, DECODE):
        assert scaler.replicas(statefulset) == 1
        scaler.scale(statefulset, 2)
        assert scaler.replicas(statefulset) == 2
        scaler.scale(statefulset, 1)
        assert scaler.apps.read_namespaced_stateful_set(statefulset, NS).spec.replicas == 1
    api = config.new_client_from_config(config_file=str(planner_kubeconfig))
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    forbidden = {
        "delete a pod": lambda: core.delete_namespaced_pod(f"{PREFILL}-0", NS),
        "read a secret": lambda: core.read_namespaced_secret(f"{FULLNAME}-redis-auth", NS),
        "list pods": lambda: core.list_namespaced_pod(NS),
        "scale the router": lambda: apps.patch_namespaced_deployment_scale(
            f"{FULLNAME}-router", NS, {"spec": {"replicas": 2}}
        ),
        "patch a StatefulSet's spec": lambda: apps.patch_namespaced_stateful_set(
            PREFILL, NS, {"spec": {"template": {"metadata": {"labels": {"x": "y"}}}}}
        ),
        "list StatefulSets": lambda: apps.list_namespaced_stateful_set(NS),
    }
    for what, call in forbidden.items():
        with pytest.raises(ApiException) as refused:
            call()
        assert refused.value.status == 403, f"{what}: {refused.value.status} {refused.value.reason}"


class Group:
    """A test group: a real Registration (the registry's own heartbeat format) whose load the test sets."""

    def __init__(self, redis_url: str, cluster: str, role: str, ordinal: int, **load):
        from ringserve.config import WorkerArgs
        from ringserve.heartbeat import Registration
        from ringserve.registry_schema import Load

        self.load = Load(**load)
        statefulset = PREFILL if role == "prefill" else DECODE
        cfg = WorkerArgs(redis_url=redis_url, cluster=cluster, heartbeat_s=60, registry_ttl_s=120)
        self.registration = Registration(cfg, role, 1, 64, lambda: self.load)
        self.registration.start(f"{statefulset}-{ordinal}.{statefulset}.{NS}.svc:50051")

    def report(self, **load) -> None:
        """Change the load and heartbeat it now."""
        for name, value in load.items():
            setattr(self.load, name, value)
        self.registration.beat()


def planner_config(redis_url: str, cluster: str, kubeconfig: Path, **overrides):
    from ringserve.planner import PlannerConfig

    settings = dict(
        redis_url=redis_url,
        cluster=cluster,
        namespace=NS,
        prefill_statefulset=PREFILL,
        decode_statefulset=DECODE,
        kubeconfig=str(kubeconfig),
        stabilization_s=30,
        scale_down_below=0.6,
        ttft_target_s=1.0,
        prefill_tokens_per_s=10_000,
        decode_kv_target=0.8,
        decode_requests_target=32,
        prefill_min=1,
        prefill_max=3,
        decode_min=1,
        decode_max=2,
    )
    return PlannerConfig(**{**settings, **overrides})


def test_planner_scales_each_tier_on_its_own_load(api, release, planner_kubeconfig, redis_server, caplog):
    """Prefill up under queued prompt work (to its max), held by hysteresis and the stabilisation window,
    then down from the top only past idle groups (to its min); decode up and down on its KV blocks alone."""
    from prometheus_client import REGISTRY

    from ringserve.planner import Planner, Scaler
    from ringserve.registry import Registry, connect

    cfg = planner_config(redis_server.url, "kube-planner", planner_kubeconfig)
    planner = Planner(cfg, Registry(connect(cfg), cfg.cluster), Scaler(cfg.namespace, cfg.kubeconfig))

    def step(now: float) -> dict[str, tuple[str, int]]:
        decisions = planner.step(now)
        replicas = {s: api[0].read_namespaced_stateful_set_scale(s, NS).spec.replicas for s in (PREFILL, DECODE)}
        for d in decisions:  # applied: the API server holds what the planner decided
            assert replicas[PREFILL if d.tier == "prefill" else DECODE] == d.desired
        return {d.tier: (d.action, d.desired) for d in decisions}

    url = redis_server.url
    groups = [
        Group(url, cfg.cluster, "prefill", 0),
        Group(url, cfg.cluster, "decode", 0, free_blocks=100, total_blocks=100),
    ]
    try:
        assert step(0) == {"prefill": ("hold", 1), "decode": ("hold", 1)}
        p0, d0 = groups
        p0.report(queued_tokens=50_000, tokens_per_s=10_000, active_requests=5)  # 5 s of work: needs 5 groups
        with caplog.at_level("INFO", logger="ringserve.planner"):
            assert step(1) == {"prefill": ("up", 3), "decode": ("hold", 1)}, "to --prefill-max, decode unmoved"
        assert "'queued_tokens': 50000" in caplog.text and "'predicted_queue_s': 5.0" in caplog.text
        desired = REGISTRY.get_sample_value("ringserve_planner_replicas", {"tier": "prefill", "kind": "desired"})
        assert desired == 3
        p1, p2 = Group(url, cfg.cluster, "prefill", 1), Group(url, cfg.cluster, "prefill", 2)
        groups += [p1, p2]
        p0.report(queued_tokens=10_000, active_requests=1)
        p1.report(queued_tokens=10_000, tokens_per_s=10_000, active_requests=1)
        assert step(2)["prefill"] == ("hold", 3), "need 2.0 of 3 groups: inside the hysteresis band"
        for g, running in ((p0, 0), (p1, 0), (p2, 1)):
            g.report(queued_tokens=0, active_requests=running)
        assert step(3)["prefill"] == ("hold", 3), "the stabilisation window still holds the recommendation 3"
        assert step(40)["prefill"] == ("held_busy", 3), "the highest ordinal runs a request: no scale-down"
        p2.report(active_requests=0)
        p1.report(active_requests=2)
        assert step(41)["prefill"] == ("down", 2), "past the idle ordinal 2 only"
        p2.registration.deregister()  # its pod is gone
        p1.report(active_requests=0)
        assert step(42)["prefill"] == ("down", 1)
        assert step(43)["prefill"] == ("hold", 1), "no load: --prefill-min"

        d0.report(free_blocks=10, active_requests=3)  # 90 of 100 KV blocks in use, over the 0.8 target
        assert step(44) == {"prefill": ("hold", 1), "decode": ("up", 2)}
        d0.report(free_blocks=0, active_requests=200)
        assert step(45)["decode"] == ("hold", 2), "--decode-max"
        d0.report(free_blocks=100, active_requests=0)
        assert step(46)["decode"] == ("hold", 2), "stabilisation window"
        assert step(80)["decode"] == ("down", 1)
    finally:
        for g in groups:
            g.registration.deregister()


def test_planner_command_dry_run_logs_and_exports_without_scaling(kube, api, release, planner_kubeconfig, redis_server):
    """The planner container the release deployed (its command, args and env as the API server holds them),
    run here with --dry-run, its token's kubeconfig and the test's Redis: it decides from the registry, logs
    and exports the decision, applies nothing."""
    import shutil
    import urllib.request

    from ringserve.process_group import free_port

    cluster = "kube-planner-cli"
    group = Group(redis_server.url, cluster, "prefill", 0, queued_tokens=30_000, tokens_per_s=10_000)
    (c,) = api[0].read_namespaced_deployment(f"{FULLNAME}-planner", NS).spec.template.spec.containers
    config_map = api[1].read_namespaced_config_map(FULLNAME, NS).data
    env = config_map | {e.name: e.value for e in c.env if e.value is not None}  # envFrom, then env
    assert [e.value_from.field_ref.field_path for e in c.env if e.name == "RINGSERVE_NAMESPACE"] == [
        "metadata.namespace"
    ]
    port = free_port()
    env |= {"RINGSERVE_NAMESPACE": NS, "RINGSERVE_METRICS_PORT": str(port)}  # the downward API; a free port here
    env |= {"RINGSERVE_REDIS_URL": redis_server.url, "RINGSERVE_CLUSTER": cluster}  # instead of the release's Redis
    base = {k: v for k, v in os.environ.items() if not k.startswith("RINGSERVE_")}
    executable = shutil.which(c.command[0], path=str(Path(sys.executable).parent))
    assert [e.config_map_ref.name for e in c.env_from] == [FULLNAME] and c.command == ["ringserve", "planner"]
    test_flags = ["--dry-run", "--interval-s", "0.5", "--ttft-target-s", "1", "--kubeconfig", str(planner_kubeconfig)]
    argv = [executable, *c.command[1:], *c.args, *test_flags]  # later flags win
    log = kube.work / "planner-cli.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, env={**base, **env}, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for("a dry-run decision", lambda: "[dry run: not applied]" in log.read_text() or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()
        assert "prefill rs-ringserve-prefill: up 1 -> 3" in log.read_text(), log.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            metrics = reply.read().decode()
        assert 'ringserve_planner_replicas{kind="desired",tier="prefill"} 3.0' in metrics
        assert 'ringserve_planner_input{input="queued_tokens",tier="prefill"} 30000.0' in metrics
        assert api[0].read_namespaced_stateful_set_scale(PREFILL, NS).spec.replicas == 1, "nothing applied"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        group.registration.deregister()


def test_planner_adds_a_prefill_group_while_deadlines_are_missed(kube, api, release, planner_kubeconfig, redis_server):
    """--prometheus-url: a real Prometheus scrapes the real ``ringserve_prefill_deadlines_total`` counter (this
    process's /metrics, as a prefill group serves it); missed deadlines add one prefill group per stabilisation
    window though the registry shows no queue, up to --prefill-max; decode does not read them."""
    from prometheus_client import start_http_server

    from ringserve.metrics import PREFILL_DEADLINES
    from ringserve.planner import Planner, Scaler, query_prometheus
    from ringserve.process_group import free_port
    from ringserve.registry import Registry, connect
    from tests.kube import Prometheus

    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1")
    prometheus = Prometheus(kube.bin, kube.work, [f"127.0.0.1:{port}"]).start()
    query = 'sum(rate(ringserve_prefill_deadlines_total{outcome="missed"}[15s]))'
    cfg = planner_config(
        redis_server.url, "kube-planner-prom", planner_kubeconfig, prometheus_url=prometheus.url, prometheus_query=query
    )
    group = Group(redis_server.url, cfg.cluster, "prefill", 0)
    try:
        planner = Planner(cfg, Registry(connect(cfg), cfg.cluster), Scaler(cfg.namespace, cfg.kubeconfig))
        assert {d.tier: d.action for d in planner.step(0)} == {"prefill": "hold", "decode": "hold"}

        def missing() -> bool:
            PREFILL_DEADLINES.labels("missed").inc()
            return query_prometheus(prometheus.url, query) > 0

        wait_for("Prometheus sees deadlines missed", missing, timeout_s=120)
        prefill, decode = planner.step(1)
        assert (prefill.action, prefill.desired, decode.action) == ("up", 2, "hold"), prefill.reason
        assert "TTFT deadlines missed" in prefill.reason and prefill.inputs["deadlines_missed_per_s"] > 0
        assert prefill.inputs["queued_tokens"] == 0, "the registry alone would not scale up"
        assert planner.step(2)[0].action == "hold", "one group more per stabilisation window"
        PREFILL_DEADLINES.labels("missed").inc()
        assert planner.step(40)[0].desired == 3
        PREFILL_DEADLINES.labels("missed").inc()
        assert planner.step(80)[0].desired == 3, "--prefill-max"
        assert api[0].read_namespaced_stateful_set_scale(PREFILL, NS).spec.replicas == 3
    finally:
        group.registration.deregister()
        prometheus.stop()
        server.shutdown()
        api[0].patch_namespaced_stateful_set_scale(PREFILL, NS, {"spec": {"replicas": 1}})


def test_planner_command_outlives_an_unreachable_redis(kube, release, planner_kubeconfig):
    """A Redis outage costs decisions, not the planner: each step logs it and counts it; the process keeps going."""
    from ringserve.process_group import free_port

    redis_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    argv = [sys.executable, "-m", "ringserve.cli", "planner", "--interval-s", "0.2", "--namespace", NS,
            "--kubeconfig", str(planner_kubeconfig), "--redis-url", redis_url]  # fmt: skip
    log = kube.work / "planner-no-redis.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for("two failed steps", lambda: log.read_text().count("unreachable") >= 2 or proc.poll() is not None)
        assert proc.poll() is None and f"Redis at {redis_url} unreachable" in log.read_text(), log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_planner_command_rejects_bad_limits():
    """Checked before anything is contacted: exit 2 and a message naming the flags."""
    for flags, message in (
        (["--prefill-min", "3", "--prefill-max", "2"], "--prefill-min (3) and --prefill-max (2) need 0 <= min <= max"),
        (["--scale-down-below", "1"], "--scale-down-below must be in (0, 1), got 1.0"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "ringserve.cli", "planner", *flags], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_helm_uninstall(kube, api, release):
    """Runs last: the release and everything it made go."""
    run(kube, "helm", "uninstall", RELEASE, "-n", NS)
    assert not api[0].list_namespaced_stateful_set(NS).items
    assert not api[0].list_namespaced_deployment(NS).items
    wait_for("the pods go", lambda: not api[1].list_namespaced_pod(NS).items)
