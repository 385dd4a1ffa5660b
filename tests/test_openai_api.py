"""The OpenAI-compatible HTTP API, through the real `openai` client (and curl) against a real cluster.

One cluster for the module (CP 1, KVP 1; 24 decode KV blocks, so a long request overloads it); its
router serves HTTP on --http-port. Every HTTP answer is compared with the gRPC door's for the same request.
"""

import json
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from test_services import blocks_used, wait_blocks_free

from ringserve.process_group import free_port
from ringserve.router.openai_schema import error_from_grpc
from tests.certs import API_KEY, cli_generate, router_client

MODEL = "SmolLM2-135M-Instruct"
LONG = "A long document about ring attention and prefix caches. " * 16  # ~180 tokens: two whole blocks


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server, security):
    """In the secure mode the API is HTTPS with the router's certificate and takes the API key."""
    port = free_port()
    c = security.start_cluster(
        cp=1,
        log_dir=str(tmp_path_factory.mktemp(f"openai-api-{security.mode}")),
        redis_url=redis_server.url,
        # A short calibration: the scheduler's cost model does not matter here, start-up time does.
        extra={
            "decode": ["--kv-blocks", "24"],
            "prefill": ["--calibrate-tokens", "256"],
            "router": ["--http-port", str(port)],
        },
    )
    c.http = f"{'https' if security.secure else 'http'}://127.0.0.1:{port}"
    c.https = ssl.create_default_context(cafile=c.tls.ca) if security.secure else None
    c.http_headers = {"Authorization": f"Bearer {API_KEY}"} if security.secure else {}
    try:
        deadline = time.monotonic() + 60  # the HTTP server starts just after the router's gRPC one
        while True:
            try:
                if request(c, "GET", "/health")[0] == 200:
                    break
            except urllib.error.URLError:  # not listening yet
                pass
            assert time.monotonic() < deadline, "the HTTP API did not come up"
            time.sleep(0.2)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    key = API_KEY if cluster.https else "unused"
    http = openai.DefaultHttpxClient(verify=cluster.https) if cluster.https else None
    return openai.OpenAI(base_url=cluster.http + "/v1", api_key=key, max_retries=0, timeout=120, http_client=http)


@pytest.fixture(scope="module")
def grpc_client(cluster):
    with router_client(cluster, timeout=120) as c:
        yield c


