"""Steered generation on the embedded model: coefficient 0 is the unsteered run, the add matches
an independent forward-hook implementation on plain transformers, batch 8 == batch 1, captured
activations are the steered stream's, and a CLI sweep writes one resumable set per coefficient."""

import json

import numpy as np
import pytest
import torch
from tests.tolerance import assert_close_to_scale

from tracekit.engines.hf import HFEngine
from tracekit.engines.interface import CaptureSpec, GenerationParams
from tracekit.engines.pooling import Pooling
from tracekit.engines.steering import Steering, file_sha256
from tracekit.models.templates import build_prompt

pytestmark = pytest.mark.integration

LAYER = 10
GREEDY = GenerationParams(max_new_tokens=6, temperature=0)
QUESTIONS = [
    "What is the capital of France?",
    "Is the Sun a star?",
    "What is 7 times 8?",
    "How do you say hello in Spanish?",
    "Do fish need water to live?",
    "What day comes after Monday?",
    "What is the plural of mouse?",
    "Which is bigger, a cat or an elephant? Answer in one word.",
]


def _prompts(loaded, n):
    return [build_prompt(loaded.tokenizer, q).ids for q in QUESTIONS[:n]]


def _direction(loaded, scale=1.0):
    """A fixed direction with the norm of a typical mid-layer trait vector (about 30)."""
    v = np.random.default_rng(1).standard_normal(loaded.hidden_size).astype("float32")
    return v * np.float32(30.0 * scale / np.linalg.norm(v))


CAPTURE = CaptureSpec((LAYER - 1, LAYER, 30), (Pooling.response_avg, Pooling.prompt_last))


def test_coefficient_zero_is_the_unsteered_run(embedded_model):
    engine = HFEngine(embedded_model)
    prompts = _prompts(embedded_model, 3)
    plain = engine.generate(prompts, GREEDY, CAPTURE)
    for positions in ("response", "prompt", "all"):
        zero = engine.generate(
            prompts,
            GREEDY,
            CAPTURE,
            steering=Steering(LAYER, _direction(embedded_model), 0.0, positions),
        )
        assert zero.response_ids == plain.response_ids
        for pooling, tensor in plain.pooled.items():
            assert torch.equal(zero.pooled[pooling], tensor), (positions, pooling)


def test_a_large_coefficient_changes_tokens_and_activations_are_the_steered_streams(
    embedded_model,
):
    engine = HFEngine(embedded_model)
    prompts = _prompts(embedded_model, 3)
    vector, coef = _direction(embedded_model), 4.0
    plain = engine.generate(prompts, GREEDY, CAPTURE)
    steered = engine.generate(prompts, GREEDY, CAPTURE, steering=Steering(LAYER, vector, coef))
    assert steered.response_ids != plain.response_ids
    # the last prompt position is a response position: layer LAYER is read there with the
    # add in it, layer LAYER - 1 (before the add) is untouched
    last_plain = plain.pooled[Pooling.prompt_last]
    last_steered = steered.pooled[Pooling.prompt_last]
    assert torch.equal(last_steered[:, 0], last_plain[:, 0])
    added = (last_steered[:, 1] - last_plain[:, 1]).numpy()
    assert_close_to_scale(added, np.broadcast_to(coef * vector, added.shape))


def _plain_transformers_steered(loaded, prompt_ids, vector, coef, positions, max_new_tokens):
    """An independent implementation: ``model.generate`` with a forward hook on the decoder
    block before layer LAYER that adds ``coef * vector`` as persona_vectors' ActivationSteerer
    does (response: the last position of every call; prompt: calls longer than one token)."""
    model = loaded.model
    delta = torch.from_numpy(vector * np.float32(coef))

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        if positions == "all":
            hidden += delta
        elif positions == "prompt":
            if hidden.shape[1] > 1:
                hidden += delta
        else:
            hidden[:, -1, :] += delta
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = model.model.layers[LAYER - 1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                repetition_penalty=1.0,
                pad_token_id=loaded.tokenizer.pad_token_id,
            )
    finally:
        handle.remove()
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("positions", ["response", "prompt", "all"])
def test_steered_greedy_output_equals_a_plain_transformers_hook(embedded_model, positions):
    engine = HFEngine(embedded_model)
    vector, coef = _direction(embedded_model), 3.0
    for prompt in _prompts(embedded_model, 2):
        ours = engine.generate([prompt], GREEDY, steering=Steering(LAYER, vector, coef, positions))
        theirs = _plain_transformers_steered(
            embedded_model, prompt, vector, coef, positions, GREEDY.max_new_tokens
        )
        # ours stops before eos and does not include it
        assert ours.response_ids[0] == theirs[: len(ours.response_ids[0])]
        assert len(ours.response_ids[0]) == len(theirs) or ours.finish_reasons[0] == "eos"
    plain = engine.generate(_prompts(embedded_model, 2), GREEDY)
    assert plain.response_ids != [
        _plain_transformers_steered(embedded_model, p, vector, coef, positions, 6)[
            : len(plain.response_ids[i])
        ]
        for i, p in enumerate(_prompts(embedded_model, 2))
    ], "the steering made no difference: the comparison above proves nothing"


def test_steered_batch_of_8_equals_batch_of_1(embedded_model):
    engine = HFEngine(embedded_model)
    prompts = _prompts(embedded_model, 8)
    steering = Steering(LAYER, _direction(embedded_model), 2.0)
    batched = engine.generate(prompts, GREEDY, CAPTURE, steering=steering)
    for i, prompt in enumerate(prompts):
        alone = engine.generate([prompt], GREEDY, CAPTURE, steering=steering)
        assert alone.response_ids[0] == batched.response_ids[i], i
        for pooling, tensor in alone.pooled.items():
            assert_close_to_scale(batched.pooled[pooling][i], tensor[0])


