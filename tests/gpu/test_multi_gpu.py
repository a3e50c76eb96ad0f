"""Several GPUs: data-parallel runs over NCCL, and ``--device-map auto`` splitting one model.

Needs 2+ CUDA GPUs (skipped otherwise). A random-init tiny Llama in float32 (TF32 off in the
engines' default settings) is saved to a folder and used through the real CLI:

- ``generate``, ``extract activations``, ``extract features`` and ``log`` with
  ``--num-processes 2`` (torchrun, one GPU per process, nccl) merge into the files a single-GPU
  run writes (the ``hf`` engine: these tests are about the processes, and it needs no
  compilation; the CUDA engine's data-parallel run at full size is
  ``benchmarks/bench_multigpu.py``);
- a steering sweep (``--engine auto``: the CUDA engine where it steers) and a tiny Gemma-2 /
  Gemma-3 on the CUDA engine (skipped, with the reason, where the engine does not run it) on
  two GPUs write what one GPU writes;
- ``--device-map auto`` places the model's blocks on both GPUs, and generation, capture and the
  teacher-forced forward give what the same model on one GPU gives;
- one process with ``--device cuda:1`` runs the CUDA engine (graphs, Triton kernels, capture
  rings) on the second GPU while the first one is CUDA's current device, and one process can
  run it on both GPUs in turn.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tolerance import assert_close_to_scale
from tracekit.models.random_model import random_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
    ),
]

N = 12  # rows per polarity
LAYERS = "0,2,4"
POOLINGS = ("response_avg", "prompt_last")
# a row's activations come from batches of different composition (and padding) in the two
# runs: float32 sums agree to a few units in the last places of the largest magnitude
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    loaded = random_llama("tiny", device="cpu", dtype="float32", seed=3)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def _tracekit(*args: str) -> dict:
    command = [sys.executable, "-m", "tracekit", *args, "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def _generate(
    model: Path, base: Path, experiment: str, *extra: str, poolings: tuple[str, ...] = POOLINGS
) -> dict:
    return _tracekit(
        "generate", "--model", str(model), "--no-chat-template", "--trait", "refusal",
        "--experiment", experiment, "--experiments-dir", str(base), "--n-examples", str(N),
        "--max-new-tokens", "12", "--temperature", "0", "--layers", LAYERS,
        "--pooling", ",".join(poolings), "--batch-size", "8", "--dtype", "float32",
        "--no-generation-cache", "--engine", "hf", *extra,
    )  # fmt: skip


def _assert_same(
    single: Path,
    other: Path,
    poolings: tuple[str, ...] = POOLINGS,
    polarities: tuple[str, ...] = ("pos", "neg"),
) -> None:
    for polarity in polarities:
        want_csv = (single / "responses" / f"{polarity}.csv").read_text(encoding="utf-8")
        got_csv = (other / "responses" / f"{polarity}.csv").read_text(encoding="utf-8")
        assert got_csv == want_csv
        assert len(list(csv.DictReader(got_csv.splitlines()))) == N
        for pooling in poolings:
            want = np.load(single / "activations" / f"{polarity}_{pooling}.npy")
            got = np.load(other / "activations" / f"{polarity}_{pooling}.npy")
            assert got.shape == want.shape == (N, 3, 128)
            np.testing.assert_allclose(got, want, rtol=0, atol=REL_TOL * np.abs(want).max())


def test_two_gpu_processes_merge_into_the_single_gpu_outputs(model_dir: Path, tmp_path: Path):
    base = tmp_path / "experiments"
    single = _generate(model_dir, base, "one")
    multi = _generate(model_dir, base, "two", "--num-processes", "2")
    assert multi["traits"][0]["rows"] == {"pos": N, "neg": N}
    assert multi["tokens"] == single["tokens"]
    _assert_same(base / "one" / "refusal", base / "two" / "refusal")

    # stage 2 over the merged responses, on both GPUs
    args = ["extract", "activations", "--trait", "refusal", "--experiments-dir", str(base)]
    args += ["--model", str(model_dir), "--no-chat-template", "--layers", LAYERS]
    args += ["--pooling", "prompt_avg", "--dtype", "float32", "--batch-size", "4"]
    _tracekit(*args, "--experiment", "one")
    _tracekit(*args, "--experiment", "two", "--num-processes", "2")
    for polarity in ("pos", "neg"):
        want = np.load(base / "one" / "refusal" / "activations" / f"{polarity}_prompt_avg.npy")
        got = np.load(base / "two" / "refusal" / "activations" / f"{polarity}_prompt_avg.npy")
        assert got.shape == want.shape == (N, 3, 128)
        np.testing.assert_allclose(got, want, rtol=0, atol=REL_TOL * np.abs(want).max())


def test_log_on_two_gpus_equals_one(model_dir: Path, tmp_path: Path):
    """Two processes (per-rank stores merged), and one process with the model split over both
    GPUs (``--device-map auto``; layers 1 and 4 sit in blocks on different GPUs)."""
    from tracekit import open_store

    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 7} w9"}) + "\n" for i in range(6)))
    args = ["log", "--model", str(model_dir), "--qa", str(qa), "--layers", "1,4"]
    args += ["--max-new-tokens", "4", "--dtype", "float32", "--model-dtype", "float32"]
    args += ["--engine", "hf"]
    _tracekit(*args, "--lmdb", str(tmp_path / "one"), "--device", "cuda:0")
    summary = _tracekit(*args, "--lmdb", str(tmp_path / "two"), "--num-processes", "2")
    assert summary["logged"] == 6
    split = _tracekit(*args, "--lmdb", str(tmp_path / "split"), "--device-map", "auto")
    assert split["logged"] == 6
    for other in ("two", "split"):
        with open_store(tmp_path / "one") as ref, open_store(tmp_path / other) as got_store:
            assert sorted(got_store.keys()) == sorted(ref.keys())
            for key in sorted(ref.keys()):
                want, got = ref.get(key), got_store.get(key)
                assert got.metadata["response_token_ids"] == want.metadata["response_token_ids"]
                for layer in ("layer_1", "layer_4"):
                    x = want.arrays[layer].astype(np.float32)
                    y = got.arrays[layer].astype(np.float32)
                    np.testing.assert_allclose(y, x, rtol=0, atol=1e-3 * np.abs(x).max())


def test_device_map_auto_splits_the_model_and_matches_one_gpu(model_dir: Path, tmp_path: Path):
    from tracekit.engines.hf import HFEngine
    from tracekit.engines.interface import CaptureSpec, GenerationParams, resolve_engine_name
    from tracekit.engines.pooling import Pooling
    from tracekit.engines.teacher_forced import pooled_forward
    from tracekit.models import ModelConfig, load_model

    split = load_model(ModelConfig(model=str(model_dir), dtype="float32", device_map="auto"))
    whole = load_model(ModelConfig(model=str(model_dir), dtype="float32", device="cuda:0"))
    devices = {str(d) for d in split.model.hf_device_map.values()}
    assert len(devices) == 2, split.model.hf_device_map  # blocks on both GPUs
    assert resolve_engine_name("auto", split) == "hf"  # the CUDA engine serves one device

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 512, (int(k),), generator=gen).tolist() for k in (5, 17, 9, 30)]
    capture = CaptureSpec(layers=(0, 1, 2, 3, 4), poolings=tuple(Pooling))
    params = GenerationParams(max_new_tokens=16, temperature=0)
    ref = HFEngine(whole).generate(prompts, params, capture)
    out = HFEngine(split).generate(prompts, params, capture)
    assert out.response_ids == ref.response_ids
    for pooling in Pooling:
        want, got = ref.pooled[pooling], out.pooled[pooling]
        assert got.device.type == "cpu" and got.shape == want.shape == (4, 5, 128)
        torch.testing.assert_close(got, want, rtol=0, atol=REL_TOL * float(want.abs().max()))
    forced_ref = pooled_forward(whole, prompts, ref.response_ids, capture)
    forced = pooled_forward(split, prompts, ref.response_ids, capture)
    for pooling in Pooling:
        want = forced_ref[pooling]
        atol = REL_TOL * float(want.abs().max())
        torch.testing.assert_close(forced[pooling], want, rtol=0, atol=atol)

    # and the CLI end to end: the same files as a one-GPU run
    base = tmp_path / "experiments"
    every = ("response_avg", "prompt_last", "prompt_avg")
    _generate(model_dir, base, "one", "--device", "cuda:0", poolings=every)
    _generate(model_dir, base, "split", "--device-map", "auto", poolings=every)
    _assert_same(base / "one" / "refusal", base / "split" / "refusal", every)


def test_cuda_engine_on_the_second_gpu(model_dir: Path, tmp_path: Path):
    """``--device cuda:1`` with the CUDA engine writes what ``--device cuda:0`` writes: the
    engine makes its GPU the current device while it captures and replays (graph capture,
    its streams and Triton's launches follow the current device, not the model's)."""
    runs = {}
    for index in (0, 1):
        name = f"gpu{index}"
        out = _generate(model_dir, tmp_path, name, "--device", f"cuda:{index}", "--engine", "cuda")
        assert [p["device"] for p in out["processes"]] == [f"cuda:{index}"], out
        runs[index] = tmp_path / name / "refusal"
    _assert_same(runs[0], runs[1])


def test_cuda_engine_on_both_gpus_in_one_process():
    """The CUDA engine on ``cuda:0``, then on ``cuda:1``, in one process: both decode from
    captured graphs (each GPU's captures on a stream of that GPU: ``torch.cuda.graph``'s own
    default is one stream, on the GPU of the process's first capture) and agree."""
    from tracekit.engines.cuda.engine import CudaEngine
    from tracekit.engines.interface import CaptureSpec, GenerationParams
    from tracekit.engines.pooling import Pooling

    torch.backends.cuda.matmul.allow_tf32 = False
    prompts = [[5, 17, 99, 3, 250], [7, 8], [300, 301, 302], [42, 43, 44, 45]]
    params = GenerationParams(max_new_tokens=12, temperature=0)
    capture = CaptureSpec((0, 2, 4), (Pooling.response_avg, Pooling.prompt_last))
    outs, graphs = {}, {}
    for device in ("cuda:0", "cuda:1"):
        engine = CudaEngine(random_llama("tiny", device=device, dtype="float32", seed=0))
        outs[device] = engine.generate(prompts, params, capture)
        runners = engine._decoder(capture)._runners.values()
        graphs[device] = [runner.graph is not None for runner in runners]
    assert graphs == {"cuda:0": [True], "cuda:1": [True]}
    assert torch.cuda.current_device() == 0
    first, second = outs["cuda:0"], outs["cuda:1"]
    assert second.response_ids == first.response_ids
    for pooling in capture.poolings:
        want = first.pooled[pooling]
        assert (second.pooled[pooling] - want).abs().max() <= REL_TOL * want.abs().max()


def test_host_copy_of_values_on_two_gpus_waits_for_both():
    """Each GPU's values go over that GPU's copy stream; ``wait`` returns once all landed."""
    from tracekit.engines.interface import HostCopy

    n = 64 * 2**20  # 256 MB per GPU: transfers that run for milliseconds
    expected = torch.arange(n, dtype=torch.float32)
    on = {f"cuda:{i}": torch.arange(n, device=f"cuda:{i}", dtype=torch.float32) for i in (0, 1)}
    for snapshot in (True, False):
        copy = HostCopy({**on, "cpu": expected}, snapshot=snapshot)
        out = copy.wait()
        assert list(out) == ["cuda:0", "cuda:1", "cpu"]
        assert copy.ready()
        for name, value in out.items():
            assert torch.equal(value, expected), name


def test_steered_sweep_on_two_gpus_equals_one(model_dir: Path, tmp_path: Path):
    """A steering sweep on two GPUs: each coefficient's set is the single-GPU set, and records
    the same steering. ``--engine auto`` steers on the CUDA engine where it can, else on hf."""
    vector = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    np.save(tmp_path / "v.npy", vector / np.linalg.norm(vector))
    steer = ["--steer-vector", str(tmp_path / "v.npy"), "--steer-layer", "2"]
    steer += ["--steer-coef", "0,8", "--engine", "auto"]  # the last --engine wins
    base = tmp_path / "experiments"
    one = _generate(model_dir, base, "one", *steer)
    two = _generate(model_dir, base, "two", *steer, "--num-processes", "2")
    assert [t["steering"]["coef"] for t in two["traits"]] == [0.0, 8.0]
    assert two["tokens"] == one["tokens"]
    responses = []
    for coef in ("+0", "+8"):
        subdir = Path("steering") / "L2" / "vector" / f"coef{coef}"
        want, got = base / "one" / "refusal" / subdir, base / "two" / "refusal" / subdir
        _assert_same(want, got, polarities=("neutral",))
        steering = json.loads((got / "metadata.json").read_text())["steering"]
        assert steering == json.loads((want / "metadata.json").read_text())["steering"]
        responses.append((want / "responses" / "neutral.csv").read_text(encoding="utf-8"))
    assert responses[0] != responses[1]  # the coefficient took effect


@pytest.mark.parametrize("shape", ["gemma2-tiny", "gemma3-tiny"])
def test_gemma_on_the_cuda_engine_on_two_gpus_equals_one(shape: str, tmp_path: Path):
    from tracekit.engines.cuda.arch import unsupported_reason
    from tracekit.models.random_gemma import random_gemma

    loaded = random_gemma(shape, device="cpu", dtype="float32", seed=3)
    reason = unsupported_reason(loaded.model)
    if reason is not None:
        pytest.skip(f"the CUDA engine does not run {shape}: {reason}")
    folder = tmp_path / "model"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    base = tmp_path / "experiments"
    one = _generate(folder, base, "one", "--engine", "cuda")
    two = _generate(folder, base, "two", "--engine", "cuda", "--num-processes", "2")
    assert two["tokens"] == one["tokens"]
    _assert_same(base / "one" / "refusal", base / "two" / "refusal")


def test_extract_features_on_two_gpus_equals_one(model_dir: Path, tmp_path: Path):
    """Each process writes its block of sentence files; together they are one GPU's files."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_example_saes",
        Path(__file__).resolve().parents[2] / "examples" / "make_example_saes.py",
    )
    assert spec and spec.loader
    saes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(saes)
    for release_layer in (0, 2):  # tracekit layers 1 and 3
        saes.write_gemma_scope(tmp_path / "saes", release_layer, saes.random_sae(128, 256, 7), 16)
    rng = np.random.default_rng(5)
    sentences = tmp_path / "sentences.csv"
    with sentences.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "concept_strength_label"])
        for i in range(10):  # batches of 4: rank 0 takes 8 sentences, rank 1 the last 2
            words = " ".join(f"w{w}" for w in rng.integers(2, 512, rng.integers(4, 20)))
            writer.writerow([words, i % 4])
    args = ["extract", "features", "--model", str(model_dir), "--sentences", str(sentences)]
    args += ["--sae", str(tmp_path / "saes"), "--dtype", "float32", "--batch-size", "4"]
    one = _tracekit(*args, "--output", str(tmp_path / "one"), "--device", "cuda:0")
    two = _tracekit(*args, "--output", str(tmp_path / "two"), "--num-processes", "2")
    assert two["written"] == one["written"] == 10
    for index in range(10):
        name = f"sentence_{index:06d}.npz"
        with np.load(tmp_path / "one" / name) as want, np.load(tmp_path / "two" / name) as got:
            assert sorted(got.files) == sorted(want.files)
            for key in want.files:
                if want[key].dtype.kind == "f":
                    assert_close_to_scale(got[key], want[key], rel=REL_TOL)
                else:
                    assert np.array_equal(got[key], want[key]), key
