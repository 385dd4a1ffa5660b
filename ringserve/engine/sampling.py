"""Sampling parameters (validated once, at the edge) and next-token sampling."""

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
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise InvalidArgument(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")

    def validate_for(self, vocab_size: int) -> None:
        """Checks that need the model: token ids in range."""
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise InvalidArgument(f"stop_token_ids {bad} are outside the vocabulary (size {vocab_size})")

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
    """Pick the next token from one row of logits [V]."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    # float64, shifted so the best logit is 0 before dividing: a tiny temperature then sends the
    # rest to -inf instead of making inf - inf = NaN in the softmax.
    logits = logits.double().cpu()
    logits = (logits - logits.max()) / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        # Drop tokens once the mass before them already reaches top_p (the first always stays).
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))