def request(cluster, method: str, path: str, body: dict | bytes | None = None) -> tuple[int, dict]:
    """Status and JSON body of a plain HTTP request to ``cluster``'s API at ``path`` (no client library
    between us and the server; HTTPS and the API key in the secure mode)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **cluster.http_headers}
    req = urllib.request.Request(cluster.http + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120, context=cluster.https) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def grpc_reply(grpc_client, **kwargs) -> tuple[str, list[int], object]:
    chunks = list(grpc_client.generate(**kwargs))
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], chunks[-1]


def test_greedy_completion_equals_grpc_and_the_generate_command(cluster, client, grpc_client):
    prompt = "The capital of France is"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    text, ids, last = grpc_reply(grpc_client, prompt=prompt, max_tokens=12)
    run, env = cli_generate(cluster)
    cli = subprocess.run([*run, prompt, "--max-tokens", "12"], capture_output=True, text=True, timeout=120, env=env)
    assert cli.returncode == 0, cli.stderr
    assert reply.choices[0].text == text == cli.stdout.removesuffix("\n") and "Paris" in text
    assert reply.object == "text_completion" and reply.model == MODEL
    assert reply.choices[0].finish_reason == {1: "stop", 2: "length"}[last.finish_reason]
    usage = reply.usage
    assert usage.prompt_tokens == len(grpc_client.tokenize(prompt)) == last.usage.prompt_tokens
    assert usage.completion_tokens == len(ids) and usage.total_tokens == usage.prompt_tokens + len(ids)


def test_streamed_completion_equals_the_whole_one(client):
    kwargs = dict(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=10, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    pieces, usage = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in pieces) == whole.choices[0].text
    assert len(pieces) == whole.usage.completion_tokens == 10, "one event per token"
    assert [c.choices[0].finish_reason for c in pieces] == [None] * 9 + ["length"]
    assert usage.choices == [] and usage.usage == whole.usage
    assert all(c.usage is None for c in pieces)


def test_chat_whole_and_streamed_equal_grpc_messages(client, grpc_client):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8, temperature=0)
    text, ids, _ = grpc_reply(grpc_client, messages=messages, max_tokens=8)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text and reply.usage.completion_tokens == len(ids)
    # The same messages with content as text parts, streamed.
    parts = [
        {"role": "system", "content": [{"type": "text", "text": "Answer "}, {"type": "text", "text": "briefly."}]},
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
    ]
    chunks = list(client.chat.completions.create(model=MODEL, messages=parts, max_tokens=8, stream=True))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_stop_strings_end_the_text_before_them(client, grpc_client):
    prompt = "1, 2, 3, 4,"
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, extra_body={"ignore_eos": True})
    full = free.choices[0].text
    stop = full[full.index("7") - 1 :][:2]  # " 7": well inside the greedy text
    over_grpc = grpc_reply(grpc_client, prompt=prompt, max_tokens=16, stop=[stop])[0]
    for given in (stop, [stop, "never appears"]):
        reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, stop=given)
        text = reply.choices[0].text
        assert reply.choices[0].finish_reason == "stop" and stop not in text and full.startswith(text)
        assert text == over_grpc


def test_same_seed_same_text(client, grpc_client):
    prompt = "Write a haiku about the sea."
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0, top_p=0.875, extra_body={"top_k": 40})
    texts = {seed: client.completions.create(**kwargs, seed=seed).choices[0].text for seed in (1, 2, 3)}
    assert client.completions.create(**kwargs, seed=2).choices[0].text == texts[2]
    assert len(set(texts.values())) > 1, "different seeds sample differently"
    over_grpc = grpc_reply(grpc_client, prompt=prompt, max_tokens=8, temperature=1.0, top_p=0.875, top_k=40, seed=2)
    assert texts[2] == over_grpc[0]


def test_repeated_prefix_reports_cached_tokens(client, grpc_client):
    n = len(grpc_client.tokenize(LONG))
    usage = [client.completions.create(model=MODEL, prompt=LONG, max_tokens=2).usage for _ in range(2)]
    assert [u.prompt_tokens for u in usage] == [n, n]
    assert usage[0].prompt_tokens_details.cached_tokens == 0, "nothing sent this prompt before"
    assert usage[1].prompt_tokens_details.cached_tokens == (n - 1) // 64 * 64 > 0


def test_cancelled_stream_frees_blocks_on_both_tiers(cluster, client):
    wait_blocks_free(cluster)
    stream = client.completions.create(model=MODEL, prompt="Tell me a long story.", max_tokens=400, stream=True,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    for _, _ in zip(range(3), stream):
        pass
    assert blocks_used(cluster)[1] > 0, "the decode tier holds the request while it streams"
    stream.close()  # the client disconnects mid-stream
    wait_blocks_free(cluster)


def test_client_gone_before_a_whole_reply_frees_blocks(cluster, client):
    """Not streamed: the client gives up (its timeout) while the request decodes; the router cancels it."""
    wait_blocks_free(cluster)
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=4).completions.create(
            model=MODEL, prompt="Tell me a long story.", max_tokens=1000, extra_body={"ignore_eos": True}
        )
    wait_blocks_free(cluster)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_server_sent_events(cluster):
    body = json.dumps({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "stream": True})
    curl = ["curl", *([] if cluster.https is None else ["--cacert", cluster.tls.ca])]
    curl += [a for name, value in cluster.http_headers.items() for a in ("-H", f"{name}: {value}")]
    done = subprocess.run([*curl, "-sN", cluster.http + "/v1/completions", "-H", "Content-Type: application/json",
                           "-d", body], capture_output=True, text=True, timeout=120)  # fmt: skip
    events = [line for line in done.stdout.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]", done.stdout
    # One chunk per decode message: up to 4 (tokens queued together go as one), then [DONE].
    assert 2 <= len(events) <= 5 and json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
    bad = subprocess.run([*curl, "-s", "-w", "\n%{http_code}", cluster.http + "/v1/completions", "-d", "{not json"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    text, status = bad.stdout.rsplit("\n", 1)
    assert status == "400" and "not valid JSON" in json.loads(text)["error"]["message"]


BAD_BODIES = [  # (path, body, status, type, param, a phrase of the message)
    ("completions", {"prompt": "hi"}, 400, "invalid_request_error", "model", "model is required"),
    ("completions", {"model": "gpt-4", "prompt": "hi"}, 404, "not_found_error", "model", "not served here"),
    ("completions", {"model": MODEL}, 400, "invalid_request_error", "prompt", "prompt is required"),
    ("completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "invalid_request_error", "prompt", "one request"),
    ("completions", {"model": MODEL, "prompt": {"x": 1}}, 400, "invalid_request_error", "prompt", "a string or"),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "max_tokens": "ten"},
        400,
        "invalid_request_error",
        "max_tokens",
        "max_tokens must be an integer",
    ),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "max_tokens": -1},
        400,
        "invalid_request_error",
        "max_tokens",
        "[0, 2**32)",
    ),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "temperature": True},
        400,
        "invalid_request_error",
        "temperature",
        "finite number",
    ),
    ("completions", {"model": MODEL, "prompt": "hi", "stop": [1]}, 400, "invalid_request_error", "stop", "strings"),
    ("completions", {"model": MODEL, "prompt": "hi", "n": 2}, 400, "invalid_request_error", "n", "n > 1"),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "logprobs": 2},
        400,
        "invalid_request_error",
        "logprobs",
        "decode tier does not return them",
    ),
    (
        "chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2},
        400,
        "invalid_request_error",
        "logprobs",
        "not available",
    ),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}},
        400,
        "invalid_request_error",
        "stream_options",
        "only allowed with stream",
    ),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "invalid_request_error", "messages", "non-empty"),
    (
        "chat/completions",
        {"model": MODEL, "messages": [{"content": "hi"}]},
        400,
        "invalid_request_error",
        "messages",
        "string role",
    ),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "ttft_slo_seconds": "soon"},
        400,
        "invalid_request_error",
        "ttft_slo_seconds",
        "finite number",
    ),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "stop_token_ids": [-1]},
        400,
        "invalid_request_error",
        "stop_token_ids",
        "list of token ids",
    ),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "timeout_seconds": 0},
        400,
        "invalid_request_error",
        "timeout_seconds",
        "> 0",
    ),
    # From the router, over gRPC (INVALID_ARGUMENT): the same messages as the gRPC door's.
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "temperature": -1},
        400,
        "invalid_request_error",
        None,
        "temperature must be",
    ),
    ("completions", {"model": MODEL, "prompt": ""}, 400, "invalid_request_error", None, "prompt is empty"),
    ("completions", {"model": MODEL, "prompt": [1] * 9000}, 400, "invalid_request_error", None, "context is 8192"),
]


@pytest.mark.parametrize("path,body,status,kind,param,phrase", BAD_BODIES)
def test_bad_requests_get_openai_errors(cluster, path, body, status, kind, param, phrase):
    got, reply = request(cluster, "POST", f"/v1/{path}", body)
    assert got == status and set(reply["error"]) == {"message", "type", "param", "code"}, reply
    assert reply["error"]["type"] == kind and reply["error"]["param"] == param
    assert phrase in reply["error"]["message"], reply


def test_the_openai_client_raises_its_typed_errors(client):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3)


def test_overload_is_429_and_frees_everything(cluster, client):
    """1600 prompt tokens + 16 need 26 KV blocks; this decode group has 24: RESOURCE_EXHAUSTED."""
    with pytest.raises(openai.RateLimitError, match="no decode group has room") as e:
        client.completions.create(model=MODEL, prompt=[100 + i % 900 for i in range(1600)], max_tokens=16)
    assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_error"
    wait_blocks_free(cluster)


def test_deadline_is_504(cluster):
    body = {"model": MODEL, "prompt": LONG, "max_tokens": 64, "timeout_seconds": 0.001}
    for path in ("completions", "completions?stream"):
        status, reply = request(cluster, "POST", "/v1/completions", {**body, "stream": path.endswith("stream")})
        assert status == 504 and reply["error"]["type"] == "timeout_error", reply
    wait_blocks_free(cluster)


def test_models_health_and_unknown_paths(cluster, client):
    (card,) = client.models.list().data
    assert card.id == MODEL and card.owned_by == "ringserve"
    assert client.models.retrieve(MODEL).id == MODEL
    assert request(cluster, "GET", "/v1/models/gpt-4")[0] == 404
    assert request(cluster, "GET", "/health") == (200, {"status": "ok"})
    status, reply = request(cluster, "GET", "/v1/embeddings")
    assert status == 404 and reply["error"]["type"] == "not_found_error"
    status, reply = request(cluster, "GET", "/v1/completions")
    assert status == 405 and "GET /v1/completions" in reply["error"]["message"]


@pytest.mark.parametrize(
    "code,status,kind",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
        (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
        (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
        (grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
        (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error"),
        (grpc.StatusCode.INTERNAL, 500, "server_error"),
    ],
)
def test_grpc_status_to_http(code, status, kind):
    """The one mapping; 401/403 come from the router once it checks keys (its auth is not built yet)."""
    e = error_from_grpc(code, "why")
    assert (e.status, e.type, e.code) == (status, kind, code.name.lower())
    assert e.body() == {"error": {"message": "why", "type": kind, "param": None, "code": code.name.lower()}}


def test_no_decode_group_is_503(cluster, client):
    """Runs last: it kills the module's decode group."""
    cluster.procs["decode"].send_signal(signal.SIGKILL)
    cluster.procs["decode"].wait(timeout=30)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert e.value.status_code == 503 and e.value.body["type"] == "service_unavailable_error"
