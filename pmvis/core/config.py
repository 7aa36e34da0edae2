"""Typed configs: pydantic models loaded from YAML, with CLI overrides, errors naming file and field.

Every knob of a run has its default in exactly one place: the field of its config model.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pmvis.core.errors import PmvisError
from pmvis.core.io import read_text_utf8

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


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (``*name``): nested aliases expand exponentially (a
    "billion laughs" file takes minutes and gigabytes), and config files have no need for them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not allowed in pmvis files; write the value out",
                event.start_mark)
        return super().compose_node(parent, index)


def safe_load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` without aliases; a syntax error is a PmvisError naming ``source``."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise PmvisError(f"{source}: not valid YAML: {e}") from None
    except RecursionError:
        raise PmvisError(f"{source}: not valid YAML: nested too deeply") from None


def parse_yaml_mapping(text: str, source: str, what: str = "a mapping of config keys") -> dict[str, Any]:
    """YAML text that must hold a mapping (empty → {}); errors name ``source``."""
    loaded = safe_load_yaml(text, source)
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
        text = read_text_utf8(path)
        values.update(parse_yaml_mapping(text, str(path)))
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return build_config(cls, values, source=source)


def dump_config(config: BaseModel) -> str:
    """YAML of every knob (defaults included), the form logged with each run."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