def test_cli_sweep_sets_coefficient_zero_and_resume(cli, embedded_model, tmp_path):
    vectors = tmp_path / "v.npy"
    np.save(vectors, np.stack([_direction(embedded_model)] * embedded_model.n_layers))
    common = [
        "generate", "--experiments-dir", tmp_path, "--experiment", "e", "--trait", "french",
        "--n-examples", 2, "--batch-size", 2, "--max-new-tokens", 4, "--temperature", 0,
        "--layers", f"{LAYER - 1},{LAYER}", "--no-generation-cache", "--device", "cpu",
        "--dtype", "float32",
    ]  # fmt: skip
    sweep = [
        "--steer-vector", vectors, "--steer-layer", LAYER, "--steer-coef=0,4",
        "--steer-control", "random", "--steer-control-seed", 7, "--steer-prompts", "trait",
    ]  # fmt: skip
    first = cli(*common, *sweep, "--json")
    assert first.exit_code == 0, first.output
    # the sweep's size is said once: 3 sets (vector 0 and 4, random 4) of 2 rows a polarity
    err = " ".join(first.stderr.split())
    assert err.count("rows to run") == 1, err
    assert "12 rows to run of up to 4 new tokens" in err
    plain = cli(*common)
    assert plain.exit_code == 0, plain.output

    trait = tmp_path / "e" / "french"
    sets = sorted(str(p.relative_to(trait)) for p in trait.glob("steering/*/*/*"))
    # the control shares coefficient 0 with the vector: generated once
    assert sets == [
        "steering/L10/random/coef+4",
        "steering/L10/vector/coef+0",
        "steering/L10/vector/coef+4",
    ]
    zero = trait / "steering/L10/vector/coef+0"
    for polarity in ("pos", "neg"):
        assert (zero / f"responses/{polarity}.csv").read_text() == (
            trait / f"responses/{polarity}.csv"
        ).read_text()
        assert np.array_equal(
            np.load(zero / f"activations/{polarity}_response_avg.npy"),
            np.load(trait / f"activations/{polarity}_response_avg.npy"),
        )
    four = trait / "steering/L10/vector/coef+4"
    assert (four / "responses/pos.csv").read_text() != (trait / "responses/pos.csv").read_text()
    meta = json.loads((trait / "steering/L10/random/coef+4/metadata.json").read_text())
    assert meta["steering"] == {
        "vector_file": str(vectors),
        "vector_sha256": file_sha256(vectors),
        "layer": LAYER,
        "coef": 4.0,
        "positions": "response",
        "direction": "random",
        "control_seed": 7,
        "norm": pytest.approx(30.0, rel=1e-5),
    }
    again = cli(*common, *sweep, "--json")
    assert again.exit_code == 0, again.output
    assert [t["generated"] for t in json.loads(again.stdout)["traits"]] == [0, 0, 0]


def test_a_vector_of_another_width_or_layer_count_fails_before_any_write(cli, tmp_path):
    narrow = tmp_path / "narrow.npy"
    np.save(narrow, np.ones(100, dtype="float32"))
    deep = tmp_path / "deep.npy"
    np.save(deep, np.ones((40, 576), dtype="float32"))
    out = tmp_path / "x"
    for path, layer, message in (
        (narrow, 3, "a vector of size 100 does not fit"),
        (deep, 35, "--steer-layer: layer 35 out of range"),
    ):
        result = cli(
            "generate", "--experiments-dir", out, "--experiment", "e", "--trait", "french",
            "--n-examples", 1, "--max-new-tokens", 1, "--device", "cpu",
            "--steer-vector", path, "--steer-layer", layer, "--steer-coef", 1,
        )  # fmt: skip
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output
        assert not (out / "e" / "french" / "steering").exists()


def test_cli_sweep_on_the_cuda_engine_equals_hf(cli, embedded_model, tmp_path):
    """``--engine cuda`` steers (eagerly here, on CPU): the same sets as ``--engine hf``, with
    the same responses and close activations."""
    vectors = tmp_path / "v.npy"
    np.save(vectors, _direction(embedded_model))
    for engine in ("hf", "cuda"):
        done = cli(
            "generate", "--experiments-dir", tmp_path, "--experiment", engine, "--trait",
            "french", "--n-examples", 2, "--batch-size", 2, "--max-new-tokens", 4,
            "--temperature", 0, "--layers", f"{LAYER},30", "--no-generation-cache",
            "--device", "cpu", "--dtype", "float32", "--engine", engine,
            "--steer-vector", vectors, "--steer-layer", LAYER, "--steer-coef=-3,3",
            "--steer-positions", "all", "--json",
        )  # fmt: skip
        assert done.exit_code == 0, done.output
    sets = [tmp_path / e / "french/steering/L10/vector" for e in ("hf", "cuda")]
    for coef in ("coef-3", "coef+3"):
        hf, cuda = (s / coef for s in sets)
        csv = (hf / "responses/neutral.csv").read_text()
        assert csv == (cuda / "responses/neutral.csv").read_text(), coef
        arrays = sorted(p.name for p in (hf / "activations").glob("*.npy"))
        assert arrays and arrays == sorted(p.name for p in (cuda / "activations").glob("*.npy"))
        for name in arrays:
            want = torch.from_numpy(np.load(hf / "activations" / name))
            assert_close_to_scale(torch.from_numpy(np.load(cuda / "activations" / name)), want)
    assert (sets[0] / "coef-3/responses/neutral.csv").read_text() != (
        sets[0] / "coef+3/responses/neutral.csv"
    ).read_text()
