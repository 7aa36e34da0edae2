"""Knobs of a search space: a dotted path into a config root (``fuse.*``, ``filter.*``, ``loss.*``) checked
against the pydantic model it walks, and the distribution it is drawn from.
"""

from __future__ import annotations

import copy
import importlib
import math
import random
import types
import typing
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Union

from pydantic import BaseModel
from ray import tune

from pmvis.core.config import build_config
from pmvis.core.errors import PmvisError

# Knob root -> the pydantic model its paths walk: a class, or "module:Class" imported on first
# use (LossConfig's module pulls in torch). Extend it for new trial sections, e.g.
# ``KNOB_ROOTS["train"] = TrainConfig``. A root model must build from its defaults (``Model()``)
# for the value checks; if it cannot, only the knob paths are checked.
KNOB_ROOTS: dict[str, type[BaseModel] | str] = {
    "fuse": "pmvis.models.fusion:FuseConfig",
    "filter": "pmvis.platform.pseudo.filters:FilterConfig",
    "loss": "pmvis.models.vis.config:LossConfig",
}


DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid", "value")


def knob_root_model(root: str) -> type[BaseModel]:
    """The pydantic model of knob root ``root`` (imports a lazy ``"module:Class"`` entry)."""
    try:
        entry = KNOB_ROOTS[root]
    except KeyError:
        raise PmvisError(f"unknown knob root {root!r} (known: {', '.join(sorted(KNOB_ROOTS))})") from None
    if isinstance(entry, str):
        module_name, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module_name), attr)
        KNOB_ROOTS[root] = entry
    if not (isinstance(entry, type) and issubclass(entry, BaseModel)):
        raise PmvisError(f"KNOB_ROOTS[{root!r}] is not a pydantic model class: {entry!r}")
    return entry


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated[...]`` and ``Optional``/``X | None`` (when one type is left)."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _type_name(t: Any) -> str:
    return t.__name__ if isinstance(t, type) else str(t).replace("typing.", "")


def check_knob_path(path: str) -> tuple[str, type[BaseModel]]:
    """Check that ``path`` names a field of a :data:`KNOB_ROOTS` model; return (root, model).

    Raises PmvisError saying which segment is wrong and what the model offers there.
    """
    if not isinstance(path, str) or not path:
        raise PmvisError(f"a knob path must be a non-empty string, got {path!r}")
    segments = path.split(".")
    if any(not s for s in segments):
        raise PmvisError(f"unknown knob {path!r}: empty segment in the dotted path")
    if len(segments) < 2:
        raise PmvisError(f"unknown knob {path!r}: a knob is '<root>.<field>[...]' with root one of "
                         f"{', '.join(sorted(KNOB_ROOTS))}")
    root = segments[0]
    if root not in KNOB_ROOTS:
        raise PmvisError(f"unknown knob {path!r}: unknown root {root!r} (known: {', '.join(sorted(KNOB_ROOTS))})")
    model = knob_root_model(root)
    current: Any = model
    walked = root
    for seg in segments[1:]:
        if _is_model(current):
            fields = current.model_fields
            if seg not in fields:
                raise PmvisError(f"unknown knob {path!r}: {current.__name__} ({walked}) has no field {seg!r} "
                                 f"(fields: {', '.join(fields)})")
            current = _unwrap(fields[seg].annotation)
        elif typing.get_origin(current) in (dict, AbcMapping) or current in (dict,):
            args = typing.get_args(current)
            current = _unwrap(args[1]) if len(args) == 2 else Any
        else:
            raise PmvisError(f"unknown knob {path!r}: {walked!r} is a {_type_name(current)} field, "
                             f"it has no sub-knob {seg!r}")
        walked = f"{walked}.{seg}"
    return root, model


def base_config(roots: Iterable[str] | None = None) -> dict[str, Any]:
    """``{root: Model().model_dump()}`` for each root (default: every :data:`KNOB_ROOTS` root):
    the full defaults to apply knobs onto."""
    out: dict[str, Any] = {}
    for root in roots if roots is not None else list(KNOB_ROOTS):
        out[root] = knob_root_model(root)().model_dump(mode="json")
    return out


def build_roots(config: Mapping[str, Any], roots: Iterable[str] | None = None, *,
                source: str = "trial config") -> dict[str, BaseModel]:
    """Validate the given root sections of a nested config dict into their models."""

    out: dict[str, BaseModel] = {}
    for root in roots if roots is not None else [r for r in config if r in KNOB_ROOTS]:
        out[root] = build_config(knob_root_model(root), config.get(root) or {}, source=f"{source}: {root}")
    return out


