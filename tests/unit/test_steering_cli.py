"""Bad steering inputs: one line naming the option, a non-zero exit, before any model loads
(nothing is written), and the vector-file rules (layer rows, pickles refused)."""

import json

import numpy as np
import pytest
import torch

from tracekit.engines.steering import load_vector_file, random_direction, steering_sets
from tracekit.errors import InputError


@pytest.fixture()
def steer(cli, tmp_path):
    def run(*args):
        result = cli(
            "generate", "--experiments-dir", tmp_path / "x", "--experiment", "e",
            "--trait", "french", "--n-examples", 1, "--max-new-tokens", 1, *args,
        )  # fmt: skip
        assert not (tmp_path / "x").exists(), "something was written before the check"
        return result

    return run


def _vectors(tmp_path, shape=(31, 576), name="v.npy"):
    path = tmp_path / name
    np.save(path, np.ones(shape, dtype="float32"))
    return path


@pytest.mark.parametrize(
    ("args", "exit_code", "message"),
    [
        (["--steer-coef", "1"], 2, "--steer-coef needs --steer-vector FILE"),
        (["--steer-layer", "3"], 2, "--steer-layer needs --steer-vector FILE"),
        (["--steer-control", "random"], 2, "--steer-control needs --steer-vector"),
        (["--steer-vector", "{v}", "--steer-coef", "1"], 2, "--steer-vector needs --steer-layer"),
        (["--steer-vector", "{v}", "--steer-layer", "3"], 2, "--steer-vector needs --steer-coef"),
        (["--steer-vector", "{v}", "--steer-layer", "3", "--steer-coef", "1,x"], 2,
         "not a list of numbers"),
        (["--steer-vector", "{v}", "--steer-layer", "3", "--steer-coef", "1",
          "--steer-positions", "middle"], 2, "--steer-positions"),
        (["--steer-vector", "{v}", "--steer-layer", "3", "--steer-coef", "1",
          "--steer-control", "shuffled"], 2, "--steer-control"),
        (["--steer-vector", "{missing}", "--steer-layer", "3", "--steer-coef", "1"], 1,
         "--steer-vector: file not found"),
        (["--steer-vector", "{txt}", "--steer-layer", "3", "--steer-coef", "1"], 1,
         "is neither .npy nor .pt"),
        (["--steer-vector", "{cube}", "--steer-layer", "3", "--steer-coef", "1"], 1,
         "expected [layers, hidden] or [hidden]"),
        (["--steer-vector", "{v}", "--steer-layer", "40", "--steer-coef", "1"], 1,
         "has 31 rows (layers 0-30); no row for layer 40"),
    ],
)  # fmt: skip
def test_bad_steering_options_fail_before_the_model_loads(
    steer, tmp_path, args, exit_code, message
):
    files = {
        "v": _vectors(tmp_path),
        "missing": tmp_path / "nope.npy",
        "txt": tmp_path / "v.txt",
        "cube": _vectors(tmp_path, (2, 3, 4), "cube.npy"),
    }
    files["txt"].write_text("1 2 3")
    result = steer(*(a.format(**files) for a in args))
    assert result.exit_code == exit_code, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_rows_are_found_by_the_layers_in_extract_vectors_metadata(tmp_path, steer):
    vectors = np.arange(3 * 4, dtype="float32").reshape(3, 4)
    path = tmp_path / "mean_diff_response_avg.npy"
    np.save(path, vectors)
    (tmp_path / "mean_diff_response_avg_metadata.json").write_text(
        json.dumps({"layers": [{"layer": 5}, {"layer": 9}, {"layer": 12}]})
    )
    (chosen,) = steering_sets(path, 9, (2.0,), "response", None, 0)
    assert np.array_equal(chosen.steering.vector, vectors[1])
    assert chosen.subdir.as_posix() == "steering/L9/vector/coef+2"
    result = steer("--steer-vector", path, "--steer-layer", 7, "--steer-coef", 1)
    assert result.exit_code == 1
    assert "has no vector for layer 7 (its layers: 5,9,12)" in " ".join(result.output.split())


