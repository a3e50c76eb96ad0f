"""The base of every tracekit config, and the one implementation of option precedence.

Precedence is CLI flag > config file > defaults. Configs are pydantic models, frozen, with
``extra="forbid"``; their validators are pure (no device probing, no filesystem writes).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from tracekit.errors import ConfigError

ConfigT = TypeVar("ConfigT", bound="TracekitConfig")


class TracekitConfig(BaseModel):
    """Base class: frozen, unknown keys rejected, enums kept as their values."""

    # hide_input_in_errors: a rejected value is never repeated in an error's text (it may be
    # an API key typed into the wrong option)
    model_config = ConfigDict(
        frozen=True, extra="forbid", arbitrary_types_allowed=True, hide_input_in_errors=True
    )


def _option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def format_validation_error(error: ValidationError, source: str | None = None) -> str:
    """One line from a pydantic error: which option/key, what is wrong."""
    parts, missing = [], []
    for item in error.errors():
        loc = [str(x) for x in item.get("loc", ()) if not isinstance(x, int)]
        field = loc[0] if loc else ""
        if item.get("type") == "missing" and field:
            missing.append(_option_name(field))
            continue
        message = str(item.get("msg", "invalid value"))
        message = message.removeprefix("Value error, ")
        if item.get("type") == "extra_forbidden":
            message = "unknown option"
        where = f"{_option_name(field)}" if source is None else f"'{field}' in {source}"
        parts.append(f"{where}: {message}" if field else message)
    if missing:  # all at once, in the wording of click's missing options
        plural = "s" if len(missing) > 1 else ""
        parts.insert(0, f"missing option{plural} {', '.join(missing)}")
    return "; ".join(parts)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON config file into a dict."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}", "check the --config path")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {file} is not valid UTF-8", "save it as UTF-8") from None
    suffix = file.suffix.lower()
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(
                f"config file {file} has an unknown type '{suffix}'", "use .toml, .yaml or .json"
            )
    except ConfigError:
        raise
    except Exception as exc:  # parser errors differ per format; all mean the same to a user
        raise ConfigError(f"config file {file} cannot be parsed: {exc}".splitlines()[0]) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {file} must hold a table of options at the top")
    return data


def _section(data: Mapping[str, Any], section: str | None) -> dict[str, Any]:
    """The options for one command: its own table if present, else the whole file."""
    if section is not None:
        for key in (section, section.replace("-", "_"), section.replace("_", "-")):
            value = data.get(key)
            if isinstance(value, dict):
                return dict(value)
    return {k: v for k, v in data.items() if not isinstance(v, dict)}


def resolve_config(
    cls: type[ConfigT],
    cli_values: Mapping[str, Any] | None = None,
    config_file: str | Path | None = None,
    section: str | None = None,
) -> ConfigT:
    """Build ``cls`` with precedence CLI values > config file > the model's defaults.

    ``cli_values`` holds only options the user actually gave (not parser defaults). A config
    file may have one table per command (``[generate]``, ``[build-dataset]``) or be flat.
    """
    merged: dict[str, Any] = {}
    source = None
    if config_file is not None:
        source = str(config_file)
        file_values = _section(read_config_file(config_file), section)
        merged.update({k.replace("-", "_"): v for k, v in file_values.items()})
        unknown = sorted(set(merged) - set(cls.model_fields))
        if unknown:
            raise ConfigError(
                f"unknown option '{unknown[0]}' in config file {source}",
                f"valid options: {', '.join(sorted(cls.model_fields))}",
            )
    cli = {k: v for k, v in (cli_values or {}).items() if k in cls.model_fields}
    in_file = dict(merged)
    merged.update(cli)
    try:
        config = cls(**merged)
    except ValidationError as exc:
        bad_fields = {str(e["loc"][0]) for e in exc.errors() if e.get("loc")}
        from_file = source is not None and not (bad_fields & set(cli))
        raise ConfigError(format_validation_error(exc, source if from_file else None)) from None
    for key in sorted(set(in_file) & set(cli)):  # a bad file value stays an error when a flag
        try:  # overrides it: the same file without that flag would fail
            cls(**{**merged, key: in_file[key]})
        except ValidationError as exc:  # (the merged values were valid: this is the file's)
            raise ConfigError(
                format_validation_error(exc, source),
                "fix it there: the command-line value only overrides it",
            ) from None
    return config
