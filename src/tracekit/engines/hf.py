"""The reference engine: a plain PyTorch decode loop over any Hugging Face causal LM.

Why a hand loop instead of ``model.generate``: per-row random generators (so sampling does not
depend on batch composition), per-row stop bookkeeping that tells exactly which position holds
a response token (the pooling masks), and one extra decode step that computes the state of the
last response token of rows stopped by length, which ``generate`` never computes. The KV cache
is the model's own (dynamic) cache, so every architecture ``transformers`` supports works.
Capture goes through :class:`~tracekit.models.LayerTaps` into a
:class:`~tracekit.engines.pooling.PooledAccumulator` on the model's device.
"""

from __future__ import annotations

import inspect
import logging
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tracekit.engines.interface import (
    CaptureSpec,
    FinishReason,
    GenerationOutput,
    GenerationParams,
    Prompt,
    encode_prompts,
    left_pad,
    position_ids_from_mask,
    stop_token_ids,
)
from tracekit.engines.pooling import PooledAccumulator
from tracekit.errors import ConfigError
from tracekit.models.compat import cache_kwarg, output_cache

if TYPE_CHECKING:
    import torch

    from tracekit.engines.steering import Steering
    from tracekit.models.loading import LoadedModel

logger = logging.getLogger(__name__)


def check_capture_layers(loaded: LoadedModel, capture: CaptureSpec) -> None:
    """Raise :class:`ConfigError` naming layers the model does not have."""
    bad = [layer for layer in capture.layers if not 0 <= layer < loaded.n_layers]
    if bad:
        shown = ", ".join(str(b) for b in bad[:5])
        raise ConfigError(
            f"--layers: layer(s) {shown} out of range: {loaded.name} has layers "
            f"0-{loaded.n_layers - 1}"
        )


def input_device(loaded: LoadedModel) -> torch.device:
    """Where input ids must live (the embedding's device; differs under ``device_map``)."""
    return loaded.model.get_input_embeddings().weight.device


