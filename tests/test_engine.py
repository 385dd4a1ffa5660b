"""The single-process Engine on the default model: greedy output equals transformers' generate,
stop conditions, input errors, and KV blocks returned however a request ends."""

import pytest
import torch
from test_model import ours_from, tiny_hf
from transformers import LlamaForCausalLM

from ringserve.engine.engine import Engine, TokenEvent
from ringserve.engine.sampling import SamplingParams
from ringserve.errors import InvalidArgument, ResourceExhausted

FRANCE = "The capital of France is"
# Long enough that prefill in chunks of 7 takes several chunks, some across 16-token blocks.
STORY = (
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker who had a secret. Every night, when the village was asleep,"
)
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def model_and_tok(default_model):
    return default_model


@pytest.fixture(scope="module")
def engine(model_and_tok) -> Engine:
    model, tok = model_and_tok
    return Engine(model, tok)


@pytest.fixture(autouse=True)
def no_leaked_blocks(engine):
    """Every test leaves the shared engine's KV cache empty, however its requests ended."""
    yield
    assert engine.cache.allocator.num_used == 0


@pytest.fixture(scope="module")
def hf_model(default_gguf) -> LlamaForCausalLM:
    """transformers' own load of the same GGUF (its own dequantization), float32."""
    model = LlamaForCausalLM.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def hf_greedy(hf_model, model_and_tok):
    """prompt -> the first NEW_TOKENS greedy token ids from transformers' generate (eos ignored)."""
    _, tok = model_and_tok
    cache: dict[str, list[int]] = {}

    def get(prompt: str) -> list[int]:
        if prompt not in cache:
            ids = tok.encode(prompt)
            with torch.no_grad():
                out = hf_model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    eos_token_id=None,  # go on past eos, like ignore_eos
                    pad_token_id=0,
                )
            cache[prompt] = out[0, len(ids) :].tolist()
        return cache[prompt]

    return get


def run(engine: Engine, prompt: str | list[int], **kwargs) -> list[TokenEvent]:
    ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    return list(engine.generate(ids, SamplingParams(**kwargs)))


def text_of(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)


@pytest.fixture(scope="module")
def france_ref(engine) -> list[TokenEvent]:
    """Our greedy continuation of FRANCE, eos ignored (checked against transformers below)."""
    return run(engine, FRANCE, max_tokens=NEW_TOKENS, ignore_eos=True)


# -- same tokens as transformers -------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [FRANCE, STORY], ids=["france", "story"])
@pytest.mark.parametrize("chunk", [None, 7], ids=["whole", "chunks-of-7"])
def test_greedy_matches_transformers_generate(model_and_tok, hf_greedy, prompt, chunk):
    model, tok = model_and_tok
    engine = Engine(model, tok, num_blocks=8, block_size=16, prefill_chunk=chunk)
    events = run(engine, prompt, max_tokens=NEW_TOKENS, ignore_eos=True)
    assert [e.token_id for e in events] == hf_greedy(prompt)
    assert engine.cache.allocator.num_used == 0
    if prompt == FRANCE:
        assert text_of(events).startswith(" Paris.")


def test_events_stream_the_decoded_text(engine, france_ref):
    assert len(france_ref) == NEW_TOKENS
    assert all(e.finish_reason is None for e in france_ref[:-1])
    assert france_ref[-1].finish_reason == "length"
    ids = [e.token_id for e in france_ref]
    assert text_of(france_ref) == engine.tokenizer.decode(ids)


# -- stopping --------------------------------------------------------------------------------------


def test_stop_string_is_not_shown(engine, france_ref):
    ref = text_of(france_ref)
    assert "answer" in ref  # " Paris.\n\nThe answer is: ..."
    events = run(engine, FRANCE, max_tokens=NEW_TOKENS, ignore_eos=True, stop=["answer"])
    assert text_of(events) == ref[: ref.index("answer")]
    assert not any("answer" in e.text for e in events)
    assert events[-1].finish_reason == "stop"
    assert all(e.finish_reason is None for e in events[:-1])


