"""API keys on the router's client port, over a real TLS gRPC server on loopback."""

import os
import threading
import time

import grpc
import pytest

from ringserve import rpc
from ringserve.auth import parse_keys
from ringserve.client import Client
from ringserve.config import RouterConfig
from ringserve.errors import InvalidArgument
from ringserve.tls import ChannelTls
from ringserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.certs import CA

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-fedcba9876543210"


class Counting(router_pb2_grpc.RouterServicer):
    """Generate streams two tokens (then usage: a 10-token prompt); the prompt "hold" waits for ``gate``."""

    def __init__(self):
        self.calls = 0
        self.gate = threading.Event()

    def Generate(self, request, context):
        self.calls += 1
        if request.prompt == "hold":
            self.gate.wait(30)
        yield router_pb2.GenerateResponse(text="a", token_ids=[1])
        usage = common_pb2.Usage(prompt_tokens=10, completion_tokens=2)
        yield router_pb2.GenerateResponse(text="b", token_ids=[2], finish_reason=2, usage=usage)

    def Tokenize(self, request, context):
        return router_pb2.TokenizeResponse(token_ids=[7])


@pytest.fixture
def router(tmp_path):
    """A TLS router port with a keys file: alice (1 concurrent, 30 tokens a minute) and bob."""
    keys = tmp_path / "keys"
    keys.write_text(f"# name key max_concurrent tokens_per_minute\nalice {ALICE} 1 30\nbob {BOB}\n")
    issued = CA(tmp_path / "ca").issue("router", role="router")
    cfg = RouterConfig(tls_cert=issued.cert, tls_key=issued.key, tls_ca=issued.ca, api_keys_file=str(keys))
    servicer = Counting()
    add = router_pb2_grpc.add_RouterServicer_to_server
    server, port, _ = rpc.start_server(
        [(add, servicer)], ["ringserve.v1.Router"], "127.0.0.1", 0, limits=cfg, internal=False
    )
    yield f"127.0.0.1:{port}", ChannelTls(issued.ca), servicer, keys
    server.stop(None)


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_missing_or_wrong_key_is_refused_before_the_servicer(router, caplog):
    address, tls, servicer, _ = router
    with Client(address, timeout=10, tls=tls) as client:
        code, details = _code(lambda: client.complete("x"))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in details
        assert _code(lambda: client.tokenize("x"))[0] == grpc.StatusCode.UNAUTHENTICATED
    with Client(address, timeout=10, tls=tls, api_key="not-a-key") as client:
        code, details = _code(lambda: client.complete("x"))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "not valid" in details
    assert servicer.calls == 0
    with Client(address, timeout=10, tls=tls, api_key=BOB) as client:
        assert client.complete("x") == "ab" and client.tokenize("x") == [7]
    assert servicer.calls == 1
    assert ALICE not in caplog.text and BOB not in caplog.text and "not-a-key" not in caplog.text