def forward_kwargs(model: Any) -> dict[str, Any]:
    """Ask for the last position's logits only where the model supports it (saves vocab work)."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def sample_next(
    logits: torch.Tensor,
    params: GenerationParams,
    generators: list[torch.Generator] | None,
) -> torch.Tensor:
    """Next token per row: argmax when greedy, else temperature + top-p with per-row RNGs."""
    import torch

    if params.greedy or generators is None:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop tokens whose preceding mass already reaches top_p (the top token always stays)
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    picks = [torch.multinomial(probs[i], 1, generator=generators[i]) for i in range(probs.shape[0])]
    return torch.cat(picks)


class HFEngine:
    """Reference :class:`~tracekit.engines.interface.GenerationEngine` (any device, any model)."""

    name = "hf"
    supports_steering = True

    @staticmethod
    def supports(model: Any) -> bool:
        """Whether this engine runs ``model``: every causal LM."""
        return True

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.stop_ids = stop_token_ids(loaded)
        if not self.stop_ids:
            logger.warning("the tokenizer has no eos token: every row runs to max_new_tokens")
        self._forward_kwargs = forward_kwargs(loaded.model)
        self._cache_key = cache_kwarg(loaded.model)

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: GenerationParams,
        capture: CaptureSpec | None = None,
        row_seeds: Sequence[int] | None = None,
        *,
        pad_to: int | None = None,  # nothing is prepared per batch size here: ignored
        steering: Steering | None = None,
    ) -> GenerationOutput:
        """See :class:`~tracekit.engines.interface.GenerationEngine`; ``steering`` adds a
        vector to the residual stream (:mod:`tracekit.engines.steering`)."""
        import torch

        from tracekit.engines.steering import SteeringHook
        from tracekit.models.capture import LayerTaps

        loaded, model, tokenizer = self.loaded, self.loaded.model, self.loaded.tokenizer
        rows = encode_prompts(tokenizer, prompts)
        batch = len(rows)
        if batch == 0:
            return GenerationOutput([], [], [], [])
        device = input_device(loaded)
        pad_id = int(tokenizer.pad_token_id)
        ids, mask = left_pad(rows, pad_id, device)
        width = ids.shape[1]

        generators = None
        if not params.greedy:
            if row_seeds is not None and len(row_seeds) != batch:
                raise ValueError("row_seeds must have one seed per prompt")
            # no seed: fresh entropy, without touching torch's global generator
            base = params.seed if params.seed is not None else secrets.randbits(31)
            seeds = list(row_seeds) if row_seeds is not None else [base + i for i in range(batch)]
            generators = []
            for seed in seeds:
                gen = torch.Generator(device=device)
                gen.manual_seed(int(seed))
                generators.append(gen)

        acc: PooledAccumulator | None = None
        # what the hooks should do with the forward call now running (mutated per step)
        state: dict[str, Any] = {}
        taps = None
        if capture is not None:
            check_capture_layers(loaded, capture)
            acc = PooledAccumulator(
                capture.layers, capture.poolings, batch, loaded.hidden_size, device
            )
            accumulator = acc

            def on_layer(layer: int, hidden: torch.Tensor) -> None:
                accumulator.add(layer, hidden.to(device), **state)

            taps = LayerTaps(loaded.handles, capture.layers, on_layer)
        steer = SteeringHook(loaded.handles, steering) if steering is not None else None

        stop = torch.tensor(self.stop_ids or [-1], device=device)
        cache_key = self._cache_key
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        hit_eos = torch.zeros(batch, dtype=torch.bool, device=device)
        n_response = torch.zeros(batch, dtype=torch.long, device=device)
        generated: list[torch.Tensor] = []
        unfed = torch.zeros(batch, dtype=torch.bool, device=device)

        with torch.inference_mode():
            if steer is not None:  # before the taps, which then see the steered stream
                steer.__enter__()
            if taps is not None:
                taps.__enter__()
            try:
                state.update(
                    prompt_mask=mask,
                    response_mask=None,
                    prompt_last_index=torch.full((batch,), width - 1, device=device),
                    step=0,
                )
                out = model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=position_ids_from_mask(mask),
                    use_cache=True,
                    **self._forward_kwargs,
                )
                cache = output_cache(out)
                logits = out.logits[:, -1, :]
                if steer is not None:
                    steer.prefill = False
                for step in range(params.max_new_tokens):
                    token = sample_next(logits, params, generators)
                    token = token.masked_fill(finished, pad_id)
                    is_eos = torch.isin(token, stop) & ~finished
                    is_response = ~finished & ~is_eos
                    generated.append(token)
                    n_response += is_response.long()
                    hit_eos |= is_eos
                    finished |= is_eos
                    if step == params.max_new_tokens - 1 or bool(finished.all()):
                        unfed = is_response
                        break
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    state.update(
                        prompt_mask=None,
                        response_mask=is_response.unsqueeze(1),
                        prompt_last_index=None,
                        step=step + 1,
                    )
                    out = model(
                        input_ids=token.unsqueeze(1),
                        attention_mask=mask,
                        position_ids=(mask.sum(dim=1, keepdim=True) - 1),
                        use_cache=True,
                        **{cache_key: cache},
                        **self._forward_kwargs,
                    )
                    cache = output_cache(out)
                    logits = out.logits[:, -1, :]
                # the state at the last response token of rows stopped by length is not
                # computed by the loop; response_avg includes it, so feed it once more
                if acc is not None and acc.wants_response and bool(unfed.any()):
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    state.update(
                        prompt_mask=None,
                        response_mask=unfed.unsqueeze(1),
                        prompt_last_index=None,
                        step=len(generated) + 1,
                    )
                    model(
                        input_ids=generated[-1].unsqueeze(1),
                        attention_mask=mask,
                        position_ids=(mask.sum(dim=1, keepdim=True) - 1),
                        use_cache=True,
                        **{cache_key: cache},
                        **self._forward_kwargs,
                    )
            finally:
                if taps is not None:
                    taps.__exit__(None, None, None)
                if steer is not None:
                    steer.__exit__(None, None, None)

        tokens = torch.stack(generated, dim=1).cpu() if generated else None
        counts = n_response.cpu().tolist()
        response_ids = [
            tokens[i, : counts[i]].tolist() if tokens is not None else [] for i in range(batch)
        ]
        reasons: list[FinishReason] = ["eos" if e else "length" for e in hit_eos.cpu().tolist()]
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in response_ids]
        return GenerationOutput(
            response_ids=response_ids,
            texts=texts,
            finish_reasons=reasons,
            prompt_lengths=[len(r) for r in rows],
            pooled=acc.result() if acc is not None else {},
            layers=capture.layers if capture is not None else (),
        )
