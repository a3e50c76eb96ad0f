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

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tracekit.engines.interface import (
    CaptureSpec,
    FinishReason,
    GenerationEngine,
    GenerationOutput,
    GenerationParams,
    GenerationRequest,
    Ready,
    encode_prompts,
    left_pad,
    position_ids_from_mask,
    sampling_seeds,
    stop_token_ids,
)
from tracekit.engines.pooling import PooledAccumulator
from tracekit.errors import ConfigError
from tracekit.models.compat import cache_kwarg, output_cache

if TYPE_CHECKING:
    import torch

    from tracekit.engines.steering import SteeringHook
    from tracekit.models.capture import LayerTaps
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


class HFEngine(GenerationEngine):
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

    def _start(self, request: GenerationRequest) -> Ready:
        """Run the batch to its end (``pad_to`` is ignored: nothing is prepared per batch
        size here)."""
        return Ready(self._run(request))

    def _run(self, request: GenerationRequest) -> GenerationOutput:
        import torch

        from tracekit.engines.steering import SteeringHook

        loaded, params, capture = self.loaded, request.params, request.capture
        rows = encode_prompts(loaded.tokenizer, request.prompts)
        if not rows:
            return GenerationOutput([], [], [], [])
        device = input_device(loaded)
        ids, mask = left_pad(rows, int(loaded.tokenizer.pad_token_id), device)
        seeds = sampling_seeds(params, request.row_seeds, len(rows))
        # what the hooks should do with the forward call now running (set before each call)
        hook_state: dict[str, Any] = {}
        acc, taps = _capture_taps(loaded, capture, len(rows), device, hook_state)
        steering = request.steering
        steer = SteeringHook(loaded.handles, steering) if steering is not None else None
        with torch.inference_mode(), contextlib.ExitStack() as hooks:
            if steer is not None:  # before the taps, which then see the steered stream
                hooks.enter_context(steer)
            if taps is not None:
                hooks.enter_context(taps)
            loop = _DecodeLoop(
                self, params, hook_state, steer, ids, mask, _generators(seeds, device)
            )
            decoded = loop.run()
            if acc is not None and acc.wants_response:
                loop.feed_unfed(decoded)
        return _output(loaded, rows, decoded, acc, capture)


def _generators(seeds: list[int] | None, device: torch.device) -> list[torch.Generator] | None:
    """One random generator per row (None when greedy)."""
    import torch

    if seeds is None:
        return None
    generators = []
    for seed in seeds:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
        generators.append(gen)
    return generators


def _capture_taps(
    loaded: LoadedModel,
    capture: CaptureSpec | None,
    batch: int,
    device: torch.device,
    hook_state: dict[str, Any],
) -> tuple[PooledAccumulator | None, LayerTaps | None]:
    """The accumulator of the pooled activations and the taps that feed it (None, None
    without capture); the taps pool each forward call as ``hook_state`` says."""
    from tracekit.models.capture import LayerTaps

    if capture is None:
        return None, None
    check_capture_layers(loaded, capture)
    acc = PooledAccumulator(capture.layers, capture.poolings, batch, loaded.hidden_size, device)

    def on_layer(layer: int, hidden: torch.Tensor) -> None:
        acc.add(layer, hidden.to(device), **hook_state)

    return acc, LayerTaps(loaded.handles, capture.layers, on_layer)


@dataclass
class _Decoded:
    """What the decode loop produced, per row."""

    generated: list[torch.Tensor]
    """The sampled token of each step, ``[batch]`` each (pad after a row finished)."""
    n_response: torch.Tensor
    """Response tokens per row (eos excluded)."""
    hit_eos: torch.Tensor
    unfed: torch.Tensor
    """Rows whose last response token was never fed back (stopped by length)."""


