"""Sampling parameters (validated once, at the edge) and next-token sampling.

One algorithm samples every token, alone (``sample``) or for a whole batch in one call on the
device (``sample_batch``), and both give the same token for the same row, bit for bit:

- greedy (temperature 0): the first index of the largest logit;
- otherwise, in float64: logits shifted so the best is 0, divided by the temperature, sorted
  (stably: ties keep index order); top-k keeps the values >= the k-th (ties included); top-p then
  drops a token once the mass before it reaches top_p (the first always stays); the kept tokens'
  softmax is laid out as a CDF in that sorted order, and the request's one uniform draw u for this
  step (``SamplingParams.generator``) picks the first token whose CDF exceeds u x total.

A row whose logits hold NaN or whose best logit is not finite cannot be sampled: ``sample_batch``
reports it instead of raising, so one bad row fails only its own request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ringserve.errors import InvalidArgument


def _is_int(x) -> bool:
    """A true integer: bool is an int subclass, but True is no token count."""
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# Stop strings are matched against the streamed text on every token: bounded so that one request
# cannot make each token cost milliseconds (matching is incremental, see engine/output.py).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False

    def __post_init__(self):
        # A lone string or id is one stop condition, not a sequence of characters or an error.
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        stop_ids = (self.stop_token_ids,) if isinstance(self.stop_token_ids, int) else self.stop_token_ids
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "stop_token_ids", tuple(stop_ids))
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not (0 < self.top_p <= 1):
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidArgument(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not (0 <= self.seed < 2**63)):
            raise InvalidArgument(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidArgument(f"stop strings must be non-empty strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}")
        if (longest := max((len(s) for s in self.stop), default=0)) > MAX_STOP_CHARS:
            raise InvalidArgument(
                f"stop strings may be at most {MAX_STOP_CHARS} characters long, got one of {longest}"
            )
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise InvalidArgument(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")

    def validate_for(self, vocab_size: int, max_context: int | None = None) -> None:
        """Checks that need the model: token ids in range, and (given the context) max_tokens."""
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise InvalidArgument(f"stop_token_ids {bad} are outside the vocabulary (size {vocab_size})")
        if max_context is not None and self.max_tokens > max_context:
            raise InvalidArgument(
                f"max_tokens is {self.max_tokens} but the model's context is {max_context} tokens: ask for fewer"
            )

    def generator(self, step: int) -> torch.Generator:
        """The RNG for the ``step``-th generated token: seeded from (seed, step) when a seed is
        given, so a request draws the same tokens whichever process samples each one (the prefill
        tier samples the first, the decode tier the rest)."""
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed((self.seed + step * 0x9E3779B97F4A7C15) % 2**63)
        return gen


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token from one row of logits [V] (the same algorithm as ``sample_batch``)."""
    token, ok = sample_batch(logits.unsqueeze(0), [params], [generator]).tolist()[0]
    if not ok:
        raise InvalidArgument("the model's logits are not finite (NaN or inf): cannot sample a token")
    return token


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """Next tokens for a batch of rows [B, V], one call on the logits' device; returns [B, 2] int64
    on that device: (token, 1) per row, or (0, 0) for a row that cannot be sampled (see the module
    docstring). ``generators[i]`` is row i's generator for this step; each draws one uniform."""
    device = logits.device
    # One pass over the vocabulary: max gives the first index of the largest value, and a NaN
    # anywhere in a row makes that row's max NaN (not finite).
    best, tokens = logits.max(-1)
    ok = torch.isfinite(best)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        host = torch.tensor(
            [
                [params[i].temperature, params[i].top_k or logits.shape[-1], params[i].top_p]
                + [torch.rand((), generator=generators[i], dtype=torch.float64).item()]
                for i in rows
            ],
            dtype=torch.float64,
        )
        knobs = host.to(device, non_blocking=True)
        index = torch.tensor(rows, device=device)
        tokens = tokens.index_put((index,), _draw(logits.index_select(0, index), knobs))
    return torch.stack([torch.where(ok, tokens, 0), ok.long()], -1)


def _draw(logits: torch.Tensor, knobs: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws for rows [R, V] with knobs [R, 4]: temperature, top_k, top_p, uniform."""
    temperature, top_k, top_p, u = knobs.unbind(-1)
    vocab = logits.shape[-1]
    # float64, shifted so the best logit is 0 before dividing: a tiny temperature then sends the
    # rest to -inf (or far below) instead of making inf - inf = NaN in the softmax.
    x = logits.double()
    x = (x - x.max(-1, keepdim=True).values) / temperature.unsqueeze(-1)
    x = torch.nan_to_num(x, nan=float("-inf"))  # a bad row (reported by the caller) must not raise
    x, order = torch.sort(x, dim=-1, descending=True, stable=True)
    kth = x.gather(-1, (top_k.clamp(1, vocab).long() - 1).unsqueeze(-1))
    x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, -1)
    # Drop tokens once the mass before them already reaches top_p; top_p 1 drops nothing (the
    # mass before a tail token can round up to 1).
    limit = torch.where(top_p < 1, top_p, torch.inf).unsqueeze(-1)
    x = x.masked_fill(probs.cumsum(-1) - probs >= limit, float("-inf"))
    cdf = torch.softmax(x, -1).cumsum(-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=vocab - 1)
    return order.gather(-1, pick).squeeze(-1)
