"""SamplingParams validation and next-token sampling (greedy, temperature, top-k, top-p, seeds)."""

import math
import random
from collections import Counter

import pytest
import torch

from ringserve.engine.sampling import SamplingParams, sample, sample_batch
from ringserve.errors import InvalidArgument

# -- validation ------------------------------------------------------------------------------------

BAD = [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": -0.2}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 4.0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": [3]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": ["2"]}, "stop_token_ids"),
    ({"stop": [str(i) for i in range(17)]}, "at most 16 stop strings"),
    ({"stop": ["x" * 1025]}, "at most 1024 characters long, got one of 1025"),
]


@pytest.mark.parametrize("kwargs,field", BAD, ids=[f"{f}={next(iter(k.values()))!r}" for k, f in BAD])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(InvalidArgument, match=field):
        SamplingParams(**kwargs)


def test_edge_values_are_accepted():
    p = SamplingParams(max_tokens=1, temperature=0, top_p=1, top_k=0, seed=0, stop=["x"], stop_token_ids=[0])
    assert p.stop == ("x",) and p.stop_token_ids == (0,)
    SamplingParams(temperature=100.0, top_p=1e-9, top_k=1, seed=2**63 - 1)


def test_lone_stop_string_and_id_are_one_condition():
    # tuple("\n\n") would be two one-character stop strings: a lone string must stay whole.
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)
    assert SamplingParams(stop_token_ids=7).stop_token_ids == (7,)


def test_stop_token_ids_checked_against_the_vocabulary():
    p = SamplingParams(stop_token_ids=[5, 100, 99])
    p.validate_for(101)
    with pytest.raises(InvalidArgument, match=r"stop_token_ids \[100\].*size 100"):
        p.validate_for(100)


def test_stop_limits_are_inclusive():
    SamplingParams(stop=["x" * 1024] + [str(i) for i in range(15)])


def test_max_tokens_checked_against_the_context():
    SamplingParams(max_tokens=8192).validate_for(100, 8192)
    with pytest.raises(InvalidArgument, match="max_tokens is 1000000000 but the model's context is 8192"):
        SamplingParams(max_tokens=10**9).validate_for(100, 8192)


def test_params_are_immutable():
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 1.0  # type: ignore[misc]


# -- sampling --------------------------------------------------------------------------------------


def random_logits(n: int, seed: int, vocab: int = 500) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(vocab, generator=g) * 3 for _ in range(n)]


def draw(logits: torch.Tensor, params: SamplingParams, n: int) -> list[int]:
    return [sample(logits, params, params.generator(step)) for step in range(n)]


def test_greedy_is_argmax():
    for row in random_logits(20, seed=1):
        # Greedy ignores the other knobs: temperature 0 decides.
        params = SamplingParams(temperature=0, top_k=50, top_p=0.5, seed=3)
        assert sample(row, params, params.generator(0)) == int(row.argmax())
    row = torch.zeros(10)
    row[7] = 1.0
    assert sample(row.to(torch.bfloat16), SamplingParams(), torch.Generator()) == 7


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 100.0])
def test_top_k_1_is_greedy_at_any_temperature(temperature):
    params = SamplingParams(temperature=temperature, top_k=1, seed=11)
    gen = params.generator(0)
    for row in random_logits(20, seed=2):
        assert sample(row, params, gen) == int(row.argmax())


@pytest.mark.parametrize("temperature", [0.7, 1.0, 10.0])
def test_tiny_top_p_is_greedy(temperature):
    params = SamplingParams(temperature=temperature, top_p=1e-6, seed=5)
    gen = params.generator(0)
    for row in random_logits(20, seed=3):
        assert sample(row, params, gen) == int(row.argmax())


@pytest.mark.parametrize("temperature", [1e-30, 1e-300])
def test_tiny_temperature_is_greedy_not_nan(temperature):
    # logits / 1e-300 overflows: sampling must still pick the best token, not fail on NaN.
    params = SamplingParams(temperature=temperature, seed=5)
    gen = params.generator(0)
    for row in random_logits(10, seed=4):
        assert sample(row, params, gen) == int(row.argmax())


def test_same_seed_same_samples_different_seeds_differ():
    logits = torch.zeros(100)  # uniform: every draw is a real choice among 100 tokens
    runs = {seed: draw(logits, SamplingParams(temperature=1.0, seed=seed), 40) for seed in range(8)}
    for seed, tokens in runs.items():
        assert draw(logits, SamplingParams(temperature=1.0, seed=seed), 40) == tokens
    # 8 fixed seeds give 8 different sequences (a collision by chance has probability ~100**-40).
    assert len({tuple(t) for t in runs.values()}) == 8
    # Unseeded generators are seeded randomly.
    unseeded = SamplingParams(temperature=1.0)
    assert draw(logits, unseeded, 40) != draw(logits, unseeded, 40)


def chi_square(counts: Counter, probs: list[float], n: int) -> float:
    return sum((counts.get(i, 0) - n * p) ** 2 / (n * p) for i, p in enumerate(probs) if p > 0)


