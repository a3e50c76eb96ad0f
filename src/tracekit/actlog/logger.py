"""``ActivationLogger``: log per-position activations of any HF causal LM into a store.

Use it around your own inference loop::

    with ActivationLogger("acts.lmdb", model, tokenizer, layers=[10, 30]) as act_log:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)   # left padding
        out = model.generate(**enc, max_new_tokens=32)
        act_log.log(prompts, enc["attention_mask"], response_ids=[...], generations=[...])

While the ``with`` block is open, forward hooks (:class:`~tracekit.models.LayerTaps`) collect
the chosen layers' hidden states of every forward call (cast to the store dtype, on the CPU);
:meth:`ActivationLogger.log` cuts each row's positions out of them and writes the batch in one
transaction. Calls concatenate along the sequence axis, so a ``generate`` (prefill, then one
position per decode step) and a single teacher-forced forward over prompt + response give the
same layout: ``[left-padded prompt | response]``. With ``generate`` the state at the last
generated token is never computed (that token is not fed back), so a row that stopped by length
has one response position less; ``tracekit log`` runs a teacher-forced forward and has them all.

Positions stored per ``sequence_mode``: ``prompt`` (real prompt tokens, padding excluded),
``response`` (response tokens, eos excluded) or ``all`` (both, prompt first). Each entry's
metadata says how many of each it holds (``positions``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracekit.actlog.prompts import text_sha256
from tracekit.config.choices import SequenceMode, StoreDtype
from tracekit.models.capture import LayerTaps
from tracekit.models.layers import LayerHandles
from tracekit.storage.activation_store import (
    DTYPES,
    ActivationStoreWriter,
    PendingEntry,
    prompt_key,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SEQUENCE_MODES = tuple(mode.value for mode in SequenceMode)


def tokenizer_sha256(tokenizer: Any) -> str:
    """A fingerprint of what a tokenizer turns text into: vocab, special tokens, chat template."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    payload = json.dumps(
        [vocab, special, getattr(tokenizer, "chat_template", None)], ensure_ascii=False
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def build_provenance(
    model: Any,
    tokenizer: Any,
    *,
    layers: Sequence[int],
    sequence_mode: str,
    dtype: str,
    model_name: str | None = None,
    revision: str | None = None,
    model_arg: str | None = None,
    weights: Mapping[str, str | None] | None = None,
    prompt_template: str | None = None,
    chat: bool = False,
    generation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The provenance record of a logging setup (compat fields: see ``activation_store``)."""
    import torch
    import transformers

    from tracekit import __version__

    if chat:
        prompt_format, fmt_text = "chat", getattr(tokenizer, "chat_template", None)
    elif prompt_template is not None:
        prompt_format, fmt_text = "template", prompt_template
    else:
        prompt_format, fmt_text = "custom", None
    name = model_name or getattr(getattr(model, "config", None), "name_or_path", None) or "unknown"
    first = next(model.parameters(), None)
    return {
        "model": name,
        "quantization": (weights or {}).get("quantization"),
        "weights_sha256": (weights or {}).get("weights_sha256"),
        "revision": revision,
        "model_arg": model_arg,
        "architecture": type(model).__name__,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "prompt_format": prompt_format,
        "prompt_template": prompt_template if prompt_format == "template" else None,
        "prompt_format_sha256": text_sha256(fmt_text),
        "generation": dict(generation) if generation is not None else None,
        "layers": list(layers),
        "sequence_mode": str(sequence_mode),  # plain strings, also when given an enum
        "dtype": str(dtype),
        "model_dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "created": time.time(),
        "versions": {
            "tracekit": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def model_weights(model: Any) -> dict[str, str | None] | None:
    """``{"quantization", "weights_sha256"}`` of a Hugging Face model, from the folder or hub
    cache snapshot its config names (:func:`tracekit.models.weights.weights_provenance`); None
    when the config names none (a model built in memory)."""
    config = getattr(model, "config", None)
    source = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if not source:
        return None
    from tracekit.models.weights import weights_provenance

    return weights_provenance(str(source), None, config)


class ActivationLogger:
    """Context manager that logs activations of ``model`` into the store at ``store``.

    ``model`` is a :class:`~tracekit.models.LoadedModel` (then ``tokenizer`` may be left out)
    or a Hugging Face model; either way the record names the weights (``quantization``,
    ``weights_sha256``): the loaded model's, or those of the folder the model was loaded from.
    ``layers`` follow tracekit's numbering (0 = embedding output, ``i`` = after block ``i-1``);
    default: the last layer. ``provenance`` overrides/extends the record built from the model
    (:func:`build_provenance`); a store written under another setup or other weights is refused
    unless ``allow_mixed``.
    """

    def __init__(
        self,
        store: str | Path,
        model: Any,
        tokenizer: Any = None,
        layers: Sequence[int] | None = None,
        sequence_mode: SequenceMode | str = SequenceMode.all,
        dtype: StoreDtype | str = StoreDtype.float16,
        provenance: Mapping[str, Any] | None = None,
        allow_mixed: bool = False,
    ) -> None:
        if sequence_mode not in SEQUENCE_MODES:
            raise ValueError(
                f"sequence_mode must be one of {SEQUENCE_MODES}, got {sequence_mode!r}"
            )
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        from tracekit.models.loading import LoadedModel

        self.store_path = Path(store)
        loaded = model if isinstance(model, LoadedModel) else None
        if loaded is not None:
            model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
        elif tokenizer is None:
            raise ValueError("tokenizer is required unless model is a LoadedModel")
        self.model = model
        self.tokenizer = tokenizer
        self.handles = loaded.handles if loaded is not None else LayerHandles.of(model)
        self.layers = tuple(layers) if layers is not None else (self.handles.n_layers - 1,)
        self.sequence_mode = str(sequence_mode)  # plain strings in the entries' metadata
        self.dtype = str(dtype)
        given = dict(provenance or {})
        weights: Mapping[str, str | None] | None = None
        if loaded is not None:
            weights = loaded.provenance()
        elif not all(name in given for name in ("quantization", "weights_sha256")):
            weights = model_weights(model)
        self.provenance = {
            **build_provenance(
                model,
                tokenizer,
                layers=self.layers,
                sequence_mode=sequence_mode,
                dtype=dtype,
                model_name=loaded.name if loaded is not None else None,
                revision=loaded.revision if loaded is not None else None,
                weights=weights,
            ),
            **given,
        }
        self.allow_mixed = allow_mixed
        self.writer: ActivationStoreWriter | None = None
        self._taps = LayerTaps(self.handles, self.layers, self._on_layer)
        self._captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self._paused = False

    # --- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> ActivationLogger:
        self.writer = ActivationStoreWriter(self.store_path, self.provenance, self.allow_mixed)
        self._taps.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._taps.__exit__(None, None, None)
        self.reset()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def existing_keys(self) -> set[str]:
        """Keys already in the store (to skip finished prompts on a restart)."""
        return self._require_writer().existing_keys()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward calls inside this block are not captured (e.g. the generate pass)."""
        self._paused, before = True, self._paused
        try:
            yield
        finally:
            self._paused = before

    def reset(self) -> None:
        """Drop the states captured so far."""
        for states in self._captured.values():
            states.clear()

    def _on_layer(self, layer: int, hidden: torch.Tensor) -> None:
        import torch

        if self._paused:
            return
        self._captured[layer].append(hidden.detach().to("cpu", getattr(torch, self.dtype)))

    def _require_writer(self) -> ActivationStoreWriter:
        if self.writer is None:
            raise RuntimeError("ActivationLogger is used outside its 'with' block")
        return self.writer

    # --- logging -------------------------------------------------------------------------
    def log(
        self,
        prompts: Sequence[str],
        attention_mask: Any,
        response_ids: Sequence[Sequence[int]] | None = None,
        generations: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        """Write one entry per row of the captured batch; returns the bytes written.

        ``prompts`` are the formatted prompt texts (the keys are their SHA-256);
        ``attention_mask`` is the prompt batch's mask ``[batch, prompt_width]`` (left padding);
        ``response_ids`` the generated tokens per row, eos excluded (omit for prompt-only
        forwards); ``metadata`` extra JSON fields per row. Clears the captured states.
        """
        return self.write(
            self.collect(prompts, attention_mask, response_ids, generations, metadata)
        )

    def write(self, entries: Sequence[PendingEntry]) -> int:
        """Write entries made by :meth:`collect` in one transaction; returns the bytes written.
        May run on another thread than the one capturing (one thread writing at a time), so
        the next batch's forward pass runs meanwhile, as in ``tracekit log``."""
        return self._require_writer().write_batch(entries)

    def collect(
        self,
        prompts: Sequence[str],
        attention_mask: Any,
        response_ids: Sequence[Sequence[int]] | None = None,
        generations: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[PendingEntry]:
        """The entries :meth:`log` writes, without writing them (see :meth:`write`); the same
        arguments. Clears the captured states."""
        import torch

        self._require_writer()
        # take the captured states first: a failed call must not leak them into the next one
        captured = {layer: list(states) for layer, states in self._captured.items()}
        self.reset()
        mask = torch.as_tensor(attention_mask).cpu()
        batch, width = int(mask.shape[0]), int(mask.shape[1])
        if len(prompts) != batch:
            raise ValueError(f"{len(prompts)} prompts for a batch of {batch} rows")
        if batch and bool((mask[:, -1] == 0).any()):
            raise ValueError("the prompt batch is right-padded: tracekit logs left-padded batches")
        if any(not states for states in captured.values()):
            raise ValueError("no forward pass was captured since the last log() call")
        hidden = {layer: torch.cat(states, dim=1) for layer, states in captured.items()}
        captured_batch, total = next(iter(hidden.values())).shape[:2]
        if captured_batch != batch:
            raise ValueError(f"the captured forward had {captured_batch} rows, the mask {batch}")
        real = mask.sum(dim=1).tolist()
        responses = [list(r) for r in response_ids] if response_ids is not None else [[]] * batch
        entries = []
        for row in range(batch):
            p_start, p_end = width - int(real[row]), width
            r_end = min(width + len(responses[row]), total)
            spans = []
            if self.sequence_mode in ("all", "prompt"):
                spans.append((p_start, p_end))
            if self.sequence_mode in ("all", "response"):
                spans.append((width, r_end))
            arrays = {
                f"layer_{layer}": torch.cat([states[row, a:b] for a, b in spans], dim=0)
                for layer, states in hidden.items()
            }
            n_prompt = p_end - p_start if self.sequence_mode != "response" else 0
            n_resp = max(r_end - width, 0) if self.sequence_mode != "prompt" else 0
            meta: dict[str, Any] = {
                "prompt": prompts[row],
                "generation": generations[row] if generations is not None else None,
                "model": self.provenance.get("model"),
                "quantization": self.provenance.get("quantization"),
                "weights_sha256": self.provenance.get("weights_sha256"),
                "input_length": int(real[row]),
                "timestamp": time.time(),
                "messages": None,
                "trim_position": None,
                "generation_params": self.provenance.get("generation"),
                "layers": list(self.layers),
                "sequence_mode": self.sequence_mode,
                "positions": {"prompt": n_prompt, "response": n_resp},
                "response_token_ids": responses[row] if response_ids is not None else None,
            }
            if metadata is not None:
                meta.update(metadata[row])
            entries.append(PendingEntry(prompt_key(prompts[row]), meta, arrays))
        return entries
