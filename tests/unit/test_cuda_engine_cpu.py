"""The CUDA engine's decode path run eagerly on CPU against the reference engine.

The same functions the CUDA graph replays (prelude, attention, MLP, head, device bookkeeping)
run here without graphs or compilation on a tiny random-init Llama (float32), so token-for-token
equality with the reference engine and the pooling definitions are checked on every CI run.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from tolerance import assert_close_to_scale
from tracekit.engines.cuda.decoder import FastDecoder
from tracekit.engines.cuda.engine import CudaEngine
from tracekit.engines.cuda.plan import DecoderPlan
from tracekit.engines.hf import HFEngine
from tracekit.engines.interface import (
    CaptureSpec,
    GenerationParams,
    GenerationRequest,
    resolve_engine_name,
)
from tracekit.engines.pooling import Pooling
from tracekit.engines.teacher_forced import pooled_forward
from tracekit.errors import InputError, ModelError
from tracekit.models.random_model import random_llama
from tracekit.storage.experiment import TraitPaths, read_parts

ALL_POOLINGS = (Pooling.response_avg, Pooling.prompt_last, Pooling.prompt_avg)
PROMPTS = [
    [5, 17, 99, 3, 250],
    [7, 8],
    [300, 301, 302, 303, 304, 305, 306, 307, 308],
    [42, 43, 44],
]


@pytest.fixture(scope="module")
def tiny():
    return random_llama("tiny", device="cpu", dtype="float32", seed=0)


def _eager(loaded) -> CudaEngine:
    return CudaEngine(loaded, use_graphs=False, compile=False)


def test_greedy_tokens_and_captures_equal_reference(tiny):
    params = GenerationParams(max_new_tokens=10, temperature=0)
    capture = CaptureSpec(layers=(0, 1, 4), poolings=ALL_POOLINGS)
    ref = HFEngine(tiny).generate(PROMPTS, params, capture)
    engine = _eager(tiny)
    out = engine.generate(PROMPTS, params, capture)
    assert out.response_ids == ref.response_ids
    assert out.finish_reasons == ref.finish_reasons
    assert out.prompt_lengths == [5, 2, 9, 3]
    # one-time setup, by part: eager on CPU, so no compilation and no graph capture
    parts = engine.setup_parts
    assert parts["kernel_choice"] > 0 and parts["compile_warmup"] == parts["graph_capture"] == 0
    assert sum(parts.values()) <= engine.setup_seconds + 1e-6
    for pooling in ALL_POOLINGS:
        assert_close_to_scale(out.pooled[pooling], ref.pooled[pooling])


def test_eos_stops_rows_and_is_excluded(tiny):
    params = GenerationParams(max_new_tokens=10, temperature=0)
    first = _eager(tiny).generate(PROMPTS, params).response_ids
    stop = first[0][3]  # row 0's fourth token becomes the stop token
    tiny.model.generation_config.eos_token_id = stop
    try:
        capture = CaptureSpec(layers=(2, 4), poolings=(Pooling.response_avg,))
        ref = HFEngine(tiny).generate(PROMPTS, params, capture)
        out = _eager(tiny).generate(PROMPTS, params, capture)
    finally:
        tiny.model.generation_config.eos_token_id = 0
    assert out.response_ids[0] == first[0][: first[0].index(stop)]
    assert out.finish_reasons[0] == "eos"
    assert out.response_ids == ref.response_ids
    assert out.finish_reasons == ref.finish_reasons
    assert_close_to_scale(out.pooled[Pooling.response_avg], ref.pooled[Pooling.response_avg])
    # and equal to a teacher-forced forward over prompt + response (the extract path)
    forced = pooled_forward(tiny, PROMPTS, out.response_ids, capture)
    assert_close_to_scale(out.pooled[Pooling.response_avg], forced[Pooling.response_avg])


@pytest.mark.parametrize("ring", [1, 3, 16])
def test_capture_rings_give_the_sums_of_an_add_per_step(tiny, ring):
    """Captured states stored in rings of ``ring`` steps, flushed every ``ring`` steps and once
    at the end (also after an early stop, at a step that is no multiple of ``ring``), give
    response averages bit for bit equal to adding into the sums every step."""
    params = GenerationParams(max_new_tokens=10, temperature=0)
    first = _eager(tiny).generate(PROMPTS, params).response_ids
    stop = first[0][3]  # row 0 stops after three tokens
    capture = CaptureSpec(layers=(0, 2, 4), poolings=ALL_POOLINGS)
    tiny.model.generation_config.eos_token_id = stop
    try:
        options = {"use_graphs": False, "compile": False, "check_every": 2}
        plain = CudaEngine(tiny, capture_ring=0, **options)
        ringed = CudaEngine(tiny, capture_ring=ring, **options)
        outs = {}
        for name, engine in (("plain", plain), ("ringed", ringed)):
            # the whole batch twice (the second on the same buffers), then row 0 alone (all
            # rows done: the loop stops early)
            batches = (PROMPTS, PROMPTS, PROMPTS[:1])
            outs[name] = [engine.generate(p, params, capture) for p in batches]
    finally:
        tiny.model.generation_config.eos_token_id = 0
    runners = [*ringed._decoder(capture)._runners.values()]
    assert runners and all(r.ring_size == ring and r.rings is not None for r in runners)
    assert all(r.rings is None for r in plain._decoder(capture)._runners.values())
    assert outs["ringed"][2].finish_reasons == ["eos"]
    assert ringed._decoder(capture)._last_run.result().decode_steps < 10  # stopped early
    for want, got in zip(outs["plain"], outs["ringed"], strict=True):
        assert got.response_ids == want.response_ids
        for pooling in ALL_POOLINGS:
            assert torch.equal(got.pooled[pooling], want.pooled[pooling]), pooling
    with pytest.raises(ValueError, match="capture_ring"):
        FastDecoder(tiny.model, DecoderPlan(eos_token_ids=[0], capture_ring=-1))


def test_sampling_depends_on_row_seed_only(tiny):
    params = GenerationParams(max_new_tokens=6, temperature=0.9, top_p=0.8, do_sample=True)
    engine = _eager(tiny)
    together = engine.generate(PROMPTS, params, row_seeds=[11, 12, 13, 14]).response_ids
    alone = engine.generate(PROMPTS[2:3], params, row_seeds=[13]).response_ids
    assert alone[0] == together[2]
    again = engine.generate(PROMPTS, params, row_seeds=[11, 12, 13, 14]).response_ids
    assert again == together
    other = engine.generate(PROMPTS, params, row_seeds=[21, 22, 23, 24]).response_ids
    assert other != together


def test_short_batch_runs_padded_to_the_callers_batch_size(tiny):
    """With ``pad_batches`` (the default wherever steps are compiled or captured), a batch
    shorter than ``pad_to`` runs at that shape: no decode step of a new size is built, and
    the real rows come out as they would alone (greedy and seeded sampling, captures too)."""
    engine = CudaEngine(tiny, use_graphs=False, compile=False, pad_batches=True)
    capture = CaptureSpec(layers=(0, 3), poolings=ALL_POOLINGS)
    greedy = GenerationParams(max_new_tokens=8, temperature=0)
    part = PROMPTS[1:3]
    out = engine.generate(part, greedy, capture, pad_to=4)
    assert {key.batch for key in engine._decoder(capture)._runners} == {4}
    ref = HFEngine(tiny).generate(part, greedy, capture)
    assert out.response_ids == ref.response_ids
    assert out.finish_reasons == ref.finish_reasons
    assert out.prompt_lengths == [2, 9]
    for pooling in ALL_POOLINGS:
        assert out.pooled[pooling].shape[0] == 2
        assert_close_to_scale(out.pooled[pooling], ref.pooled[pooling])
    sampled = GenerationParams(max_new_tokens=6, temperature=0.9, top_p=0.8, do_sample=True)
    together = engine.generate(PROMPTS, sampled, row_seeds=[11, 12, 13, 14]).response_ids
    alone = engine.generate(PROMPTS[2:3], sampled, row_seeds=[13], pad_to=4).response_ids
    assert alone == [together[2]]
    assert {key.batch for key in engine._decoder(None)._runners} == {4}
    # without the option (eager CPU default) the batch keeps its own size
    plain = _eager(tiny)
    plain.generate(part, greedy, pad_to=4)
    assert {key.batch for key in plain._decoder(None)._runners} == {2}


def test_next_batch_started_before_the_result_is_taken_changes_nothing(tiny):
    """``start`` returns with the batch queued; a second batch started on the same decode
    shape (same buffers) before the first result is taken leaves that result intact."""
    engine = _eager(tiny)
    capture = CaptureSpec(layers=(0, 2, 4), poolings=ALL_POOLINGS)
    greedy = GenerationParams(max_new_tokens=7, temperature=0)
    other = [[p + 11 for p in prompt] for prompt in reversed(PROMPTS)]
    alone_a = engine.generate(PROMPTS, greedy, capture)
    alone_b = engine.generate(other, greedy, capture)
    first = engine.start(GenerationRequest(PROMPTS, greedy, capture))
    second = engine.start(GenerationRequest(other, greedy, capture))
    assert len(engine._decoder(capture)._runners) == 1  # both ran in the same buffers
    for pending, alone in ((first, alone_a), (second, alone_b)):
        out = pending.result()
        assert out.response_ids == alone.response_ids
        assert out.texts == alone.texts
        assert out.finish_reasons == alone.finish_reasons
        for pooling in ALL_POOLINGS:
            torch.testing.assert_close(out.pooled[pooling], alone.pooled[pooling], rtol=0, atol=0)
    assert alone_a.response_ids != alone_b.response_ids  # the check above could tell them apart
    assert first.result() is first.result()


def _job_config(tmp_path, engine: str, n_examples: int):
    """A small greedy generate job at batch size 2 on a registered test engine."""
    from tracekit.config.generate import GenerateConfig

    return GenerateConfig(
        experiment="e",
        traits=("verbosity",),
        experiments_dir=tmp_path,
        engine=engine,
        chat_template=False,
        batch_size=2,
        n_examples=n_examples,
        max_new_tokens=2,
        temperature=0,
        extract_activations=False,
        generation_cache=False,
    )


class _FailingSecondBatch(CudaEngine):
    """The CUDA engine run eagerly, failing when its second batch is started."""

    started = 0

    def __init__(self, loaded):
        super().__init__(loaded, use_graphs=False, compile=False)

    def start(self, request):
        _FailingSecondBatch.started += 1
        if _FailingSecondBatch.started == 2:
            raise RuntimeError("device fell over")
        return super().start(request)


def test_batch_finished_before_a_failing_one_is_written(tiny, tmp_path, monkeypatch):
    """The generate job starts each batch before taking the previous one's output; when the
    next batch fails, the finished one is still written (a rerun resumes after it)."""
    from tracekit.engines import interface as engine_module
    from tracekit.jobs.generate import generate

    monkeypatch.setitem(engine_module.ENGINES, "failing", f"{__name__}:_FailingSecondBatch")
    _FailingSecondBatch.started = 0
    config = _job_config(tmp_path, "failing", n_examples=4)
    with pytest.raises(RuntimeError, match="device fell over"):
        generate(config, loaded=tiny)
    paths = TraitPaths.of(tmp_path, "e", "verbosity")
    assert sorted(read_parts(paths, "pos")) == [0, 1]


class _PaddingEngine(CudaEngine):
    """The CUDA engine run eagerly with padding on (as on a GPU), registered for the job."""

    made: list[CudaEngine] = []

    def __init__(self, loaded):
        super().__init__(loaded, use_graphs=False, compile=False, pad_batches=True)
        _PaddingEngine.made.append(self)


def test_generate_job_runs_its_last_batch_at_the_batch_size(tiny, tmp_path, monkeypatch):
    """The generate job tells the engine its batch size: 3 rows at batch size 2 run as two
    batches of 2 rows (one decode shape), not one of 2 and one of 1."""
    from tracekit.engines import interface as engine_module
    from tracekit.jobs.generate import generate

    monkeypatch.setitem(engine_module.ENGINES, "padding", f"{__name__}:_PaddingEngine")
    _PaddingEngine.made = []
    config = _job_config(tmp_path, "padding", n_examples=3)
    generate(config, loaded=tiny)
    (engine,) = _PaddingEngine.made
    assert {key.batch for dec in engine._decoders.values() for key in dec._runners} == {2}
    paths = TraitPaths.of(tmp_path, "e", "verbosity")
    assert sorted(read_parts(paths, "pos")) == sorted(read_parts(paths, "neg")) == [0, 1, 2]
    # a run smaller than one batch keeps its own size (nothing else would share the shape)
    generate(config.model_copy(update={"experiment": "f", "n_examples": 1}), loaded=tiny)
    small = _PaddingEngine.made[-1]
    assert {key.batch for dec in small._decoders.values() for key in dec._runners} == {1}


def test_fused_weights_keep_the_model_unchanged():
    loaded = random_llama("tiny", device="cpu", dtype="float32", seed=1)
    params = GenerationParams(max_new_tokens=6, temperature=0)
    before = HFEngine(loaded).generate(PROMPTS, params).response_ids
    q_before = loaded.model.model.layers[0].self_attn.q_proj.weight.clone()
    dec = FastDecoder(loaded.model, DecoderPlan(eos_token_ids=[0], fuse_weights=True))
    assert torch.equal(loaded.model.model.layers[0].self_attn.q_proj.weight, q_before)
    assert dec.weights[0].qkv is not None
    assert HFEngine(loaded).generate(PROMPTS, params).response_ids == before
    # building a second decoder finds the weights already fused and shares them
    again = FastDecoder(loaded.model, DecoderPlan(eos_token_ids=[0], fuse_weights=True))
    assert again.weights[0].qkv.data_ptr() == dec.weights[0].qkv.data_ptr()
    ids = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    res = again.generate(ids, mask, max_new_tokens=6)
    assert res.tokens == HFEngine(loaded).generate([[5, 6], [1, 2, 3, 4]], params).response_ids


def test_right_padding_and_unsupported_models_are_refused(tiny):
    dec = FastDecoder(tiny.model, DecoderPlan(eos_token_ids=[0]))
    ids = torch.tensor([[5, 6, 0]])
    with pytest.raises(InputError, match="left-padded"):
        dec.generate(ids, torch.tensor([[1, 1, 0]]), max_new_tokens=2)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ModelError, match="cannot run this model: model type 'gpt2'"):
        FastDecoder(gpt2, DecoderPlan(eos_token_ids=[0]))
    assert resolve_engine_name("auto", tiny) == "hf"  # CPU: the reference engine


def test_pinned_linear_modes_are_checked(tiny):
    dec = FastDecoder(
        tiny.model, DecoderPlan(eos_token_ids=[0], gemv_modes={"o": "splitk8", "head": "linear"})
    )
    assert dec.plan.pinned == {"o": 5, "head": 0}
    with pytest.raises(ValueError, match="unknown layer 'v'; choose from qkv, o, gate_up"):
        FastDecoder(tiny.model, DecoderPlan(eos_token_ids=[0], gemv_modes={"v": "triton"}))
    with pytest.raises(ValueError, match="unknown mode 'splitk3' for o; choose from linear"):
        FastDecoder(tiny.model, DecoderPlan(eos_token_ids=[0], gemv_modes={"o": "splitk3"}))
    dec = FastDecoder(tiny.model, DecoderPlan(eos_token_ids=[0], gemv_modes={"gate_up": "swiglu"}))
    assert dec.plan.pinned == {"gate_up": 6}
    with pytest.raises(ValueError, match="swiglu is a mode of gate_up only, not of down"):
        FastDecoder(tiny.model, DecoderPlan(eos_token_ids=[0], gemv_modes={"down": "swiglu"}))


def test_pinned_attention_configuration_is_checked(tiny):
    dec = FastDecoder(tiny.model, DecoderPlan(eos_token_ids=[0], attention_config=(128, 4, 2)))
    assert dec.plan.attention_config == (128, 4, 2)
    assert dec.attention_config_for(8, 192, 64, 0, fused=False) is None  # no fused kernel
    assert dec.attention_config_for(8, 192, 64, 0, fused=True) == (128, 4, 2)
    split = FastDecoder(tiny.model, DecoderPlan(eos_token_ids=[0], attention_config=(64, 4, 2, 8)))
    assert split.attention_config_for(8, 192, 64, 0, fused=True) == (64, 4, 2, 8)
    for bad in ((24, 4, 2), (8, 4, 2), (64, 0, 2), (64, 4, 2, 3), (64, 4, 2, 0), (64, 4)):
        with pytest.raises(ValueError, match="attention_config is .slots per block"):
            FastDecoder(tiny.model, DecoderPlan(eos_token_ids=[0], attention_config=bad))


def test_kept_decisions_are_read_in_range_and_checked_by_their_reader(tiny, tmp_path, monkeypatch):
    import json

    from tracekit.engines.cuda.ops import gemv as cuda_gemv

    monkeypatch.setenv("TRACEKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    path = cuda_gemv.decisions_file()
    assert path.is_relative_to(tmp_path) and "NVIDIA-H200" in path.name
    path.parent.mkdir(parents=True)
    kept = {"mode": 5, "config": 7, "top": 63}
    path.write_text(json.dumps({**kept, "bool": True, "big": 64, "neg": -1, "text": "2", "f": 1.5}))
    assert cuda_gemv.read_decisions() == kept
    cuda_gemv.save_decisions({"new": 3})  # added to what is there, in one write
    assert cuda_gemv.read_decisions() == {**kept, "new": 3}
    # step tuning takes a batch's kept modes that are modes (of that layer); it is done when
    # every tuned layer has one (fused weights: q/k/v and gate/up are tuned too)
    dec = FastDecoder(tiny.model, DecoderPlan(eos_token_ids=[0], fuse_weights=True))
    keys = {role: dec.tuner._key(role, 8) for role in dec.tuner.roles()}
    assert set(keys) == {"o", "qkv", "down", "gate_up"}
    assert not dec.tuner._keep(8, {key: 7 for key in keys.values()})  # 7: no mode
    assert dec.tuner.modes(8) == {}
    swiglu = {key: cuda_gemv.SWIGLU for key in keys.values()}  # a mode of gate_up only
    assert not dec.tuner._keep(8, swiglu)
    assert dec.tuner.modes(8) == {"gate_up": cuda_gemv.SWIGLU}
    # a file from a version that tuned o, qkv and down only: those kept, gate_up still tuned
    older = {key: cuda_gemv.SPLIT_K4 for role, key in keys.items() if role != "gate_up"}
    assert not dec.tuner._keep(8, older)
    assert dec.tuner.modes(8) == {"o": 4, "qkv": 4, "down": 4}
    assert dec.tuner._keep(8, {**older, keys["gate_up"]: cuda_gemv.LINEAR})
    assert dec.tuner.modes(8) == {"o": 4, "qkv": 4, "down": 4, "gate_up": 0}
    # another version's kernel lists (another tag): its step tuning is not taken, it is redone
    monkeypatch.setattr(cuda_gemv, "CONFIG_TAG", "other")
    fresh = FastDecoder(tiny.model, DecoderPlan(eos_token_ids=[0], fuse_weights=True))
    assert fresh.tuner.modes(8) == {}
    assert all(fresh.tuner._key(role, 8) not in cuda_gemv.read_decisions() for role in keys)


def test_fastest_candidate_is_timed_once_and_kept(tmp_path, monkeypatch):
    from tracekit.engines.cuda.ops import gemv as cuda_gemv

    monkeypatch.setenv("TRACEKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    timed = []

    def time(times):
        def run():
            timed.append(times)
            return times

        return run

    usable = lambda i: i < 3  # noqa: E731
    assert cuda_gemv.fastest_kept("k", usable, time({0: 2.0, 1: 0.5, 2: 1.0})) == 1
    assert cuda_gemv.read_decisions() == {"k": 1}
    # kept: a later call (another process) takes it without timing
    assert cuda_gemv.fastest_kept("k", usable, time({0: 0.1})) == 1
    assert len(timed) == 1
    # a kept index the caller cannot use is timed again and replaced
    cuda_gemv.save_decisions({"k": 7})
    assert cuda_gemv.fastest_kept("k", usable, time({2: 0.3, 0: 0.4})) == 2
    assert cuda_gemv.read_decisions() == {"k": 2}
    # nothing timed: no choice, nothing kept
    assert cuda_gemv.fastest_kept("other", usable, time({})) is None
    assert "other" not in cuda_gemv.read_decisions()


@pytest.mark.parametrize(
    ("value", "on"), [(None, True), ("1", True), ("0", False), (" OFF ", False), ("no", False)]
)
def test_step_tuning_can_be_switched_off_from_the_environment(monkeypatch, value, on):
    from tracekit.engines.cuda.plan import step_tuning_default

    if value is None:
        monkeypatch.delenv("TRACEKIT_STEP_TUNING", raising=False)
    else:
        monkeypatch.setenv("TRACEKIT_STEP_TUNING", value)
    assert step_tuning_default() is on


def _tiny_family(family: str, **overrides):
    """A tiny random-init model of a supported family (float32, CPU, seed 0)."""
    import transformers

    names = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}[family]
    options = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=1,
        initializer_range=0.2,
    )
    if family == "qwen3":
        options["head_dim"] = 16
    config = getattr(transformers, f"{names}Config")(**{**options, **overrides})
    torch.manual_seed(0)
    return getattr(transformers, f"{names}ForCausalLM")(config).eval()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_other_supported_families_match_generate(family):
    # q/k/v biases (Qwen2), per-head q/k norms (Qwen3), Mistral's config: fused and unfused

    from tracekit.engines.interface import left_pad

    model = _tiny_family(family, num_hidden_layers=2)
    model.generation_config.eos_token_id = None  # both sides run to the limit
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], 0, torch.device("cpu"))
    with torch.no_grad():
        ref = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0
        )
    want = ref[:, ids.shape[1] :].tolist()
    for fuse in (False, True):
        dec = FastDecoder(model, DecoderPlan(eos_token_ids=[-1], pad_token_id=0, fuse_weights=fuse))
        assert dec.generate(ids, mask, max_new_tokens=8).tokens == want


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_fast_prefill_matches_the_hf_prefill(family):
    """The prompt through the engine's own block functions (``fast_prefill``) gives the HF
    prefill's tokens, prompt and response captures, and keys and values at every valid cache
    slot; rows of different lengths (left padding) included."""
    from tracekit.engines.cuda.plan import POOLINGS
    from tracekit.engines.interface import left_pad

    model = _tiny_family(family, num_hidden_layers=2)
    model.generation_config.eos_token_id = None
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [9, 10], [3]], 0, torch.device("cpu"))
    options = dict(
        layers=(0, 1, 2), poolings=POOLINGS, eos_token_ids=[-1], pad_token_id=0, fuse_weights=True
    )
    plain_dec = FastDecoder(model, DecoderPlan(**options))
    fast_dec = FastDecoder(model, DecoderPlan(fast_prefill=True, **options))
    plain = plain_dec.generate(ids, mask, max_new_tokens=8)
    fast = fast_dec.generate(ids, mask, max_new_tokens=8)
    assert fast.tokens == plain.tokens
    for name, value in plain.pooled.items():
        assert_close_to_scale(fast.pooled[name], value)
    (plain_run,) = plain_dec._runners.values()
    (fast_run,) = fast_dec._runners.values()
    pads = plain_run.st.pad_len.tolist()
    assert fast_run.st.pad_len.tolist() == pads
    for caches in ((plain_run.k_cache, fast_run.k_cache), (plain_run.v_cache, fast_run.v_cache)):
        for want, got in zip(*caches, strict=True):
            for row, pad in enumerate(pads):
                torch.testing.assert_close(got[row, :, pad:], want[row, :, pad:])


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("fuse", [False, True])
def test_fast_teacher_forced_forward_matches_reference(family, fuse):
    """cuda_forward (eager on CPU) against the HF forward: q/k/v biases (Qwen2), q/k norms
    (Qwen3), a sliding window shorter than the rows (Mistral), fused and separate weights."""

    from tracekit.engines.cuda.forward import FastForward
    from tracekit.models.layers import LayerHandles
    from tracekit.models.loading import LoadedModel
    from tracekit.models.random_model import word_tokenizer

    extra = {"sliding_window": 6} if family == "mistral" else {}
    model = _tiny_family(family, num_hidden_layers=3, **extra)
    loaded = LoadedModel(
        model=model,
        tokenizer=word_tokenizer(300),
        name=family,
        revision=None,
        source_path="random-init",
        dtype=torch.float32,
        device=torch.device("cpu"),
        handles=LayerHandles.of(model),
    )
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]
    responses = [[30, 31, 32, 33, 34, 35, 36, 37, 38], [40], []]
    capture = CaptureSpec((0, 1, 3), ALL_POOLINGS)
    ref = pooled_forward(loaded, prompts, responses, capture, engine="hf")
    fast = FastForward(model, fuse_weights=fuse).pooled(prompts, responses, (0, 1, 3), ALL_POOLINGS)
    for pooling in ALL_POOLINGS:
        scale = ref[pooling].abs().max()
        assert (fast[pooling] - ref[pooling]).abs().max() <= 1e-5 * scale, pooling


def test_compiled_steps_run_under_the_persistent_row_heuristics():
    from torch._inductor.virtualized import V

    from tracekit.engines.cuda.compiled import persistent_choices, under_choices
    from tracekit.engines.cuda.inductor_choices import PERSISTENT_REDUCTION_MAX

    choices = persistent_choices()
    assert choices is not None
    # importable by name: inductor pickles it into its cache key where torch has no uuid()
    assert pickle.loads(pickle.dumps(choices)) is choices
    # part of inductor's cache key: a compilation under other heuristics is not reused
    assert str(PERSISTENT_REDUCTION_MAX) in choices().uuid()
    before = V.choices
    seen = under_choices(lambda x: (V.choices, x + 1), choices)(1)
    assert isinstance(seen[0], choices) and seen[1] == 2  # in force during the call...
    assert V.choices is before and not isinstance(V.choices, choices)  # ...and only then
