"""attend + merge: splitting keys into pieces and merging gives the unsplit result."""

import math
import random

import pytest
import torch

from ringserve.engine import attention
from ringserve.engine.attention import attend, merge


def reference(q, k, v, causal):
    """Naive float64 attention with explicit GQA repeat and a bottom-right causal mask."""
    tq, h, d = q.shape
    tk, hkv, _ = k.shape
    kr = k.double().repeat_interleave(h // hkv, 1)
    vr = v.double().repeat_interleave(h // hkv, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kr) / math.sqrt(d)
    if causal:
        i = torch.arange(tq).unsqueeze(1)
        j = torch.arange(tk).unsqueeze(0)
        s = s.masked_fill(j > i + (tk - tq), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0, lse).unsqueeze(-1))
    out = torch.einsum("hqk,khd->qhd", p, vr)
    return out, lse.transpose(0, 1)


def rand(t, h, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, h, d, generator=g)


@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (6, 1), (9, 3)])
@pytest.mark.parametrize("tq,tk", [(1, 1), (1, 17), (5, 5), (7, 30), (13, 13), (20, 8), (3, 0), (0, 4)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", attention.CPU_BACKENDS)
def test_attend_matches_reference(h, hkv, tq, tk, causal, backend):
    q, k, v = rand(tq, h, 16, 1), rand(tk, hkv, 16, 2), rand(tk, hkv, 16, 3)
    out, lse = attend(q, k, v, causal=causal, kernel=attention.BACKENDS[backend])
    ref_out, ref_lse = reference(q, k, v, causal)
    assert out.shape == (tq, h, 16) and lse.shape == (tq, h) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_are_empty():
    q, k, v = rand(6, 2, 8, 1), rand(2, 2, 8, 2), rand(2, 2, 8, 3)
    out, lse = attend(q, k, v, causal=True)  # first 4 queries see no key
    assert torch.all(out[:4] == 0) and torch.all(torch.isneginf(lse[:4]))
    assert torch.all(torch.isfinite(lse[4:]))


@pytest.mark.parametrize("seed", range(6))
def test_split_keys_and_merge_equals_unsplit(seed):
    rng = random.Random(seed)
    hkv = rng.choice([1, 2, 3])
    h = hkv * rng.choice([1, 2, 4])
    tq, tk = rng.randint(1, 12), rng.randint(1, 40)
    q, k, v = rand(tq, h, 8, seed), rand(tk, hkv, 8, seed + 100), rand(tk, hkv, 8, seed + 200)
    whole, whole_lse = attend(q, k, v, causal=False)
    # Random cut points, empty pieces included.
    cuts = sorted([0, tk] + [rng.randint(0, tk) for _ in range(rng.randint(1, 5))])
    out = torch.zeros_like(whole)
    lse = torch.full_like(whole_lse, float("-inf"))
    for a, b in zip(cuts, cuts[1:]):
        out, lse = merge(out, lse, *attend(q, k[a:b], v[a:b], causal=False))
    torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, whole_lse, atol=1e-5, rtol=1e-5)


def test_merge_of_two_empty_partials_stays_empty():
    out = torch.zeros(3, 2, 4)
    lse = torch.full((3, 2), float("-inf"))
    m_out, m_lse = merge(out, lse, out.clone(), lse.clone())
    assert torch.all(m_out == 0) and torch.all(torch.isneginf(m_lse))
    assert not torch.isnan(m_out).any()


def test_causal_split_pieces_merge_to_causal():
    """Causal over a prefix + new keys = full over the prefix merged with causal over the rest."""
    q, k, v = rand(9, 4, 8, 5), rand(25, 2, 8, 6), rand(25, 2, 8, 7)
    whole = attend(q, k, v, causal=True)
    parts = merge(*attend(q, k[:16], v[:16], causal=False), *attend(q, k[16:], v[16:], causal=True))
    torch.testing.assert_close(parts[0], whole[0], atol=1e-5, rtol=1e-5)


def test_cpu_query_slicing_matches(monkeypatch):
    """Long prompts are attended in query slices on CPU; the result must not change."""
    q, k, v = rand(40, 4, 8, 8), rand(40, 2, 8, 9), rand(40, 2, 8, 10)
    plain = attention.BACKENDS["torch"]
    expected = [attend(q, k, v, causal=c, kernel=plain) for c in (False, True)]
    monkeypatch.setattr(attention, "_CPU_MAX_SCORES", 500)
    for c, (e_out, e_lse) in zip((False, True), expected):
        out, lse = attend(q, k, v, causal=c, kernel=plain)
        torch.testing.assert_close(out, e_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, e_lse, atol=1e-5, rtol=1e-5)


def test_backend_selection_and_forcing():
    assert attention.backend_name(torch.device("cpu")) == "cpu_flash"
    with pytest.raises(attention.InvalidArgument, match="needs a GPU"):
        attention.set_backend("cudnn", "cpu")
    with pytest.raises(attention.InvalidArgument, match="unknown attention backend"):
        attention.set_backend("nope", "cuda")
