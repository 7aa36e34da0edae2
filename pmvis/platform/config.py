"""Typed configs: pydantic models loaded from YAML, with CLI overrides, errors naming file and field.

Every knob of a run has its default in exactly one place: the field of its config model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pmvis.platform.errors import PmvisError

C = TypeVar("C", bound="StrictConfig")


class StrictConfig(BaseModel):
    """Base for all configs: unknown keys are errors (a typo must not silently use a default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"{source}: {where}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def build_config(cls: type[C], values: Mapping[str, Any], *, source: str = "config") -> C:
    """Validate ``values`` into ``cls``; a bad value raises PmvisError naming ``source`` and the field."""
    try:
        return cls.model_validate(dict(values))
    except ValidationError as e:
        raise PmvisError(_format_validation_error(source, e)) from None


def parse_yaml_mapping(text: str, source: str, what: str = "a mapping of config keys") -> dict[str, Any]:
    """YAML text that must hold a mapping (empty → {}); errors name ``source``."""
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PmvisError(f"{source}: not valid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise PmvisError(f"{source}: expected {what}, got {type(loaded).__name__}")
    return loaded


def load_config(
    cls: type[C],
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> C:
    """Load ``cls`` from a YAML file (optional) and apply ``overrides`` (None values are skipped)."""
    values: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise PmvisError(f"{path}: cannot read config: {e.strerror}") from None
        values.update(parse_yaml_mapping(text, str(path)))
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return build_config(cls, values, source=source)


def dump_config(config: BaseModel) -> str:
    """YAML of every knob (defaults included), the form logged with each run."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
