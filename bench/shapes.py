"""Model shapes the GPU benchmarks share (Hugging Face config.json fields)."""

# Llama-3-8B: 32 layers, hidden 4096, 32 query heads, 8 KV heads, head dim 128.
LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=1 << 21,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)