def flat_get(config: Mapping[str, Any], path: str) -> Any:
    node: Any = config
    for seg in path.split("."):
        if not isinstance(node, Mapping) or seg not in node:
            raise KeyError(path)
        node = node[seg]
    return node


def as_rng(rng: Any) -> random.Random:
    """A ``random.Random`` from a seed, a ``random.Random``, a numpy Generator or None."""
    if isinstance(rng, random.Random):
        return rng
    if rng is None or isinstance(rng, int):
        return random.Random(rng)
    integers = getattr(rng, "integers", None)  # numpy.random.Generator
    if integers is not None:
        return random.Random(int(integers(0, 2**63 - 1)))
    raise TypeError(f"rng must be a seed, random.Random or numpy Generator, got {type(rng).__name__}")


@dataclass(frozen=True)
class Knob:
    """One knob: its dotted path, distribution kind and arguments (a (low, high) pair or values)."""

    path: str
    kind: str
    args: Any

    def to_tune(self) -> Any:
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "randint":
            return tune.randint(*self.args)
        if self.kind == "choice":
            return tune.choice(copy.deepcopy(list(self.args)))
        if self.kind == "grid":
            return tune.grid_search(copy.deepcopy(list(self.args)))
        return copy.deepcopy(self.args)

    def draw(self, rng: random.Random) -> Any:
        if self.kind == "uniform":
            return float(rng.uniform(*self.args))
        if self.kind == "loguniform":
            low, high = self.args
            return float(math.exp(rng.uniform(math.log(low), math.log(high))))
        if self.kind == "randint":
            return int(rng.randrange(*self.args))
        if self.kind in ("choice", "grid"):
            return copy.deepcopy(self.args[rng.randrange(len(self.args))])
        return copy.deepcopy(self.args)

    def candidates(self) -> list[Any]:
        """The values checked at load: every listed value, or a range's ends and middle."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        if self.kind == "value":
            return [self.args]
        low, high = self.args
        if self.kind == "randint":
            return sorted({low, (low + high - 1) // 2, high - 1})
        if self.kind == "loguniform":
            return [float(low), float(math.sqrt(low * high)), float(high)]
        return [float(low), (low + high) / 2.0, float(high)]

    def describe(self) -> str:
        if self.kind == "value":
            return f"= {self.args!r}"
        if self.kind in ("choice", "grid"):
            return f"{self.kind} {list(self.args)!r}"
        low, high = self.args
        return f"{self.kind} [{low}, {high})"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_knob(path: str, spec: Any, source: str) -> Knob:
    """One YAML entry → :class:`Knob`; errors name ``source`` and the knob."""
    where = f"{source}: {path}"
    if not isinstance(spec, dict):
        return Knob(path, "value", spec)
    if len(spec) != 1:
        raise PmvisError(f"{where}: a distribution is a mapping with exactly one key "
                         f"({', '.join(DISTRIBUTIONS)}), got {sorted(map(str, spec)) or 'an empty mapping'}")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise PmvisError(f"{where}: unknown distribution {kind!r} (known: {', '.join(DISTRIBUTIONS)})")
    if kind == "value":
        return Knob(path, kind, args)
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise PmvisError(f"{where}: {kind} needs a non-empty list of values, got {args!r}")
        return Knob(path, kind, tuple(args))
    if not isinstance(args, list) or len(args) != 2:
        raise PmvisError(f"{where}: {kind} needs [low, high], got {args!r}")
    low, high = args
    if kind == "randint":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
            raise PmvisError(f"{where}: randint bounds must be integers, got {args!r}")
    elif not all(_is_number(v) and math.isfinite(v) for v in (low, high)):
        raise PmvisError(f"{where}: {kind} bounds must be finite numbers, got {args!r}")
    if low >= high:
        raise PmvisError(f"{where}: {kind} needs low < high, got [{low}, {high}]"
                         + (" (randint's high is excluded: [1, 10] draws 1..9)" if kind == "randint" else ""))
    if kind == "loguniform" and low <= 0:
        raise PmvisError(f"{where}: loguniform needs 0 < low < high, got [{low}, {high}]")
    return Knob(path, kind, (low, high))
