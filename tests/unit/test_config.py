from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tracekit.cli import _options as opt
from tracekit.cli._common import build_config
from tracekit.config import BatchSize, LayerSpec, Normalization, TracekitConfig, resolve_config
from tracekit.errors import ConfigError


class DemoConfig(TracekitConfig):
    batch_size: BatchSize = 8
    layers: LayerSpec = LayerSpec.parse("0-3")
    normalize: Normalization = Normalization.standardize
    name: str = "default"


def test_defaults_frozen_and_extra_forbidden():
    from pydantic import ValidationError

    cfg = DemoConfig()
    assert cfg.batch_size == 8 and cfg.normalize is Normalization.standardize
    with pytest.raises(ValidationError):
        cfg.batch_size = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="bogus"):
        DemoConfig(bogus=1)  # type: ignore[call-arg]


@pytest.mark.parametrize("value", [0, -1, 4097])
def test_batch_size_is_positive_and_bounded(value):
    with pytest.raises(ConfigError, match="--batch-size"):
        resolve_config(DemoConfig, {"batch_size": value})


def test_normalization_choices():
    assert resolve_config(DemoConfig, {"normalize": "minmax"}).normalize is Normalization.minmax
    with pytest.raises(ConfigError, match="--normalize"):
        resolve_config(DemoConfig, {"normalize": "zscore"})


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_precedence_cli_over_file_over_defaults(tmp_path: Path, suffix: str):
    path = tmp_path / f"cfg{suffix}"
    if suffix == ".toml":
        path.write_text('[demo]\nbatch_size = 4\nname = "from-file"\n')
    elif suffix == ".yaml":
        path.write_text("demo:\n  batch-size: 4\n  name: from-file\n")
    else:
        path.write_text('{"demo": {"batch_size": 4, "name": "from-file"}}')
    cfg = resolve_config(DemoConfig, {"name": "from-cli"}, path, "demo")
    assert (cfg.batch_size, cfg.name, str(cfg.layers)) == (4, "from-cli", "0-3")


def test_flat_file_and_file_errors(tmp_path: Path):
    flat = tmp_path / "flat.toml"
    flat.write_text('layers = "1,2"\n')
    assert str(resolve_config(DemoConfig, {}, flat, "demo").layers) == "1-2"
    bad_key = tmp_path / "bad.toml"
    bad_key.write_text("batchsize = 3\n")
    with pytest.raises(ConfigError, match="unknown option 'batchsize' in config file"):
        resolve_config(DemoConfig, {}, bad_key, "demo")
    bad_value = tmp_path / "badv.yaml"
    bad_value.write_text("layers: 5-2\n")
    with pytest.raises(ConfigError, match="'layers' in .*badv.yaml: invalid layer range"):
        resolve_config(DemoConfig, {}, bad_value, "demo")
    broken = tmp_path / "broken.toml"
    broken.write_text("layers = [\n")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        resolve_config(DemoConfig, {}, broken)
    with pytest.raises(ConfigError, match="config file not found"):
        resolve_config(DemoConfig, {}, tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="unknown type"):
        (tmp_path / "c.ini").write_text("x")
        resolve_config(DemoConfig, {}, tmp_path / "c.ini")


def test_build_config_takes_only_options_the_user_typed(tmp_path: Path):
    """A parser default must not override the config file; a typed flag must."""
    seen: list[DemoConfig] = []
    app = typer.Typer()

    @app.command("demo")
    def demo(
        ctx: typer.Context,
        config: opt.Config = None,
        batch_size: opt.BatchSize = 8,
        layers: opt.Layers = None,
    ) -> None:
        seen.append(build_config(ctx, DemoConfig))

    @app.command("other")
    def other() -> None:  # a second command so 'demo' stays a named subcommand
        pass

    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("[demo]\nbatch_size = 2\nlayers = '5'\n")
    runner = CliRunner()
    assert runner.invoke(app, ["demo", "--config", str(cfg_file)]).exit_code == 0
    assert seen[-1].batch_size == 2 and str(seen[-1].layers) == "5"
    assert (
        runner.invoke(app, ["demo", "--config", str(cfg_file), "--batch-size", "16"]).exit_code == 0
    )
    assert seen[-1].batch_size == 16 and str(seen[-1].layers) == "5"
    assert runner.invoke(app, ["demo"]).exit_code == 0
    assert seen[-1] == DemoConfig()
