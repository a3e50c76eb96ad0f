"""Random-init Llama-family models with an in-code tokenizer, for engine tests and benchmarks.

Nothing is downloaded: the model is built from a ``LlamaConfig`` and the tokenizer is a
word-level vocabulary ``w0 .. w{V-1}`` (``w0`` is eos and pad). Shapes: ``tiny`` for tests,
``llama-3.2-1b`` for the GPU benchmark the performance issue specifies (16 blocks, d=2048,
GQA 32/8, vocab 128256, tied embeddings).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tracekit.models.loading import LoadedModel

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        # a wider init than the default 0.02 keeps greedy logits far from ties
        "initializer_range": 0.1,
    },
    "llama-3.2-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "initializer_range": 0.02,
    },
}


def word_tokenizer(vocab_size: int) -> Any:
    """A fast tokenizer over words ``w0 .. w{vocab_size-1}``; ``w0`` is eos and pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="w0", pad_token="w0", unk_token="w1"
    )
    tokenizer.padding_side = "left"
    return tokenizer


def random_llama(
    shape: str = "tiny",
    *,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    model_type: str = "llama",
) -> LoadedModel:
    """A random-init Llama-family model of ``shape`` (see :data:`SHAPES`) as a
    :class:`LoadedModel`; ``overrides`` replace config values of the shape, ``model_type``
    picks the family (``llama``, ``mistral``, ``qwen2``, ``qwen3``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    params = {**SHAPES[shape], **(overrides or {})}
    rope_theta = params.pop("rope_theta", 10000.0)
    config = AutoConfig.for_model(
        model_type,
        **params,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=0,
        pad_token_id=0,
    )
    # transformers 5 reads rope_parameters; 4.x reads rope_theta: set both
    config.rope_theta = rope_theta
    rope_parameters: Any = getattr(config, "rope_parameters", None)
    if isinstance(rope_parameters, dict):
        rope_parameters["rope_theta"] = rope_theta
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(torch_dtype)
    return as_loaded(model, shape, device)


def as_loaded(model: Any, shape: str, device: str) -> LoadedModel:
    """A random-init ``model`` on ``device`` (put in eval mode) with the word tokenizer of its
    vocabulary, as a :class:`LoadedModel` named after ``shape``."""
    import torch

    from tracekit.models.layers import LayerHandles
    from tracekit.models.loading import LoadedModel

    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=word_tokenizer(model.config.get_text_config().vocab_size),
        name=f"random-init {shape}",
        revision=None,
        source_path="random-init",
        dtype=next(model.parameters()).dtype,
        device=torch.device(device),
        handles=LayerHandles.of(model),
    )
