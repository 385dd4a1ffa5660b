"""attend + merge: splitting keys into pieces and merging gives the unsplit result; a kernel's
capabilities (bottom-right causal, packed sequences) change how many calls ``attend`` makes, never
the result."""

import dataclasses
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
    out, lse = attend(q, k, v, causal=causal, backend=attention.BACKENDS[backend])
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
    k, v = torch.cat([rand(9, 2, 8, 11), k]), torch.cat([rand(9, 2, 8, 12), v])  # causal over a prefix too
    expected = [attend(q, k, v, causal=c, backend=plain) for c in (False, True)]
    monkeypatch.setattr(attention, "_CPU_MAX_SCORES", 500)
    for c, (e_out, e_lse) in zip((False, True), expected):
        out, lse = attend(q, k, v, causal=c, backend=plain)
        torch.testing.assert_close(out, e_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, e_lse, atol=1e-5, rtol=1e-5)


def test_backend_selection_and_forcing():
    assert attention.backend_name(torch.device("cpu")) == "cpu_flash"
    with pytest.raises(attention.InvalidArgument, match="needs a GPU"):
        attention.set_backend("flash_attn4", "cpu")
    with pytest.raises(attention.InvalidArgument, match="unknown attention backend"):
        attention.set_backend("flash_attn", "cuda")  # flash-attn 2: gone, flash_attn4 does its work


@pytest.mark.parametrize(
    "capability,cudnn,fa4,expected",
    [
        ((9, 0), True, True, "flash_attn4"),  # H100/H200 with ringserve[gpu]
        ((10, 0), True, True, "flash_attn4"),
        ((9, 0), True, False, "cudnn"),  # flash-attn-4 not installed
        ((8, 0), True, True, "cudnn"),  # A100: flash-attn-4 not measured there
        ((8, 0), False, False, "flash"),
        ((7, 5), True, True, "flash"),
    ],
)
def test_cuda_default(capability, cudnn, fa4, expected):
    assert attention.choose_cuda_backend(capability, cudnn, fa4) == expected


def counting(backend: attention.Backend, calls: list) -> attention.Backend:
    """``backend`` with each kernel call recorded (the kernel itself still computes)."""

    def kernel(q, k, v, causal, scale):
        calls.append((q.shape[0], k.shape[0], causal))
        return backend.kernel(q, k, v, causal, scale)

    return dataclasses.replace(backend, kernel=kernel)


@pytest.mark.parametrize("tq,tk", [(1, 9), (5, 5), (4, 23), (16, 17), (9, 4)])
@pytest.mark.parametrize("h,hkv", [(4, 4), (6, 2)])
def test_bottom_right_kernel_is_called_once_and_agrees_with_the_split(tq, tk, h, hkv):
    """The plain kernel masks bottom-right itself; declared incapable, ``attend`` splits causal
    Tq < Tk into a full call over the prefix and a square-causal one. Same result, 1 call vs 2."""
    q, k, v = rand(tq, h, 8, 20), rand(tk, hkv, 8, 21), rand(tk, hkv, 8, 22)
    native_calls, split_calls = [], []
    native = counting(attention.BACKENDS["torch"], native_calls)
    split = counting(dataclasses.replace(attention.BACKENDS["torch"], bottom_right=False), split_calls)
    out, lse = attend(q, k, v, causal=True, backend=native)
    s_out, s_lse = attend(q, k, v, causal=True, backend=split)
    ref_out, ref_lse = reference(q, k, v, True)
    for o, s in ((out, lse), (s_out, s_lse)):
        torch.testing.assert_close(o.double(), ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s.double(), ref_lse, atol=1e-5, rtol=1e-5)
    seen = min(tq, tk)  # queries past the keys see nothing and reach no kernel
    assert native_calls == [(seen, tk, seen > 1)]
    assert len(split_calls) == (2 if 1 < seen < tk else 1)


def packed_reference_kernel(q, k, v, q_lens, k_lens, scale):
    """A packed kernel on CPU, standing in for flash-attn-4's varlen entry: one dense pass over the
    packed rows with a block-diagonal, per-sequence bottom-right causal mask."""
    h, hkv = q.shape[1], k.shape[1]
    seq_q = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens))
    seq_k = torch.repeat_interleave(torch.arange(len(k_lens)), torch.tensor(k_lens))
    starts_q = torch.tensor([0, *q_lens]).cumsum(0)[:-1]
    starts_k = torch.tensor([0, *k_lens]).cumsum(0)[:-1]
    pos_q = torch.arange(q.shape[0]) - starts_q[seq_q] + (torch.tensor(k_lens) - torch.tensor(q_lens))[seq_q]
    pos_k = torch.arange(k.shape[0]) - starts_k[seq_k]
    keep = (seq_q[:, None] == seq_k[None, :]) & (pos_k[None, :] <= pos_q[:, None])
    kr, vr = k.float().repeat_interleave(h // hkv, 1), v.float().repeat_interleave(h // hkv, 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), kr) * scale
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("hqk,khd->qhd", torch.exp(s - lse.unsqueeze(-1)), vr)
    return out.to(q.dtype), lse.transpose(0, 1)


@pytest.mark.parametrize("seed", range(4))
def test_packed_kernel_agrees_with_one_call_per_sequence(seed):
    """``attend_packed`` through a packed kernel (one call) gives what one ``attend`` per sequence
    gives (the CPU default's path), sequences of any lengths, chunks over a prefix included."""
    rng = random.Random(seed)
    hkv = rng.choice([1, 2])
    h = hkv * rng.choice([1, 3])
    q_lens = [rng.randint(1, 9) for _ in range(rng.randint(2, 4))]
    k_lens = [n + rng.choice([0, 0, rng.randint(1, 12)]) for n in q_lens]
    q = rand(sum(q_lens), h, 8, seed)
    keys = [rand(n, hkv, 8, seed + 10 + i) for i, n in enumerate(k_lens)]
    values = [rand(n, hkv, 8, seed + 20 + i) for i, n in enumerate(k_lens)]
    calls = []

    def packed(*args):
        calls.append(args[3])
        return packed_reference_kernel(*args)

    one_call = dataclasses.replace(attention.BACKENDS["cpu_flash"], packed=packed)
    out, lse = attention.attend_packed(q, keys, values, q_lens, backend=one_call)
    per_seq, per_seq_lse = attention.attend_packed(q, keys, values, q_lens)
    assert calls == [tuple(q_lens)]
    torch.testing.assert_close(out, per_seq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, per_seq_lse, atol=1e-5, rtol=1e-5)
    for i, qs in enumerate(q.split(q_lens)):
        ref_out, _ = reference(qs, keys[i], values[i], True)
        torch.testing.assert_close(per_seq.split(q_lens)[i].double(), ref_out, atol=1e-5, rtol=1e-5)
