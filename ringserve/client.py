"""Python clients for the router: ``Client`` (blocking) and ``AsyncClient`` (asyncio), both streaming.

from ringserve.client import Client
with Client("127.0.0.1:50050") as client:
    for chunk in client.generate("The capital of France is", max_tokens=16):
        print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from ringserve import rpc
from ringserve.errors import InvalidArgument
from ringserve.tls import ChannelTls
from ringserve.v1 import common_pb2, router_pb2, router_pb2_grpc


def _sampling(sampling: dict) -> common_pb2.SamplingParams:
    """The API message; a value the wire type cannot carry (say max_tokens=2**32) is InvalidArgument
    naming the field, not protobuf's bare ValueError."""
    msg = common_pb2.SamplingParams()
    for name, value in sampling.items():
        if value is None:
            continue
        if name not in msg.DESCRIPTOR.fields_by_name:
            raise TypeError(f"unknown sampling keyword {name!r}")
        try:
            if isinstance(value, (list, tuple)):
                getattr(msg, name).extend(value)
            else:
                setattr(msg, name, value)
        except (ValueError, TypeError) as e:
            raise InvalidArgument(f"{name}={value!r} is not a value the API can carry ({e})") from None
    return msg


def _request(prompt, messages, token_ids, request_id, sampling) -> router_pb2.GenerateRequest:
    given = [x is not None for x in (prompt, messages, token_ids)]
    if sum(given) != 1:
        raise ValueError("give exactly one of prompt, messages or token_ids")
    ttft_slo_seconds = sampling.pop("ttft_slo_seconds", None) or 0.0
    req = router_pb2.GenerateRequest(
        request_id=request_id or "",
        sampling=_sampling(sampling),
        ttft_slo_seconds=ttft_slo_seconds,
    )
    if prompt is not None:
        req.prompt = prompt
    elif messages is not None:
        req.messages.messages.extend(router_pb2.ChatMessage(**m) for m in messages)
    else:
        req.token_ids.ids.extend(token_ids)
    return req


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class Client:
    """Blocking client. Sampling keywords: max_tokens, temperature, top_p, top_k, seed, stop,
    stop_token_ids, ignore_eos; and ttft_slo_seconds, the time-to-first-token budget the prefill
    scheduler orders requests by (0 or absent: the prefill group's default).

    ``api_key`` is sent as ``authorization: Bearer <key>`` (routers with --api-keys-file); ``tls``
    verifies the router's certificate (and presents a client certificate if it has one)."""

    def __init__(
        self, address: str, timeout: float | None = None, api_key: str | None = None, tls: ChannelTls | None = None
    ):
        self.channel = rpc.channel(address, tls=tls)
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self.timeout = timeout
        self.metadata = _metadata(api_key)

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        token_ids: list[int] | None = None,
        request_id: str | None = None,
        **sampling,
    ) -> Iterator[router_pb2.GenerateResponse]:
        """Stream response chunks; the last carries finish_reason and usage. ``.cancel()`` on the
        returned iterator ends the request and frees what it holds on every tier."""
        return self.stub.Generate(
            _request(prompt, messages, token_ids, request_id, sampling), timeout=self.timeout, metadata=self.metadata
        )

    def complete(self, prompt: str | None = None, **kwargs) -> str:
        """The whole generated text."""
        return "".join(chunk.text for chunk in self.generate(prompt, **kwargs))

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        reply = self.stub.Tokenize(
            router_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
            timeout=self.timeout,
            metadata=self.metadata,
        )
        return list(reply.token_ids)

    def model_info(self) -> router_pb2.GetModelInfoResponse:
        return self.stub.GetModelInfo(router_pb2.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same methods and arguments as ``Client``."""

    def __init__(
        self, address: str, timeout: float | None = None, api_key: str | None = None, tls: ChannelTls | None = None
    ):
        self.channel = rpc.aio_channel(address, tls=tls)
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self.timeout = timeout
        self.metadata = _metadata(api_key)

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        token_ids: list[int] | None = None,
        request_id: str | None = None,
        **sampling,
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        call = self.stub.Generate(
            _request(prompt, messages, token_ids, request_id, sampling), timeout=self.timeout, metadata=self.metadata
        )
        async for chunk in call:
            yield chunk

    async def complete(self, prompt: str | None = None, **kwargs) -> str:
        return "".join([chunk.text async for chunk in self.generate(prompt, **kwargs)])

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        reply = await self.stub.Tokenize(
            router_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
            timeout=self.timeout,
            metadata=self.metadata,
        )
        return list(reply.token_ids)

    async def model_info(self) -> router_pb2.GetModelInfoResponse:
        return await self.stub.GetModelInfo(
            router_pb2.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata
        )

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
