"""Generated token ids -> streamed text, with stop tokens and stop strings applied."""

from __future__ import annotations

from ringserve.engine.sampling import SamplingParams
from ringserve.engine.tokenizer import StreamDecoder, Tokenizer


class TextOutput:
    """Feeds tokens one at a time; returns the text that is safe to show and whether to stop.

    Text that could be the start of a stop string is held back until it is clear either way, so
    a client never sees part of a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams):
        self.decoder = StreamDecoder(tokenizer)
        self.stop_strings = params.stop
        self.stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_ids.update(tokenizer.eos_token_ids)
        self.pending = ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """(text to emit, stopped). A stop token or string ends the output and is not shown."""
        if token_id in self.stop_ids:
            return self.finish(), True
        self.pending += self.decoder.push(token_id)
        hits = [i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            text, self.pending = self.pending[: min(hits)], ""
            return text, True
        hold = max(
            (n for s in self.stop_strings for n in range(1, len(s)) if self.pending.endswith(s[:n])),
            default=0,
        )
        cut = len(self.pending) - hold
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, False

    def finish(self) -> str:
        """Everything still held back (call once, when generation ends for another reason)."""
        text, self.pending = self.pending + self.decoder.flush(), ""
        return text
