"""Random-init Gemma-2 / Gemma-3 text models for engine tests and benchmarks (no download).

Shapes: ``gemma2-tiny`` and ``gemma3-tiny`` for CPU tests (a sliding window of 6 positions so
that short test sequences reach past it, soft-caps low enough to bend the values, norms with
random weights so that ``1 + w`` is tested, an untied output head: tied to the scaled
embedding, a random model repeats its last token), and the real checkpoints' text shapes for the GPU
benchmark: ``gemma-2-2b``, ``gemma-2-9b``, ``gemma-3-12b`` (values from their config.json).
The tokenizer is the word-level one of the Llama test models (``w0`` is eos and pad).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tracekit.models.loading import LoadedModel

_GEMMA3_ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}

_TINY: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "sliding_window": 6,
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
}
"""What the two CPU test shapes share (see the module docstring)."""

_GEMMA2: dict[str, Any] = {
    "family": "gemma2",
    "vocab_size": 256000,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "initializer_range": 0.02,
}
"""What the Gemma-2 2B and 9B checkpoints' config.json files share."""

SHAPES: dict[str, dict[str, Any]] = {
    "gemma2-tiny": {
        **_TINY,
        "family": "gemma2",
        "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 3.0,
        "final_logit_softcapping": 4.0,
    },
    "gemma3-tiny": {
        **_TINY,
        "family": "gemma3",
        "query_pre_attn_scalar": 32,
        "layer_types": [
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "full_attention",
        ],
        "rope_parameters": _GEMMA3_ROPE,
        "final_logit_softcapping": 6.0,
    },
    "gemma-2-2b": {
        **_GEMMA2,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
    "gemma-2-9b": {
        **_GEMMA2,
        "hidden_size": 3584,
        "intermediate_size": 14336,
        "num_hidden_layers": 42,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
    },
    "gemma-3-12b": {
        "family": "gemma3",
        "vocab_size": 262208,
        "hidden_size": 3840,
        "intermediate_size": 15360,
        "num_hidden_layers": 48,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 1024,
        "rope_parameters": _GEMMA3_ROPE,
        "initializer_range": 0.02,
    },
}


def gemma_config(shape: str) -> Any:
    """The transformers config of ``shape`` (:data:`SHAPES`)."""
    from transformers import Gemma2Config, Gemma3TextConfig

    params = dict(SHAPES[shape])
    family = params.pop("family")
    cls = Gemma2Config if family == "gemma2" else Gemma3TextConfig
    params.setdefault("rms_norm_eps", 1e-6)
    params.setdefault("tie_word_embeddings", True)
    return cls(
        **params,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=0,
        pad_token_id=0,
    )


def random_gemma(
    shape: str = "gemma2-tiny", *, device: str = "cpu", dtype: str = "float32", seed: int = 0
) -> LoadedModel:
    """A random-init Gemma of ``shape`` as a :class:`LoadedModel`; every norm weight is drawn
    too (HF initialises them to 0, which would leave ``1 + w`` untested)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tracekit.models.random_model import as_loaded

    config = gemma_config(shape)
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        # eager attention: HF's own choice for soft-capped Gemma-2, and exact for Gemma-3
        # built in its dtype: a float32 copy of a 12B model first would not fit beside it
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation="eager", dtype=torch_dtype
        ).to(torch_dtype)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.normal_(0.0, 0.2)
    return as_loaded(model, shape, device)
