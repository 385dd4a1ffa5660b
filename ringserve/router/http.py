"""The OpenAI-compatible HTTP API of the router: the second front door, on the same path as the first.

Each HTTP request becomes a ``GenerateRequest`` (``openai_schema``) sent to this process's own
``Router.Generate`` over a loopback gRPC channel, so routing, scheduling, KV, decode, cancellation
and deadlines are the gRPC door's, and so are the tokens. A Starlette app served by uvicorn in a
thread of the router process, with its own asyncio loop (and grpc.aio channel on it).

Streams are server-sent events ending with ``data: [DONE]``. The first token is awaited before the
response starts, so an error up to then (bad input, overload, no group, deadline) gets its HTTP
status; a later one comes as a last ``data: {"error": ...}`` event. A client that goes away at any
point cancels the gRPC call, which cancels the request on every tier and frees its KV blocks.

The caller's ``Authorization`` header goes to Generate as its ``authorization`` metadata, so the
router's API keys (``auth.py``) apply here as they do on gRPC (401, 403, 429 for their refusals).
With the router's TLS certificate the API serves HTTPS with it (read at start: rotating it needs a
restart, unlike the gRPC port).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
import uuid

import grpc
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ringserve import rpc
from ringserve.errors import RingserveError
from ringserve.router.openai_schema import (
    FINISH_NAMES,
    ApiError,
    ParsedRequest,
    choice,
    error_from_grpc,
    parse_body,
    parse_request,
    usage_body,
)
from ringserve.v1 import common_pb2, router_pb2_grpc

log = logging.getLogger(__name__)


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class _ClientGone(Exception):
    """The HTTP client disconnected; the gRPC call has been cancelled."""


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, call, work):
    """Await ``work``; if the client disconnects first, cancel the gRPC ``call`` and raise _ClientGone."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            call.cancel()
    if not task.done() or task.cancelled():
        raise _ClientGone
    return task.result()


