"""Sampling on the device: the next token per row and the per-row bookkeeping of a step.

Sampling uses a counter-based hash of ``(row seed, token index, vocabulary index)`` for its
noise (Gumbel-max through exponential races), so a row's sample depends on its own seed and
logits only, never on which rows share its batch, and is the same on CPU and CUDA for equal
logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from tracekit.engines.cuda.state import StepState


def hash32(x: torch.Tensor) -> torch.Tensor:
    # lowbias32-style integer mixer on int64 holding 32-bit values; the multipliers are below
    # 2**31 so no product overflows int64 on any backend.
    mask = 0xFFFFFFFF
    x = x & mask
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & mask
    x = x ^ (x >> 15)
    x = (x * 0x6A09E667) & mask
    x = x ^ (x >> 16)
    return x


def uniform_noise(seeds: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) float32 noise [B, vocab] from (row seed, token index, vocab index) only."""
    import torch

    row = hash32(hash32(seeds) ^ (index * 0x61C88647))
    cols = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = hash32(row[:, None] ^ ((cols * 0x2C1B3C6D) & 0xFFFFFFFF))
    return ((bits >> 8).float() + 0.5) * (1.0 / 16777216.0)


def argmax_chunk_for(vocab: int) -> int:
    """A divisor of ``vocab`` near 1000 for a two-stage argmax; 0 when there is none."""
    for size in sorted(range(256, 4097), key=lambda d: abs(d - 1000)):
        if vocab % size == 0 and vocab // size >= 8:
            return size
    return 0


def argmax(values: torch.Tensor, chunk: int) -> torch.Tensor:
    """Row argmax (first maximum) in two stages: a one-pass reduction over a 128k vocabulary
    with only a few rows runs on a few multiprocessors; chunks spread it over all of them."""

    if chunk <= 0:
        return values.argmax(dim=-1)
    rows, vocab = values.shape
    best, where = values.view(rows, vocab // chunk, chunk).max(dim=-1)
    block = best.argmax(dim=-1, keepdim=True)
    return (block * chunk + where.gather(-1, block)).squeeze(-1)


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    index: torch.Tensor,
    do_sample: bool,
    use_top_p: bool,
    argmax_chunk: int = 0,
) -> torch.Tensor:
    """Next token per row: argmax, or a seeded sample with temperature and top-p (nucleus).

    ``temperature``/``top_p`` are per row; a row with temperature 0 is greedy. Top-p keeps the
    smallest set of most likely tokens whose mass reaches ``top_p`` (at least one token).
    """
    import torch

    greedy = argmax(logits, argmax_chunk)
    if not do_sample:
        return greedy
    temp = temperature.clamp(min=1e-5)
    probs = torch.softmax(logits / temp[:, None], dim=-1)
    if use_top_p:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p[:, None], 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    race = -torch.log(uniform_noise(seeds, index, logits.shape[-1]))
    sampled = argmax(probs / race, argmax_chunk)
    return torch.where(temperature > 0, sampled, greedy)


def advance(
    logits: torch.Tensor,
    st: StepState,
    eos_ids: torch.Tensor,
    pad_id: int,
    max_new: int,
    include_eos: bool,
    do_sample: bool,
    use_top_p: bool,
    argmax_chunk: int = 0,
) -> None:
    """Pick each row's next token and update the per-row bookkeeping, all on the device."""
    import torch

    index = st.slot - st.start + 1  # index of the token being emitted (0 = first response token)
    tok = sample_tokens(
        logits, st.temperature, st.top_p, st.seeds, index, do_sample, use_top_p, argmax_chunk
    )
    alive = st.alive
    tok = torch.where(alive, tok, torch.full_like(tok, pad_id))
    st.out_tokens.index_copy_(1, index, tok[:, None])
    is_eos = (tok[:, None] == eos_ids[None, :]).any(dim=-1) & alive
    kept = alive if include_eos else alive & ~is_eos
    st.n_kept.add_(kept.to(st.n_kept.dtype))
    st.eos_hit.logical_or_(is_eos)
    st.feed_weight.copy_(kept.to(st.feed_weight.dtype))
    st.alive.copy_(alive & ~is_eos & (index + 1 < max_new))
    st.cur_tok.copy_(tok)
    st.slot.add_(1)
