"""Generated token ids -> streamed text, with stop tokens and stop strings applied."""

from __future__ import annotations

from ringserve.engine.sampling import SamplingParams
from ringserve.engine.tokenizer import StreamDecoder, Tokenizer


class _PrefixMatcher:
    """How much of one stop string the text seen so far ends with (Knuth-Morris-Pratt): each new
    character costs O(1) amortized, whatever the string's length, and never rescans old text."""

    def __init__(self, stop: str):
        self.stop = stop
        self.fail = [0] * len(stop)  # fail[i]: longest proper border of stop[: i + 1]
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            k += stop[i] == stop[k]
            self.fail[i] = k
        self.matched = 0  # the longest prefix of ``stop`` that the text ends with

    def feed(self, text: str) -> bool:
        """Advance over new text; True once the whole stop string has appeared."""
        s, k = self.stop, self.matched
        for c in text:
            while k and c != s[k]:
                k = self.fail[k - 1]
            k += c == s[k]
            if k == len(s):
                self.matched = k
                return True
        self.matched = k
        return False


class TextOutput:
    """Feeds tokens one at a time; returns the text that is safe to show and whether to stop.

    Text that could be the start of a stop string is held back until it is clear either way, so
    a client never sees part of a stop string. The held-back text is shorter than the longest stop
    string, so a token's work is bounded by the new text and that window (``SamplingParams``
    bounds stop strings' number and length).
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams):
        self.decoder = StreamDecoder(tokenizer)
        self.stop_strings = params.stop
        self.matchers = [_PrefixMatcher(s) for s in params.stop]
        self.stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_ids.update(tokenizer.eos_token_ids)
        self.pending = ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """(text to emit, stopped). A stop token or string ends the output and is not shown."""
        if token_id in self.stop_ids:
            return self.finish(), True
        new = self.decoder.push(token_id)
        self.pending += new
        if any([m.feed(new) for m in self.matchers]):  # a list: every matcher sees the new text
            # A match lies within the held-back window plus the new text: the earliest one wins.
            cut = min(i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0)
            text, self.pending = self.pending[:cut], ""
            return text, True
        hold = max((m.matched for m in self.matchers), default=0)
        cut = len(self.pending) - hold
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, False

    def finish(self) -> str:
        """Everything still held back (call once, when generation ends for another reason)."""
        text, self.pending = self.pending + self.decoder.flush(), ""
        return text
