"""Trait definitions: the ``trait_definition.json`` schema and where a trait is found.

A trait definition follows the persona-vectors format: a name, a description, instruction
pairs (``pos`` elicits the trait, ``neg`` suppresses it), the questions to ask, and the judge's
``eval_prompt`` with ``{question}`` and ``{answer}`` placeholders. persona_vectors' own files
have no ``name`` or ``description``: read from a file, the name defaults to the file's stem (the
trait folder's name for a ``trait_definition.json``) and the description to empty, with one
logged notice per file (from the main process of a data-parallel run).

:func:`load_trait` resolves a name or path in this order:

1. an existing JSON file path;
2. ``<base_dir>/experiments/<experiment>/<name>/trait_definition.json`` when an experiment is
   given (the copy a ``generate`` run saved, so later stages use exactly what it used);
3. the traits shipped with tracekit (package data ``tracekit/data/traits/<name>.json``; the
   repository's ``examples/traits/`` entries are links to those same files).
"""

from __future__ import annotations

import json
import logging
import re
import string
from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from tracekit.distributed import main_process_by_env
from tracekit.errors import InputError

logger = logging.getLogger(__name__)

TRAIT_FILE = "trait_definition.json"
"""File name of a trait definition inside an experiment's trait folder."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_REQUIRED_PLACEHOLDERS = ("question", "answer")

NonEmptyText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class InstructionPair(BaseModel):
    """One contrastive instruction: ``pos`` elicits the trait, ``neg`` suppresses it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pos: NonEmptyText
    neg: NonEmptyText


