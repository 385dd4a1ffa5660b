"""The Triton kernels of a half-precision forward (engine/kernels.py) against the PyTorch code they
replace: this process computes the PyTorch results in float16 on CPU, a fresh process with Triton's
interpreter (it has no bfloat16) runs the kernels on the same inputs and compares."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from test_model import ours_from, tiny_hf

from ringserve.engine import kernels
from ringserve.engine.kv_cache import KVCache, PagedAttention, SeqSpan
from ringserve.engine.model import RMSNorm, apply_rope


def cases() -> dict:
    """Inputs and the PyTorch results (this process has no interpreter: the PyTorch path)."""
    g = torch.Generator().manual_seed(0)
    t, hidden, heads, kv_heads, dim = 5, 72, 4, 2, 12  # sizes that are not powers of two: masks
    x, res = (torch.randn(t, hidden, generator=g).half() for _ in range(2))
    norm = RMSNorm(hidden, 1e-5).half()
    norm.weight.data.uniform_(0.5, 1.5, generator=g)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim, generator=g).half()
    angles = torch.randn(t, dim // 2, generator=g) * 10
    cos, sin = torch.cat([angles, angles], -1).cos().half(), torch.cat([angles, angles], -1).sin().half()
    nq, nkv = heads * dim, kv_heads * dim
    gate_up = torch.randn(t, 2 * hidden, generator=g).half() * 3
    hf = tiny_hf(heads=4, kv_heads=2, tied=False, seed=5)
    model = ours_from(hf).half()
    ids = torch.randint(0, model.config.vocab_size, (9,), generator=g)
    with torch.inference_mode():
        logits = forward(model, ids)
    return dict(
        x=x, res=res, weight=norm.weight.detach(), norm=norm(x)[0], norm_res=norm(x, res),
        qkv=qkv, cos=cos, sin=sin, shape=(heads, kv_heads, dim),
        q=apply_rope(qkv[:, :nq].view(t, heads, dim), cos, sin),
        k=apply_rope(qkv[:, nq : nq + nkv].view(t, kv_heads, dim), cos, sin),
        gate_up=gate_up, silu=F.silu(gate_up[:, :hidden]) * gate_up[:, hidden:],
        state=model.state_dict(), config=model.config, ids=ids, logits=logits,
    )  # fmt: skip


def forward(model, ids: torch.Tensor) -> torch.Tensor:
    """A prompt in two chunks over a paged cache (the second attends the first's cached KV)."""
    cache = KVCache(model.config, 8, 4, dtype=torch.float16)
    table = cache.allocator.allocate(4)
    first = model(ids[:5], torch.arange(5), PagedAttention(cache, [SeqSpan(0, 5, table, 0)]))
    rest = model(ids[5:], torch.arange(5, 9), PagedAttention(cache, [SeqSpan(0, 4, table, 5)]))
    return torch.cat([first, rest])


def check(path: str) -> None:
    """In the interpreter: every kernel, and a whole model forward, against the saved results."""
    from ringserve.engine.model import Llama

    c = torch.load(path, weights_only=False)
    assert kernels.use_kernel(c["x"]), "run with TRITON_INTERPRET=1"
    y, s = kernels.add_rms_norm(c["x"], None, c["weight"], 1e-5)
    torch.testing.assert_close(y, c["norm"], atol=2e-3, rtol=2e-3)  # only the sum's order differs
    assert s is c["x"]
    y, s = kernels.add_rms_norm(c["x"], c["res"], c["weight"], 1e-5)
    torch.testing.assert_close(y, c["norm_res"][0], atol=2e-3, rtol=2e-3)
    assert torch.equal(s, c["norm_res"][1])
    heads, kv_heads, dim = c["shape"]
    q, k, v = kernels.rope(c["qkv"], c["cos"], c["sin"], heads, kv_heads, dim)
    assert torch.equal(q, c["q"]) and torch.equal(k, c["k"]), "RoPE rounds as PyTorch does: same bits"
    assert torch.equal(v, c["qkv"][:, (heads + kv_heads) * dim :].view(-1, kv_heads, dim))
    torch.testing.assert_close(kernels.silu_mul(c["gate_up"]), c["silu"], atol=0, rtol=1e-3)  # exp: 1 ulp
    cache = KVCache(replace(c["config"], num_key_value_heads=kv_heads, head_dim=dim), 4, 4, dtype=torch.float16)
    slots = torch.tensor([3, 0, 9, 16, 6])
    cache.write(1, slots, k, v)  # v is a strided view of the projection
    flat_k, flat_v = (x[1].view(-1, kv_heads, dim) for x in (cache.k, cache.v))
    assert torch.equal(flat_k[slots], k) and torch.equal(flat_v[slots], v)
    model = Llama.from_state_dict(c["config"], c["state"])
    with torch.inference_mode():
        logits = forward(model, c["ids"])
    torch.testing.assert_close(logits, c["logits"], atol=2e-2, rtol=2e-2)
    assert torch.equal(logits.argmax(-1), c["logits"].argmax(-1))


def test_kernels_match_pytorch(tmp_path):
    pytest.importorskip("triton")
    path = tmp_path / "cases.pt"
    torch.save(cases(), path)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", f"import test_kernels as t; t.check({str(path)!r}); print('kernels ok')"],
        env=env,
        cwd=os.path.dirname(__file__),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "kernels ok" in proc.stdout, proc.stderr[-3000:]
