"""TextOutput: incremental stop-string matching gives exactly what matching the whole text gives,
and streamed text equals the decoded text (multi-byte characters, no prompt context needed)."""

import random

import pytest

from ringserve.engine.output import TextOutput
from ringserve.engine.sampling import SamplingParams
from ringserve.engine.tokenizer import StreamDecoder, Tokenizer

TEXT = "Caf\u00e9 au lait: 日本語のテキスト, naïve résumé 🙂 -- the end. And then, the end again.\n\nDone."


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    return Tokenizer.from_checkpoint(default_gguf)


def reference(tokenizer, ids, stops):
    """The straightforward rule: after each token, look for every stop string in the whole text so
    far (earliest start wins), and hold back the longest tail that starts a stop string."""
    decoder, full, shown, events = StreamDecoder(tokenizer), "", 0, []
    for t in ids:
        full += decoder.push(t)
        hits = [i for i in (full.find(s) for s in stops) if i >= 0]
        if hits:
            events.append((full[shown : min(hits)], True))
            return events
        hold = max((n for s in stops for n in range(1, len(s)) if full.endswith(s[:n])), default=0)
        events.append((full[shown : len(full) - hold], False))
        shown = len(full) - hold
    return events


def stream(tokenizer, ids, stops):
    out = TextOutput(tokenizer, SamplingParams(stop=stops, ignore_eos=True))
    events = []
    for t in ids:
        events.append(out.push(t))
        if events[-1][1]:
            break
    return events


def test_streamed_text_is_the_decoded_text(tokenizer):
    ids = tokenizer.encode(TEXT)
    out = TextOutput(tokenizer, SamplingParams(ignore_eos=True))
    assert "".join(out.push(t)[0] for t in ids) + out.finish() == TEXT == tokenizer.decode(ids)


@pytest.mark.parametrize("seed", range(8))
def test_stop_strings_match_like_the_whole_text_rule(tokenizer, seed):
    rnd = random.Random(seed)
    ids = tokenizer.encode(TEXT)
    stops = []
    for _ in range(rnd.randint(1, 5)):  # pieces of the text (spanning tokens) and near misses
        i = rnd.randrange(len(TEXT) - 1)
        piece = TEXT[i : i + rnd.randint(1, 12)]
        stops.append(piece if rnd.random() < 0.7 else piece + "#")
    assert stream(tokenizer, ids, stops) == reference(tokenizer, ids, stops)


def test_self_overlapping_stop_strings(tokenizer):
    ids = tokenizer.encode("aaab abab ababac the end")
    for stops in (["aab"], ["ababac"], ["abac", "b a"], ["the end", "end"]):
        assert stream(tokenizer, ids, stops) == reference(tokenizer, ids, stops), stops


def test_a_long_stop_string_holds_back_only_what_may_start_it(tokenizer):
    ids = tokenizer.encode(TEXT)
    stop = "the end. And then, the" + "x" * 1000
    events = stream(tokenizer, ids, [stop])
    assert events == reference(tokenizer, ids, [stop]) and not any(done for _, done in events)


def test_the_output_stage_keeps_each_streams_order(tokenizer):
    """Tokens added but not yet flushed still reach the stream before an error that follows them,
    a flush delivers one step's tokens, and nothing after a stream's last event is shown."""
    import queue
    from types import SimpleNamespace

    from ringserve.decode_service.stream import OutputStage
    from ringserve.errors import Cancelled

    def request(name):
        params = SamplingParams(ignore_eos=True)
        return SimpleNamespace(
            request_id=name, output=TextOutput(tokenizer, params), events=queue.Queue(), stopped=False, closed=False
        )

    ids = tokenizer.encode("Hello there")
    a, b = request("a"), request("b")
    stage = OutputStage()
    try:
        stage.tokens([(a, ids[0], None), (b, ids[0], None)])
        stage.error(a, Cancelled("a was cancelled"))  # a's pending token goes first
        stage.tokens([(a, ids[1], None), (b, ids[1], "length")])  # a's stream is over: dropped
        stage.flush()
    finally:
        stage.close()
    got_a = [a.events.get(timeout=10) for _ in range(2)]
    got_b = [b.events.get(timeout=10) for _ in range(2)]
    assert [e.token_id for e in got_a[:1]] == ids[:1] and isinstance(got_a[1], Cancelled)
    assert [e.token_id for e in got_b] == ids[:2] and got_b[-1].finish_reason == "length"
    assert a.events.empty() and b.events.empty()
