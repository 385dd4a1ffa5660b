"""ModelConfig: the shape of a Llama-family decoder, read from a Hugging Face config.json dict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ringserve.errors import FailedPrecondition


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a Llama-family model (names follow Hugging Face's LlamaConfig)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or a Llama-3 style dict: {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}.
    rope_scaling: dict | None = field(default=None, hash=False)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        """Build from a config.json dict; rejects architectures this engine does not run."""
        arch = cfg.get("model_type", "llama")
        if arch not in ("llama", "mistral", "smollm2"):
            raise FailedPrecondition(
                f"model_type {arch!r} is not supported: "
                "ringserve runs Llama-family models (model_type 'llama')"
            )
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            rope_scaling = cfg.get("rope_scaling")
            rope_theta = cfg.get("rope_theta")
            # transformers >= 5 moves rope_theta into rope_parameters.
            params = cfg.get("rope_parameters") or {}
            if rope_theta is None:
                rope_theta = params.get("rope_theta", 10000.0)
            if rope_scaling is None and params.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
            if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) in (
                None,
                "default",
            ):
                rope_scaling = None
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope_theta),
                rope_scaling=dict(rope_scaling) if rope_scaling else None,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FailedPrecondition(f"config.json is missing or has a bad value for {e}") from e

    def to_hf(self) -> dict:
        """A config.json dict that transformers' LlamaConfig accepts."""
        d = asdict(self)
        d["model_type"] = "llama"
        d["architectures"] = ["LlamaForCausalLM"]
        if d["rope_scaling"] is None:
            del d["rope_scaling"]
        return d

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids as a list (config.json allows an int or a list)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)