def test_stop_string_across_tokens_is_held_back(engine, france_ref):
    """The tokens " Paris" and "." are separate: the stop string "is." is only known after the
    second one, so the first event must already hold back "is"."""
    assert [e.text for e in france_ref[:2]] == [" Paris", "."]
    events = run(engine, FRANCE, max_tokens=NEW_TOKENS, stop=["is."])
    assert [e.text for e in events] == [" Par", ""]
    assert events[-1].finish_reason == "stop"


def test_earliest_stop_string_wins(engine, france_ref):
    events = run(engine, FRANCE, max_tokens=NEW_TOKENS, ignore_eos=True, stop=["answer", "\n"])
    assert text_of(events) == " Paris."
    assert events[-1].finish_reason == "stop"


def test_held_back_text_is_flushed_when_no_stop_follows(engine, france_ref):
    # " Paris." ends in "." which starts the stop string ".X": held, then released at the length limit.
    events = run(engine, FRANCE, max_tokens=2, stop=[".X"])
    assert [e.text for e in events] == [" Paris", "."]
    assert events[-1].finish_reason == "length"


def test_stop_token_id(engine, france_ref):
    dot = france_ref[1].token_id
    events = run(engine, FRANCE, max_tokens=NEW_TOKENS, stop_token_ids=[dot])
    assert [e.token_id for e in events] == [france_ref[0].token_id, dot]
    assert text_of(events) == " Paris"  # the stop token's own text is not shown
    assert events[-1].finish_reason == "stop"


def test_max_tokens_gives_length(engine, france_ref):
    events = run(engine, FRANCE, max_tokens=5, ignore_eos=True)
    assert len(events) == 5
    assert [e.token_id for e in events] == [e.token_id for e in france_ref[:5]]
    assert [e.finish_reason for e in events] == [None] * 4 + ["length"]


def test_eos_stops(engine, france_ref):
    eos = engine.tokenizer.eos_token_ids
    ref_ids = [e.token_id for e in france_ref]
    first_eos = next(i for i, t in enumerate(ref_ids) if t in eos)  # greedy reaches eos within 40
    events = run(engine, FRANCE, max_tokens=NEW_TOKENS)
    assert [e.token_id for e in events] == ref_ids[: first_eos + 1]
    assert events[-1].finish_reason == "stop"
    assert text_of(events) == engine.tokenizer.decode(ref_ids[:first_eos])  # eos text not shown


def test_sampling_with_a_seed_is_reproducible(engine):
    kwargs = dict(max_tokens=12, temperature=0.9, top_p=0.95, seed=42, ignore_eos=True)
    a = [e.token_id for e in run(engine, FRANCE, **kwargs)]
    assert a == [e.token_id for e in run(engine, FRANCE, **kwargs)]
    kwargs["seed"] = 43
    assert a != [e.token_id for e in run(engine, FRANCE, **kwargs)]


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids,match",
    [
        ([], "empty"),
        ([1, -1], r"\[0, 49152\)"),
        ([49152], r"\[0, 49152\)"),
        ([1, 2.5], "integers"),
    ],
    ids=["empty", "negative", "past-vocab", "float"],
)
def test_bad_prompt_ids_raise_at_the_call(engine, ids, match):
    with pytest.raises(InvalidArgument, match=match):
        engine.generate(ids, SamplingParams())  # no iteration needed: checked before streaming


def test_stop_token_ids_outside_the_vocabulary(engine):
    with pytest.raises(InvalidArgument, match="stop_token_ids"):
        engine.generate([1, 2, 3], SamplingParams(stop_token_ids=[49152]))