class TraitDefinition(BaseModel):
    """A trait in the persona-vectors format (the schema of ``trait_definition.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: Annotated[str, StringConstraints(strip_whitespace=True)] = ""
    """Free text for people; persona_vectors' files have none (empty then)."""
    instruction: list[InstructionPair] = Field(min_length=1)
    questions: list[NonEmptyText] = Field(min_length=1)
    eval_prompt: NonEmptyText

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, value: str) -> str:
        value = value.strip()
        if not _NAME.match(value):
            raise ValueError(
                f"'{value}' is not a valid trait name: use letters, digits, '_', '-' or '.' "
                "(it becomes a folder name)"
            )
        return value

    @field_validator("eval_prompt")
    @classmethod
    def _eval_prompt_placeholders(cls, value: str) -> str:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as exc:
            raise ValueError(
                f"cannot be formatted ({exc}); write literal braces as '{{{{' and '}}}}'"
            ) from None
        missing = [p for p in _REQUIRED_PLACEHOLDERS if p not in fields]
        if missing:
            shown = ", ".join("{" + p + "}" for p in missing)
            raise ValueError(f"must contain the placeholder(s) {shown}")
        unknown = sorted(f for f in fields if f not in _REQUIRED_PLACEHOLDERS)
        if unknown:
            shown = ", ".join("{" + (u or "") + "}" for u in unknown)
            raise ValueError(
                f"has unknown placeholder(s) {shown}: only {{question}} and {{answer}} are "
                "filled in; write literal braces as '{{' and '}}'"
            )
        return value

    def format_eval_prompt(self, question: str, answer: str) -> str:
        """The judge prompt for one (question, answer) pair."""
        return self.eval_prompt.format(question=question, answer=answer)

    @classmethod
    def from_file(cls, path: str | Path) -> TraitDefinition:
        """Read and validate a trait file; errors name the file and the bad field."""
        file = Path(path)
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"trait file not found: {file}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read trait file {file}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise InputError(
                f"trait file {file} is not valid JSON: {exc.msg} at line {exc.lineno}"
            ) from None
        if isinstance(data, dict) and not {"name", "description"} <= data.keys():
            data = _fill_persona_vectors_defaults(file, data)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InputError(
                f"invalid trait file {file}: {_describe(exc)}",
                "see docs/generate.md for the trait_definition.json schema",
            ) from None

    def to_json(self) -> str:
        """Pretty JSON for ``trait_definition.json``."""
        return json.dumps(self.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"


_NOTICED: set[Path] = set()
"""Files whose defaulted name/description were already reported (one notice per file)."""


def default_trait_name(file: Path) -> str:
    """The name of a trait file without a ``name``: its stem, or for a
    ``trait_definition.json`` the folder holding it (``EXP/<trait>/trait_definition.json``)."""
    return file.resolve().parent.name if file.name == TRAIT_FILE else file.stem


def _fill_persona_vectors_defaults(file: Path, data: dict[str, object]) -> dict[str, object]:
    """``data`` with the name and description persona_vectors' trait files lack, said once."""
    filled = dict(data)
    used = []
    if "name" not in data:
        name = default_trait_name(file)
        source = "its folder" if file.name == TRAIT_FILE else "the file name"
        if not _NAME.match(name):
            raise InputError(
                f"trait file {file} has no \"name\" and its default, '{name}' (from "
                f"{source}), is not a valid trait name",
                "add \"name\": \"...\" (letters, digits, '_', '-' or '.') or rename the file",
            )
        filled["name"] = name
        used.append(f"the name '{name}' (from {source})")
    if "description" not in data:
        filled["description"] = ""
        used.append("an empty description")
    key = file.resolve()
    if key not in _NOTICED and main_process_by_env():  # data-parallel: said by the main one
        _NOTICED.add(key)
        missing = " or ".join(f'"{k}"' for k in ("name", "description") if k not in data)
        logger.warning(
            "trait file %s has no %s (persona_vectors' format): using %s",
            file,
            missing,
            " and ".join(used),
        )
    return filled


def _describe(exc: ValidationError) -> str:
    """One line naming each bad field as a path like ``instruction[2].neg``."""
    parts = []
    for item in exc.errors():
        path = ""
        for loc in item.get("loc", ()):
            path += f"[{loc}]" if isinstance(loc, int) else (f".{loc}" if path else str(loc))
        message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
        if item.get("type") == "extra_forbidden":
            message = "unknown field"
        elif item.get("type") == "missing":
            message = "missing required field"
        parts.append(f"field '{path}': {message}" if path else message)
    return "; ".join(parts)


def shipped_traits_dir() -> Path:
    """Folder of the traits shipped with tracekit (package data, works when pip-installed)."""
    return Path(__file__).resolve().parent / "data" / "traits"


def shipped_trait_names() -> list[str]:
    """Names of the shipped example traits."""
    return sorted(p.stem for p in shipped_traits_dir().glob("*.json"))


def experiment_trait_path(
    experiment: str, trait: str, base_dir: str | Path = "experiments"
) -> Path:
    """``<base_dir>/<experiment>/<trait>/trait_definition.json``."""
    return Path(base_dir) / experiment / trait / TRAIT_FILE


def resolve_trait_path(
    name_or_path: str | Path,
    experiment: str | None = None,
    base_dir: str | Path = "experiments",
) -> Path:
    """Where :func:`load_trait` would read ``name_or_path`` from (see the module docstring)."""
    text = str(name_or_path).strip()
    if not text:
        raise InputError("empty trait name", "give a trait name or a path to a JSON file")
    as_path = Path(text).expanduser()
    if as_path.is_file():
        return as_path
    looks_like_path = text.endswith(".json") or "/" in text or "\\" in text
    if looks_like_path:
        raise InputError(f"trait file not found: {text}", "check the path")
    if experiment is not None:
        saved = experiment_trait_path(experiment, text, base_dir)
        if saved.is_file():
            return saved
    shipped = shipped_traits_dir() / f"{text}.json"
    if shipped.is_file():
        return shipped
    where = f" (no {experiment_trait_path(experiment, text, base_dir)})" if experiment else ""
    raise InputError(
        f"unknown trait '{text}'{where}",
        f"give a path to a trait JSON file or one of the shipped traits: "
        f"{', '.join(shipped_trait_names())}",
    )


def load_trait(
    name_or_path: str | Path,
    experiment: str | None = None,
    base_dir: str | Path = "experiments",
) -> TraitDefinition:
    """Load and validate a trait by path, experiment copy, or shipped name (in that order).

    ``base_dir`` is the folder that holds experiments (``experiments`` by default, relative to
    the working directory). Raises :class:`~tracekit.errors.InputError` naming the bad field.
    """
    return TraitDefinition.from_file(resolve_trait_path(name_or_path, experiment, base_dir))
