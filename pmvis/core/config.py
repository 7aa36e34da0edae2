"""Typed configs: pydantic models loaded from YAML, with overrides, errors naming file and field.

Every knob of a run has its default in exactly one place: the field of its config model. Every
command and the sweep build a config the same way: plain nested values (a preset, then a YAML
file), then dotted overrides (``--set model.hidden_dim=64``, a sweep trial's knobs) set into them
with :func:`set_dotted` / :func:`apply_dotted`, then pydantic validation (:func:`build_config`).
Override values are YAML without aliases. OmegaConf was tried for this and not used: its merge
silently turns a scalar into a section (``{x: 1}`` + ``x.y=2`` → ``{x: {y: 2}}``) and its dotlist
parser expands YAML aliases (a "billion laughs" value).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

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


def merge_values(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base`` (dicts key by key, anything else replaced)."""
    out = copy.deepcopy(dict(base))
    for k, v in overrides.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_values(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def set_dotted(values: dict[str, Any], key: str, value: Any, *, flag: str = "knob") -> dict[str, Any]:
    """``set_dotted(v, "model.hidden_dim", 64)``: set a nested key in place, creating sections; a
    path through a value that is not a section is a PmvisError naming ``flag`` and the key."""
    parts = key.split(".")
    if not all(parts):
        raise PmvisError(f"{flag} {key}: not a dotted config key")
    node = values
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise PmvisError(f"{flag} {key}: {'.'.join(parts[:i + 1])!r} is a {type(child).__name__}, "
                             "not a section of the config")
        node = child
    node[parts[-1]] = value
    return values


def apply_dotted(base: Mapping[str, Any], knobs: Mapping[str, Any], *, flag: str = "knob") -> dict[str, Any]:
    """A deep copy of ``base`` with every dotted ``knobs`` path set; other keys are kept, also
    inside dict-valued fields (``fuse.source_weights.hqsam`` changes that weight only)."""
    out = copy.deepcopy(dict(base))
    for key, value in knobs.items():
        set_dotted(out, key, copy.deepcopy(value), flag=flag)
    return out


def parse_dotlist(items: Iterable[str], *, flag: str = "--set") -> dict[str, Any]:
    """``["model.hidden_dim=64", "data.short_side=null"]`` → ``{"model": {"hidden_dim": 64},
    "data": {"short_side": None}}``: each value parsed as YAML without aliases; errors name ``flag``."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise PmvisError(f"{flag} {item!r}: expected KEY=VALUE")
        value = safe_load_yaml(raw, f"{flag} {item!r}") if raw.strip() else None
        set_dotted(values, key, value, flag=flag)
    return values


def read_config_values(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of config keys in a YAML file (empty file → {}); errors name the file."""
    return parse_yaml_mapping(read_text_utf8(path), str(path))


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


def effective_config_path(out: str | os.PathLike) -> Path:
    """Where a command records the effective config of an output: OUT with the suffix .config.yaml."""
    return Path(out).with_suffix(".config.yaml")


def dump_config(config: BaseModel) -> str:
    """YAML of every knob (defaults included), the form logged with each run."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