@pytest.fixture(scope="module")
def tiny_engine(model_and_tok) -> Engine:
    """A random 3-layer model with a 256-token context (vocab 97), with the default tokenizer."""
    return Engine(ours_from(tiny_hf(4, 2, tied=False)), model_and_tok[1])


def test_prompt_must_fit_the_context(tiny_engine):
    assert tiny_engine.max_context == 256
    with pytest.raises(InvalidArgument, match="256 tokens but the model's context is 256"):
        tiny_engine.generate([5] * 256, SamplingParams())
    with pytest.raises(InvalidArgument, match="300 tokens"):
        tiny_engine.generate([5] * 300, SamplingParams())


def test_max_tokens_beyond_the_context_is_refused_at_the_call(tiny_engine):
    with pytest.raises(InvalidArgument, match="max_tokens is 257 but the model's context is 256"):
        tiny_engine.generate([5] * 10, SamplingParams(max_tokens=257))


def test_generation_stops_at_the_context(tiny_engine):
    events = list(tiny_engine.generate([5] * 250, SamplingParams(max_tokens=100, ignore_eos=True)))
    assert len(events) == 6  # 250 + 6 = 256 tokens: the whole context
    assert events[-1].finish_reason == "length"
    assert tiny_engine.cache.allocator.num_used == 0


@pytest.mark.parametrize("chunk", [0, -4])
def test_prefill_chunk_must_be_positive(model_and_tok, chunk):
    with pytest.raises(InvalidArgument, match="prefill_chunk"):
        Engine(*model_and_tok, num_blocks=1, prefill_chunk=chunk)


def test_block_size_must_be_positive(model_and_tok):
    with pytest.raises(InvalidArgument, match="block_size"):
        Engine(*model_and_tok, num_blocks=1, block_size=0)


# -- KV blocks are returned however a request ends -------------------------------------------------


def test_blocks_held_while_running_and_freed_after(engine):
    gen = engine.generate(engine.tokenizer.encode(FRANCE), SamplingParams(max_tokens=3, ignore_eos=True))
    assert engine.cache.allocator.num_used == 0  # nothing is taken before iteration starts
    next(gen)
    assert engine.cache.allocator.num_used == 1  # 6 tokens in one 64-token block
    assert len(list(gen)) == 2
    assert engine.cache.allocator.num_used == 0


def test_closing_the_stream_early_frees_blocks(engine):
    gen = engine.generate(engine.tokenizer.encode(STORY), SamplingParams(max_tokens=50, ignore_eos=True))
    next(gen)
    next(gen)
    assert engine.cache.allocator.num_used > 0
    gen.close()  # the consumer went away (a client disconnect)
    assert engine.cache.allocator.num_used == 0


def test_stopped_early_frees_blocks(engine):
    events = run(engine, FRANCE, max_tokens=NEW_TOKENS, stop=["."])
    assert events[-1].finish_reason == "stop" and len(events) == 2
    assert engine.cache.allocator.num_used == 0


def test_cache_full_during_decode_raises_and_frees(model_and_tok):
    engine = Engine(*model_and_tok, num_blocks=1, block_size=16)
    ids = engine.tokenizer.encode(FRANCE)  # 5 tokens: the one block holds 11 more
    events = []
    with pytest.raises(ResourceExhausted, match="KV cache full"):
        for event in engine.generate(ids, SamplingParams(max_tokens=30, ignore_eos=True)):
            events.append(event)
    # The 12th token is streamed; storing its KV would need a 17th slot.
    assert len(events) == 16 - len(ids) + 1
    assert engine.cache.allocator.num_used == 0


def test_cache_full_during_prefill_raises_and_frees(model_and_tok):
    engine = Engine(*model_and_tok, num_blocks=2, block_size=4, prefill_chunk=4)
    gen = engine.generate(engine.tokenizer.encode(STORY), SamplingParams())
    with pytest.raises(ResourceExhausted):
        next(gen)  # the second chunk got its block; the third finds none
    assert engine.cache.allocator.num_used == 0