def test_per_key_limits_refuse_excess(router):
    """alice may run one call at a time and 30 tokens a minute (each call: 10 prompt + 2 completion)."""
    address, tls, servicer, _ = router
    with Client(address, timeout=30, tls=tls, api_key=ALICE) as client, Client(address, tls=tls, api_key=BOB) as bob:
        first = client.generate("hold")
        running = threading.Thread(target=lambda: list(first))
        running.start()
        while servicer.calls < 1:
            time.sleep(0.01)
        code, details = _code(lambda: client.complete("x"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 concurrent" in details
        assert bob.complete("x") == "ab"  # another key is not held back
        servicer.gate.set()
        running.join()
        client.complete("x")
        client.complete("x")  # 36 tokens in the window now
        code, details = _code(lambda: client.complete("x"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "30 tokens" in details


def test_keys_file_reloads_without_restart(router):
    address, tls, _, keys = router
    with Client(address, timeout=10, tls=tls, api_key="carol-new-key") as client:
        assert _code(lambda: client.complete("x"))[0] == grpc.StatusCode.PERMISSION_DENIED
        keys.write_text(f"carol carol-new-key\nbob {BOB}\n")
        os.utime(keys, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.complete("x") == "ab"
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.PERMISSION_DENIED and time.monotonic() < deadline
                time.sleep(0.2)
    with Client(address, timeout=10, tls=tls, api_key=ALICE) as client:  # removed with the rewrite
        assert _code(lambda: client.complete("x"))[0] == grpc.StatusCode.PERMISSION_DENIED


def test_keys_file_errors_name_the_line_not_the_key():
    with pytest.raises(InvalidArgument, match="keys line 2: max_concurrent must be a positive integer") as e:
        parse_keys("a k1\nb secret-k2 zero\n", "keys")
    assert "secret-k2" not in str(e.value)
    with pytest.raises(InvalidArgument, match="given twice"):
        parse_keys("a k1\nb k1\n", "keys")
    assert parse_keys("a k1 - 5 # comment\n\n", "keys")["a"].tokens_per_minute == 5


def _processes(pid: int) -> list[int]:
    """``pid`` and its descendants (a group's ranks)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []
    return [pid, *(p for c in children for p in _processes(c))]


def test_secrets_stay_out_of_logs_flags_and_metrics(tmp_path, monkeypatch, tls_redis_binary):
    """A secure cluster (TLS, API keys, the deployment secret) whose registry is a Redis over TLS that
    requires client certificates and a password, given as the environment variable: after requests over
    gRPC, one with a wrong key and one over the HTTPS API, no log of its services, no command line of
    their processes (nor Redis's) and no /metrics page shows the API key, the deployment secret or the
    Redis password."""
    import json
    import ssl
    import urllib.error
    import urllib.request

    from ringserve.process_group import free_port
    from ringserve.redis_server import EmbeddedRedis
    from tests.certs import API_KEY, SECRET, Security, router_client

    password = "redis-password-for-tests-7c41d2"
    security = Security("secure", tmp_path / "pki")
    served, client = security.ca.issue("redis"), security.ca.issue("redis-client")
    tls = ChannelTls(served.ca, served.cert, served.key)
    redis = EmbeddedRedis(password=password, tls=tls, binary=tls_redis_binary).start()
    for name, value in (("PASSWORD", password), ("CA_CERT", client.ca), ("CLIENT_CERT", client.cert)):
        monkeypatch.setenv(f"RINGSERVE_REDIS_{name}", value)
    monkeypatch.setenv("RINGSERVE_REDIS_CLIENT_KEY", client.key)
    http_port, logs = free_port(), tmp_path / "logs"
    logs.mkdir()
    cluster = security.start_cluster(
        cp=1,
        log_dir=str(logs),
        metrics=True,
        redis_url=redis.url,
        extra={"prefill": ["--calibrate-tokens", "256"], "router": ["--http-port", str(http_port)]},
    )
    try:
        with router_client(cluster, timeout=120) as client:
            assert client.complete("The capital of France is", max_tokens=4)
        with router_client(cluster, timeout=30, api_key="wrong-key") as client:
            assert _code(lambda: client.complete("x", max_tokens=1))[0] == grpc.StatusCode.PERMISSION_DENIED
        body = json.dumps({"model": "SmolLM2-135M-Instruct", "prompt": "1, 2, 3,", "max_tokens": 2}).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
        request = urllib.request.Request(f"https://127.0.0.1:{http_port}/v1/completions", body, headers)
        context = ssl.create_default_context(cafile=cluster.tls.ca)
        deadline = time.monotonic() + 60  # the HTTP API starts just after the router's gRPC port
        while True:
            try:
                with urllib.request.urlopen(request, timeout=120, context=context) as r:
                    assert r.status == 200
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "the HTTPS API did not come up"
                time.sleep(0.2)
        shown = []
        for proc in cluster.procs.values():
            for pid in _processes(proc.pid):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    shown.append(f.read().replace(b"\0", b" ").decode())
        assert len(shown) >= 3 and any("--deployment-secret-file" in s for s in shown)
        assert any("--redis-url rediss://" in s for s in shown), "the services' registry is Redis over TLS"
        with open(f"/proc/{redis.proc.pid}/cmdline", "rb") as f:
            shown.append(f.read().replace(b"\0", b" ").decode())
        for address in cluster.metrics.values():
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
                shown.append(r.read().decode())
    finally:
        cluster.stop()
        redis.stop()
    shown += [p.read_text() for p in logs.glob("*.log")]
    assert any("registered" in s for s in shown), "the services logged (and registered with the password)"
    for secret in (API_KEY, SECRET, password):
        assert not [s[:200] for s in shown if secret in s], secret


@pytest.mark.parametrize(
    "argv, instead",
    [
        (["router", "--redis-password", "s3cret"], "--redis-password-file FILE, or set RINGSERVE_REDIS_PASSWORD"),
        (
            ["decode", "--deployment-secret", "s3cret"],
            "--deployment-secret-file FILE, or set RINGSERVE_DEPLOYMENT_SECRET",
        ),
        (
            ["prefill", "--redis-url", "redis://:s3cret@10.0.0.5:6379/0"],
            "--redis-password-file or RINGSERVE_REDIS_PASSWORD",
        ),
        (["up", "--redis-url", "rediss://user:s3cret@redis:6380"], "RINGSERVE_REDIS_PASSWORD"),
        (["planner", "--prometheus-url", "http://u:s3cret@prom:9090"], "RINGSERVE_PROMETHEUS_URL"),
    ],
)
def test_secret_valued_flags_are_refused_saying_where_the_secret_goes(argv, instead, capsys):
    from ringserve.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "shows in process lists" in err and instead in err, err
    assert "s3cret" not in err