# The 0.1% point of chi-square is ~24.3 at 7 degrees of freedom; 40 leaves a wide margin, and a
# fixed seed makes the test deterministic anyway. A wrong distribution (e.g. a temperature applied
# twice, or top-p keeping one token too many) gives statistics in the hundreds or more.
CHI2_BOUND = 40.0
DRAWS = 8000


def test_frequencies_match_softmax_at_temperature_1():
    probs = [0.30, 0.20, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02]
    logits = torch.tensor([math.log(p) for p in probs]) + 1.7  # any shift gives the same softmax
    counts = Counter(draw(logits, SamplingParams(temperature=1.0, seed=1234), DRAWS))
    assert set(counts) == set(range(8))
    assert chi_square(counts, probs, DRAWS) < CHI2_BOUND


def test_temperature_sharpens_and_flattens():
    probs = [0.30, 0.20, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02]
    logits = torch.tensor([math.log(p) for p in probs])
    for t in (0.5, 2.0):
        scaled = [p ** (1 / t) for p in probs]
        want = [s / sum(scaled) for s in scaled]
        counts = Counter(draw(logits, SamplingParams(temperature=t, seed=99), DRAWS))
        assert chi_square(counts, want, DRAWS) < CHI2_BOUND


def test_top_k_and_top_p_renormalize_the_kept_tokens():
    probs = [0.4, 0.3, 0.2, 0.1]
    logits = torch.tensor([math.log(p) for p in probs])
    counts = Counter(draw(logits, SamplingParams(temperature=1.0, top_k=3, seed=7), DRAWS))
    assert set(counts) == {0, 1, 2}
    assert chi_square(counts, [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0.0], DRAWS) < CHI2_BOUND
    # top_p 0.6: token 1 is kept (0.4 before it), token 2 is not (0.7 before it).
    counts = Counter(draw(logits, SamplingParams(temperature=1.0, top_p=0.6, seed=7), DRAWS))
    assert set(counts) == {0, 1}
    assert chi_square(counts, [4 / 7, 3 / 7, 0.0, 0.0], DRAWS) < CHI2_BOUND


# -- batched sampling: the same tokens as one row at a time ----------------------------------------


def mixed_params(rnd: random.Random, n: int) -> list[SamplingParams]:
    """Greedy and sampled rows, every knob and its edge values, each row with its own seed."""
    out = []
    for _ in range(n):
        kind = rnd.choice(["greedy", "plain", "top_k", "top_p", "both", "tiny_t", "top_k1", "tiny_p"])
        t = {"greedy": 0.0, "tiny_t": 1e-30}.get(kind, rnd.choice([0.3, 0.7, 1.0, 2.0, 50.0]))
        out.append(
            SamplingParams(
                temperature=t,
                top_k={"top_k": rnd.randint(2, 40), "both": rnd.randint(2, 40), "top_k1": 1}.get(kind, 0),
                top_p={"top_p": rnd.uniform(0.05, 0.99), "both": rnd.uniform(0.05, 0.9), "tiny_p": 1e-9}.get(kind, 1.0),
                seed=rnd.randrange(2**63),
            )
        )
    return out


@pytest.mark.parametrize("seed", range(6))
def test_batched_sampling_equals_one_row_at_a_time(seed):
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    batch, vocab = 24, 300
    logits = torch.randn(batch, vocab, generator=g) * rnd.choice([0.5, 3.0, 10.0])
    logits[0] = 0.0  # every token tied
    logits[1, 5] = logits[1, 9] = logits[1].max() + 1  # a tie for the best token
    logits[2] = torch.randn(vocab, generator=g).round()  # many ties at each value
    params = mixed_params(rnd, batch)
    for step in range(5):
        got = sample_batch(logits, params, [p.generator(step) for p in params])
        want = [sample(logits[i], p, p.generator(step)) for i, p in enumerate(params)]
        assert got[:, 1].tolist() == [1] * batch
        assert got[:, 0].tolist() == want


def test_batched_edge_cases_match_their_definition():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 200, generator=g) * 4
    params = [
        SamplingParams(),  # greedy
        SamplingParams(temperature=0.8, top_k=1, seed=1),
        SamplingParams(temperature=0.8, top_p=1e-9, seed=2),
        SamplingParams(temperature=1e-30, seed=3),
        SamplingParams(temperature=5.0, top_k=1, top_p=0.5, seed=4),
        SamplingParams(temperature=1.0, seed=5),
    ]
    got = sample_batch(logits, params, [p.generator(0) for p in params])[:, 0].tolist()
    assert got[:5] == logits[:5].argmax(-1).tolist()
    assert got[5] == sample(logits[5], params[5], params[5].generator(0))


def test_rows_that_cannot_be_sampled_are_reported_not_raised():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    logits[1, 7] = float("nan")
    logits[2] = float("-inf")
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(4)]
    got = sample_batch(logits, params, [p.generator(0) for p in params])
    assert got[:, 1].tolist() == [1, 0, 0, 1]
    assert got[3, 0] == sample(logits[3], params[3], params[3].generator(0))
    with pytest.raises(InvalidArgument, match="not finite"):
        sample(logits[1], SamplingParams(), torch.Generator())
