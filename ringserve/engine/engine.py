"""The single-process engine: one model, one paged KV cache, prefill (in chunks) then decode.

This is the path `ringserve generate` runs, and the reference the distributed tiers are tested
against: a request's KV blocks are taken as it grows and all returned when it ends, however it
ends.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ringserve.engine.kv_cache import DEFAULT_BLOCK_SIZE, KVCache, PagedAttention, SeqSpan, blocks_needed
from ringserve.engine.model import Llama
from ringserve.engine.output import TextOutput
from ringserve.engine.sampling import SamplingParams, sample
from ringserve.engine.tokenizer import Tokenizer
from ringserve.errors import InvalidArgument

log = logging.getLogger(__name__)


def check_prompt(prompt_ids, max_context: int, vocab_size: int) -> list[int]:
    """The prompt as a list of ints, or InvalidArgument naming the limit it breaks. Every tier
    that takes token ids (engine, router, prefill) checks them with this."""
    try:
        prompt_ids = [operator.index(t) for t in prompt_ids]
    except TypeError as e:
        raise InvalidArgument(f"prompt token ids must be integers: {e}") from e
    if not prompt_ids:
        raise InvalidArgument("the prompt is empty: give at least one token of text")
    if len(prompt_ids) >= max_context:
        raise InvalidArgument(
            f"the prompt has {len(prompt_ids)} tokens but the model's context is {max_context}: "
            "shorten it to leave room for at least one generated token"
        )
    if any(not 0 <= t < vocab_size for t in prompt_ids):
        raise InvalidArgument(f"prompt token ids must be in [0, {vocab_size}), the vocabulary size")
    return prompt_ids


@dataclass
class TokenEvent:
    """One generated token: its id, the text it makes visible, and why generation ended (if it did)."""

    token_id: int
    text: str
    finish_reason: str | None = None  # "stop" | "length"


@dataclass
class Sequence:
    """A request's tokens and the KV blocks that hold them."""

    token_ids: list[int]
    block_table: list[int]
    num_cached: int = 0  # tokens whose KV is in the cache


class Engine:
    """Runs requests one at a time on one device."""

    def __init__(
        self,
        model: Llama,
        tokenizer: Tokenizer,
        num_blocks: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        prefill_chunk: int | None = None,
    ):
        """``num_blocks`` of ``block_size`` tokens hold the KV (default: one full-context request);
        ``prefill_chunk`` splits long prompts into chunks of that many tokens (None: one pass)."""
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise InvalidArgument(f"prefill_chunk must be an integer >= 1 (or None), got {prefill_chunk!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise InvalidArgument(f"block_size must be an integer >= 1, got {block_size!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_context = self.config.max_position_embeddings
        if num_blocks is None:  # room for one request of the full context
            num_blocks = blocks_needed(self.max_context, block_size)
        param = next(model.parameters())
        self.cache = KVCache(self.config, num_blocks, block_size, dtype=param.dtype, device=param.device)
        self.device = param.device
        self.prefill_chunk = prefill_chunk

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        progress: bool = True,
        **kwargs,
    ) -> Engine:
        """Model and tokenizer from a checkpoint (None: the embedded default); ``progress`` shows
        a loading bar on stderr; ``kwargs`` go to ``Engine``."""
        model = Llama.load(path, dtype=dtype, device=device, progress=progress)
        return cls(model, Tokenizer.from_checkpoint(path), **kwargs)

    def check_prompt(self, prompt_ids: list[int]) -> list[int]:
        """Reject prompts this model cannot take (see ``check_prompt``)."""
        return check_prompt(prompt_ids, self.max_context, self.config.vocab_size)

    @torch.inference_mode()
    def forward(self, seq: Sequence, num_new: int, want_logits: bool) -> torch.Tensor | None:
        """Run the next ``num_new`` tokens of ``seq`` through the model, growing its blocks."""
        start = seq.num_cached
        end = start + num_new
        grow = blocks_needed(end, self.cache.block_size) - len(seq.block_table)
        if grow > 0:
            seq.block_table += self.cache.allocator.allocate(grow)
        ids = torch.tensor(seq.token_ids[start:end], device=self.device)
        positions = torch.arange(start, end, device=self.device)
        attention = PagedAttention(self.cache, [SeqSpan(0, num_new, seq.block_table, start)])
        if want_logits:
            # Only the last row is sampled; a one-token step needs no row selection at all.
            last = None if num_new == 1 else torch.tensor([num_new - 1], device=self.device)
        else:
            last = torch.tensor([], dtype=torch.long, device=self.device)
        logits = self.model(ids, positions, attention, logits_at=last)
        seq.num_cached = end
        return logits[-1] if want_logits else None

    def prefill(self, seq: Sequence) -> torch.Tensor:
        """All of the prompt, in chunks of ``prefill_chunk`` tokens when set; the last token's logits."""
        chunk = self.prefill_chunk or len(seq.token_ids)
        logits = None
        while seq.num_cached < len(seq.token_ids):
            n = min(chunk, len(seq.token_ids) - seq.num_cached)
            logits = self.forward(seq, n, want_logits=seq.num_cached + n == len(seq.token_ids))
        return logits

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """Stream tokens for one prompt; the request's KV blocks are freed however it ends.

        Bad input raises here, at the call, not at the first ``next()``: a caller learns of it
        before it starts streaming anything. Blocks are only taken once iteration starts.
        """
        prompt_ids = self.check_prompt(prompt_ids)
        params.validate_for(self.config.vocab_size, self.max_context)
        return self._generate(prompt_ids, params)

    def _generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        seq = Sequence(prompt_ids, [])
        output = TextOutput(self.tokenizer, params)
        try:
            logits = self.prefill(seq)
            for i in range(params.max_tokens):
                token = sample(logits, params, params.generator(i))
                text, stopped = output.push(token)
                seq.token_ids.append(token)
                at_limit = i + 1 == params.max_tokens or len(seq.token_ids) >= self.max_context
                if stopped or at_limit:
                    text += "" if stopped else output.finish()
                    yield TokenEvent(token, text, "stop" if stopped else "length")
                    return
                yield TokenEvent(token, text)
                logits = self.forward(seq, 1, want_logits=True)
        finally:
            self.cache.allocator.free(seq.block_table)