def test_pt_files_load_weights_only_and_pickles_are_refused(tmp_path):
    good = tmp_path / "v.pt"
    torch.save(torch.ones(4, 8), good)
    assert load_vector_file(good).shape == (4, 8)
    bad = tmp_path / "evil.pt"
    torch.save({"vector": torch.ones(8), "note": object()}, bad)
    with pytest.raises(InputError, match="cannot read"):
        load_vector_file(bad)
    pickled = tmp_path / "evil.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="cannot read"):
        load_vector_file(pickled)


def test_random_control_is_seeded_with_the_vectors_norm():
    vector = np.arange(16, dtype="float32")
    one, again, other = (random_direction(vector, s) for s in (3, 3, 4))
    assert np.array_equal(one, again) and not np.array_equal(one, other)
    assert np.linalg.norm(one) == pytest.approx(np.linalg.norm(vector), rel=1e-6)
    assert abs(float(one @ vector)) < 0.9 * np.linalg.norm(vector) ** 2  # not the vector itself


def test_steering_options_come_from_a_config_file(tmp_path):
    from tracekit.config.base import resolve_config
    from tracekit.jobs.generate import GenerateConfig

    path = tmp_path / "run.toml"
    path.write_text(
        '[generate]\nexperiment = "e"\ntraits = "french"\nsteer_vector = "v.npy"\n'
        'steer-layer = 12\nsteer_coef = [-2, 0, 2.5]\nsteer_control = "random"\n'
        'steer_positions = "all"\n'
    )
    config = resolve_config(GenerateConfig, {"steer_coef": "0,1"}, path, "generate")
    assert config.steer_coef == (0.0, 1.0)  # the command line wins
    config = resolve_config(GenerateConfig, {}, path, "generate")
    assert (config.steer_layer, config.steer_coef, config.steer_positions) == (
        12,
        (-2.0, 0.0, 2.5),
        "all",
    )
    assert config.polarities == ("neutral",)


_STEERED = {"experiment": "e", "traits": "french", "steer_vector": "v.npy", "steer_layer": 1}
_REPORT = {"experiment": "e", "trait": "french"}


@pytest.mark.parametrize(
    ("command", "option", "config_name", "given"),
    [
        ("generate", "--steer-positions", "GenerateConfig", _STEERED),
        ("generate", "--steer-control", "GenerateConfig", _STEERED),
        ("generate", "--steer-prompts", "GenerateConfig", _STEERED),
        ("report steering", "--polarity", "SteeringReportConfig", _REPORT),
    ],
)
def test_steering_choices_complete_and_are_the_ones_the_config_takes(
    command, option, config_name, given
):
    """TAB after a steering option offers its values, and those are exactly what the config
    accepts (one set, in tracekit.config.choices)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tracekit.config.base import resolve_config
    from tracekit.errors import ConfigError
    from tracekit.jobs.generate import GenerateConfig
    from tracekit.report.steering import SteeringReportConfig

    cls = {"GenerateConfig": GenerateConfig, "SteeringReportConfig": SteeringReportConfig}
    words = f"tracekit {command} {option} "
    env = {
        **os.environ,
        "_TRACEKIT_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split())),
    }
    exe = str(Path(sys.executable).parent / "tracekit")
    offered = subprocess.run([exe], capture_output=True, text=True, env=env, timeout=60)
    values = offered.stdout.split()
    assert values, offered.stderr
    field = option.removeprefix("--").replace("-", "_")
    base = {**given, "steer_coef": "1"} if command == "generate" else given
    for value in values:
        config = resolve_config(cls[config_name], {**base, field: value})
        assert getattr(config, field) == value
    with pytest.raises(ConfigError, match=option):
        resolve_config(cls[config_name], {**base, field: "".join(values) + "x"})