class OpenAIApp:
    """The HTTP routes, calling ``Router.Generate`` at ``router_address`` for the model ``model``."""

    def __init__(self, router_address: str, model: common_pb2.ModelDescription):
        self.router_address, self.model, self.created = router_address, model, int(time.time())
        self.app = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model_card, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_exception, Exception: self._internal_error},
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        # grpc.aio objects belong to the loop that made them: this server's.
        async with rpc.aio_channel(self.router_address) as channel:
            self.stub = router_pb2_grpc.RouterStub(channel)
            self.health_stub = health_pb2_grpc.HealthStub(channel)
            yield

    @staticmethod
    async def _http_exception(request: Request, exc: HTTPException) -> JSONResponse:
        """Unknown paths and wrong methods, in OpenAI's error shape too."""
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error_response(ApiError(exc.status_code, message, kind))

    @staticmethod
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        """A bug: OpenAI's shape still (uvicorn logs the traceback)."""
        message = f"internal error in {request.url.path}: {type(exc).__name__}: {exc}"
        return _error_response(ApiError(500, message, "server_error"))

    def _card(self) -> dict:
        return {"id": self.model.name, "object": "model", "created": self.created, "owned_by": "ringserve",
                "max_model_len": self.model.max_context}  # fmt: skip

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model_card(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.model.name:
            return _error_response(ApiError(404, f"model {name!r} is not served here; use {self.model.name!r}",
                                            "not_found_error", "model", "model_not_found"))  # fmt: skip
        return JSONResponse(self._card())

    async def health(self, request: Request) -> Response:
        """200 while the router's gRPC service answers SERVING, else 503."""
        try:
            reply = await self.health_stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError as e:
            return _error_response(error_from_grpc(grpc.StatusCode.UNAVAILABLE, f"router: {e.details()}"))
        if not serving:
            return _error_response(error_from_grpc(grpc.StatusCode.UNAVAILABLE, "the router is not serving"))
        return JSONResponse({"status": "ok"})

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        try:
            parsed = parse_request(parse_body(await request.body()), self.model.name, chat)
            rid = uuid.uuid4().hex
            parsed.generate.request_id = rid
            auth = request.headers.get("authorization")
            metadata = (("authorization", auth),) if auth else ()
            call = self.stub.Generate(parsed.generate, timeout=parsed.timeout, metadata=metadata)
            header = {
                "id": ("chatcmpl-" if chat else "cmpl-") + rid,
                "object": ("chat.completion" if chat else "text_completion")
                + (".chunk" if chat and parsed.stream else ""),
                "created": int(time.time()),
                "model": self.model.name,
            }
            try:
                if parsed.stream:
                    first = await _unless_disconnected(request, call, call.read())
                    return StreamingResponse(self._events(call, first, header, parsed, chat),
                                             media_type="text/event-stream", headers={"x-request-id": rid})  # fmt: skip
                body = await _unless_disconnected(request, call, self._whole(call, header, chat))
                return JSONResponse(body, headers={"x-request-id": rid})
            except grpc.aio.AioRpcError as e:
                raise error_from_grpc(e.code(), e.details()) from None
        except ApiError as e:
            return _error_response(e)
        except _ClientGone:
            return Response(status_code=499)

    @staticmethod
    async def _whole(call, header: dict, chat: bool) -> dict:
        texts = []
        async for msg in call:  # the last message carries the finish reason and usage
            texts.append(msg.text)
        finish = FINISH_NAMES[msg.finish_reason]
        return {
            **header,
            "choices": [choice(chat, "".join(texts), finish, delta=False)],
            "usage": usage_body(msg.usage),
        }

    @staticmethod
    async def _events(call, first, header: dict, parsed: ParsedRequest, chat: bool):
        """SSE chunks from the gRPC stream whose first message is ``first``; cancelled when the client goes."""
        msg, first_chunk = first, True
        try:
            while msg is not grpc.aio.EOF:
                finish = FINISH_NAMES.get(msg.finish_reason)
                chunk = {**header, "choices": [choice(chat, msg.text, finish, delta=True, first=first_chunk)]}
                if parsed.include_usage:
                    chunk["usage"] = None
                yield _sse(chunk)
                first_chunk = False
                if finish:
                    if parsed.include_usage:
                        yield _sse({**header, "choices": [], "usage": usage_body(msg.usage)})
                    break
                msg = await call.read()
            yield b"data: [DONE]\n\n"
        except grpc.aio.AioRpcError as e:
            yield _sse(error_from_grpc(e.code(), e.details()).body())
        finally:
            call.cancel()  # no-op once the call has finished; frees everything if the client went away


class HttpServer:
    """uvicorn serving an ``OpenAIApp`` in a daemon thread with its own event loop. The port is bound at
    construction, so a taken port fails before the router serves anything; ``start`` needs the gRPC port.
    ``tls``: (certificate file, key file) to serve HTTPS."""

    def __init__(self, host: str, port: int, model: common_pb2.ModelDescription, tls: tuple[str, str] | None = None):
        self.host, self.model, self.tls = host, model, tls
        try:
            self.sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as e:
            raise RingserveError(f"the HTTP API could not listen on {host}:{port}: {e}") from e
        self.port = self.sock.getsockname()[1]

    def start(self, grpc_port: int, timeout_s: float = 30.0) -> HttpServer:
        # The router's gRPC server listens on the same host; a wildcard address is reached on loopback.
        target = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(self.host, self.host)
        if self.tls and target in ("127.0.0.1", "[::1]"):
            target = "localhost"  # the name a router certificate carries for loopback (hostname verification)
        app = OpenAIApp(f"{target}:{grpc_port}", self.model)
        cert, key = self.tls or (None, None)
        config = uvicorn.Config(app.app, log_level="warning", access_log=False, lifespan="on", loop="asyncio",
                                ssl_certfile=cert, ssl_keyfile=key)  # fmt: skip
        self.server = uvicorn.Server(config)
        thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True, name="http-api")
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RingserveError(f"the HTTP API did not start on port {self.port}; see the log above")
            time.sleep(0.02)
        return self
