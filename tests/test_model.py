"""The engine's model matches Hugging Face transformers' LlamaForCausalLM on the same weights."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ringserve.engine.config import ModelConfig
from ringserve.engine.kv_cache import KVCache, PagedAttention, SeqSpan
from ringserve.engine.model import Llama

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def tiny_hf(heads: int, kv_heads: int, tied: bool, rope_scaling=None, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=heads * 8,
        intermediate_size=72,
        num_hidden_layers=3,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        rope_theta=500.0,
        tie_word_embeddings=tied,
        rope_scaling=rope_scaling,
        rms_norm_eps=1e-6,
    )
    model = LlamaForCausalLM(cfg).eval()
    # Random init leaves norms at one; perturb them so a mismatch in norms would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ours_from(hf: LlamaForCausalLM) -> Llama:
    config = ModelConfig.from_hf(hf.config.to_dict())
    state = {
        k: v.clone()
        for k, v in hf.state_dict().items()
        if not (config.tie_word_embeddings and k == "lm_head.weight")
    }
    return Llama.from_state_dict(config, state)


def run_chunks(model: Llama, ids: list[int], chunks: list[int], block_size: int = 4) -> torch.Tensor:
    """Logits for every token, computed chunk by chunk over the paged cache."""
    cache = KVCache(model.config, num_blocks=64, block_size=block_size)
    table = cache.allocator.allocate(-(-len(ids) // block_size))
    out, start = [], 0
    for n in chunks:
        att = PagedAttention(cache, [SeqSpan(0, n, table, start)])
        out.append(model(torch.tensor(ids[start : start + n]), torch.arange(start, start + n), att))
        start += n
    cache.allocator.free(table)
    assert cache.allocator.num_used == 0
    return torch.cat(out)


CONFIGS = [
    pytest.param(4, 4, False, None, id="mha-untied"),
    pytest.param(4, 2, True, None, id="gqa2-tied"),
    pytest.param(6, 1, False, None, id="mqa-untied"),
    pytest.param(8, 2, True, LLAMA3_SCALING, id="gqa4-tied-llama3rope"),
]


@pytest.mark.parametrize("heads,kv_heads,tied,scaling", CONFIGS)
def test_logits_match_transformers(heads, kv_heads, tied, scaling):
    hf = tiny_hf(heads, kv_heads, tied, scaling)
    ours = ours_from(hf)
    ids = torch.randint(0, 97, (1, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    ids_list = ids[0].tolist()
    with torch.inference_mode():
        full = run_chunks(ours, ids_list, [45])
        chunked = run_chunks(ours, ids_list, [7, 1, 16, 21])  # chunks across block boundaries
        stepwise = run_chunks(ours, ids_list, [1] * 45)  # token by token: decode
    for got in (full, chunked, stepwise):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def test_greedy_generation_matches_transformers_generate():
    hf = tiny_hf(8, 2, False, LLAMA3_SCALING, seed=3)
    ours = ours_from(hf)
    prompt = [5, 17, 42, 3, 88, 11, 60]
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    cache = KVCache(ours.config, num_blocks=16, block_size=8)
    table = cache.allocator.allocate(16)
    ids = list(prompt)
    got = []
    with torch.inference_mode():
        n = len(ids)
        logits = ours(torch.tensor(ids), torch.arange(n), PagedAttention(cache, [SeqSpan(0, n, table, 0)]))[
            -1
        ]
        for _ in range(40):
            tok = int(logits.argmax())
            got.append(tok)
            pos = len(ids)
            ids.append(tok)
            att = PagedAttention(cache, [SeqSpan(0, 1, table, pos)])
            logits = ours(torch.tensor([tok]), torch.tensor([pos]), att)[-1]
    cache.allocator.free(table)
    assert got == ref


def test_batched_sequences_match_separate_runs():
    """Several sequences in one flat batch (as the decode tier runs them) give each one's own logits."""
    ours = ours_from(tiny_hf(4, 2, False))
    a, b = list(range(1, 12)), list(range(30, 50))
    with torch.inference_mode():
        ref_a, ref_b = run_chunks(ours, a, [11]), run_chunks(ours, b, [20])
        cache = KVCache(ours.config, num_blocks=32, block_size=4)
        ta, tb = cache.allocator.allocate(3), cache.allocator.allocate(5)
        att = PagedAttention(cache, [SeqSpan(0, 11, ta, 0), SeqSpan(11, 31, tb, 0)])
        got = ours(torch.tensor(a + b), torch.cat([torch.arange(11), torch.arange(20)]), att)
        cache.allocator.free(ta + tb)
    torch.testing.assert_close(got[:11], ref_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[11:], ref_b, atol=1e-5, rtol=1e-5)