@dataclass
class _DecodeLoop:
    """One batch's decode loop: the prefill, then one forward call per new token."""

    engine: HFEngine
    params: GenerationParams
    hook_state: dict[str, Any]
    steer: SteeringHook | None
    ids: torch.Tensor
    mask: torch.Tensor
    """The attention mask, one column longer after each fed token."""
    generators: list[torch.Generator] | None
    cache: Any = None
    """The model's KV cache, once the prefill ran."""
    prefilled: bool = False

    def forward(self, input_ids: torch.Tensor, **state: Any) -> torch.Tensor:
        """A forward call on the cache so far (none for the prefill); the hooks see ``state``.
        Returns the last position's logits."""
        self.hook_state.update(state)
        if not self.prefilled:
            positions = position_ids_from_mask(self.mask)
            cache_kwargs: dict[str, Any] = {}
        else:
            positions = self.mask.sum(dim=1, keepdim=True) - 1
            cache_kwargs = {self.engine._cache_key: self.cache}
        out = self.engine.loaded.model(
            input_ids=input_ids,
            attention_mask=self.mask,
            position_ids=positions,
            use_cache=True,
            **cache_kwargs,
            **self.engine._forward_kwargs,
        )
        self.cache, self.prefilled = output_cache(out), True
        return out.logits[:, -1, :]

    def feed(self, token: torch.Tensor, response_mask: torch.Tensor, step: int) -> torch.Tensor:
        """Feed one token per row (``response_mask``: the rows whose token is a response's)."""
        import torch

        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return self.forward(
            token.unsqueeze(1),
            prompt_mask=None,
            response_mask=response_mask.unsqueeze(1),
            prompt_last_index=None,
            step=step,
        )

    def run(self) -> _Decoded:
        import torch

        batch, width = self.ids.shape
        device = self.ids.device
        stop = torch.tensor(self.engine.stop_ids or [-1], device=device)
        pad_id = int(self.engine.loaded.tokenizer.pad_token_id)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        done = _Decoded(
            generated=[],
            n_response=torch.zeros(batch, dtype=torch.long, device=device),
            hit_eos=torch.zeros(batch, dtype=torch.bool, device=device),
            unfed=torch.zeros(batch, dtype=torch.bool, device=device),
        )
        logits = self.forward(
            self.ids,
            prompt_mask=self.mask,
            response_mask=None,
            prompt_last_index=torch.full((batch,), width - 1, device=device),
            step=0,
        )
        if self.steer is not None:
            self.steer.prefill = False
        for step in range(self.params.max_new_tokens):
            token = sample_next(logits, self.params, self.generators)
            token = token.masked_fill(finished, pad_id)
            is_eos = torch.isin(token, stop) & ~finished
            is_response = ~finished & ~is_eos
            done.generated.append(token)
            done.n_response += is_response.long()
            done.hit_eos |= is_eos
            finished |= is_eos
            if step == self.params.max_new_tokens - 1 or bool(finished.all()):
                done.unfed = is_response
                break
            logits = self.feed(token, is_response, step + 1)
        return done

    def feed_unfed(self, done: _Decoded) -> None:
        """The state at the last response token of rows stopped by length is not computed by
        the loop; response_avg includes it, so feed it once more."""
        if bool(done.unfed.any()):
            self.feed(done.generated[-1], done.unfed, len(done.generated) + 1)


def _output(
    loaded: LoadedModel,
    rows: list[list[int]],
    done: _Decoded,
    acc: PooledAccumulator | None,
    capture: CaptureSpec | None,
) -> GenerationOutput:
    """The batch's output, on the CPU."""
    import torch

    tokens = torch.stack(done.generated, dim=1).cpu() if done.generated else None
    counts = done.n_response.cpu().tolist()
    response_ids = [
        tokens[i, : counts[i]].tolist() if tokens is not None else [] for i in range(len(rows))
    ]
    reasons: list[FinishReason] = ["eos" if e else "length" for e in done.hit_eos.cpu().tolist()]
    return GenerationOutput(
        response_ids=response_ids,
        texts=[loaded.tokenizer.decode(r, skip_special_tokens=True) for r in response_ids],
        finish_reasons=reasons,
        prompt_lengths=[len(r) for r in rows],
        pooled=acc.result() if acc is not None else {},
        layers=capture.layers if capture is not None else (),
    )
