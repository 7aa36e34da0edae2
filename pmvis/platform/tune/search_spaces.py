"""Ray Tune search spaces written as small YAML files, checked against the config models.

A space maps **knob paths** to **distributions**::

    # knob path (dotted, into the trial config) -> distribution
    fuse.source_weights.hqsam: {uniform: [0.0, 2.0]}    # float in [low, high)
    loss.tk_weight: {loguniform: [0.01, 1.0]}          # float, log-uniform, 0 < low < high
    loss.tk_k: {randint: [1, 10]}                      # int in [low, high) — high excluded, as Tune
    fuse.mode: {choice: [select, vote]}                # one of the values, at random
    filter.ria_tau: {grid: [0.6, 0.7, 0.8]}            # every value (Tune grid_search)
    loss.tk: true                                      # a fixed value (also {value: ...})
    include: [mask_sources, filters]                   # other spaces, merged first

A knob path starts with a root of :data:`KNOB_ROOTS` (``fuse`` → FuseConfig, ``filter`` →
FilterConfig, ``loss`` → LossConfig) and walks that model's fields; nested models go on
(``filter.fuse.mode``) and a dict-valued field takes any key (``fuse.source_weights.<source>``).
Loading a space checks, naming the file and the knob: the YAML shape, the distribution and its
range, that the path exists in the model, and that the values the distribution can give are
valid for the field — each choice/grid value and each range's ends (randint: ``high - 1``) is
applied to the model defaults and validated (coupled knobs of one model, e.g. ``loss.tk_k``
≤ ``loss.tk_window``², are validated together with sampled values of the others), and a fixed
set of joint samples must build valid configs.

Use: ``space = load_space("tk_loss")``; ``Tuner(trainable, param_space=space.to_tune())``; in the
trial, ``cfg = apply_dotted(base_config(), space.knobs_of(trial_config))`` then
``space.validate(...)`` / ``build_config``. Without Tune, ``space.sample(rng)`` draws the flat
``{knob path: value}`` dict (a grid knob draws one of its values).

``apply_dotted`` sets a key inside a dict-valued field and keeps the field's other keys, so apply
onto the full defaults (:func:`base_config`): a partial dict given to a model *replaces* that
field's default dict whole (e.g. FuseConfig's ``source_weights``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

from pmvis.core.config import apply_dotted, parse_yaml_mapping
from pmvis.core.errors import PmvisError
from pmvis.core.io import read_text_utf8
from pmvis.platform.tune.knobs import (
    Knob,
    as_rng,
    base_config,
    build_roots,
    check_knob_path,
    flat_get,
    knob_root_model,
    parse_knob,
)

INCLUDE_KEY = "include"
PACKAGE = "pmvis.search_spaces"
SPACE_SUFFIX = ".yaml"

# Joint samples every loaded space must turn into valid configs; draws per coupled value check.
_JOINT_SAMPLES = 16
_COUPLED_TRIES = 16
_CHECK_SEED = 0


# ----------------------------------------------------------------------------- knob paths


# ----------------------------------------------------------------------------- applying knobs


# ----------------------------------------------------------------------------- distributions


# ----------------------------------------------------------------------------- search space


@dataclass
class SearchSpace:
    """A parsed, checked search space: ``knobs`` in file order (included spaces first)."""

    name: str
    source: str
    knobs: dict[str, Knob] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.knobs)

    @property
    def roots(self) -> list[str]:
        """The knob roots this space touches, in first-use order."""
        return list(dict.fromkeys(p.split(".", 1)[0] for p in self.knobs))

    @property
    def grid_size(self) -> int:
        """Trials per Tune sample: the product of the grid knobs' lengths (1 without grids)."""
        return math.prod(len(k.args) for k in self.knobs.values() if k.kind == "grid")

    def to_tune(self) -> dict[str, Any]:
        """The nested ``param_space`` for ``Tuner(param_space=...)`` (tune.uniform, tune.choice, ...)."""
        nested: dict[str, Any] = {}
        for path, knob in self.knobs.items():
            node = nested
            *parents, leaf = path.split(".")
            for seg in parents:
                node = node.setdefault(seg, {})
            node[leaf] = knob.to_tune()
        return nested

    def sample(self, rng: Any = None) -> dict[str, Any]:
        """One flat ``{knob path: value}`` draw (a grid knob draws one of its values).

        ``rng``: a seed, ``random.Random`` or ``numpy.random.Generator``."""
        r = as_rng(rng)
        return {path: knob.draw(r) for path, knob in self.knobs.items()}

    def knobs_of(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """This space's flat ``{knob path: value}`` read back from a nested (Tune trial) config."""
        out = {}
        for path in self.knobs:
            try:
                out[path] = flat_get(config, path)
            except KeyError:
                raise PmvisError(f"{self.source}: {path}: missing from the trial config") from None
        return out

    def validate(self, knobs: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, BaseModel]:
        """Apply ``knobs`` to ``base`` (default: :func:`base_config` of the touched roots) and build
        each touched root's model; a bad value raises PmvisError naming this space and the field."""
        roots = list(dict.fromkeys(p.split(".", 1)[0] for p in knobs))
        base = base if base is not None else base_config(roots)
        return build_roots(apply_dotted(base, knobs), roots, source=self.source)

    def describe(self) -> str:
        width = max((len(p) for p in self.knobs), default=0)
        lines = [f"search space {self.name} ({self.source}): {len(self.knobs)} knobs"]
        lines += [f"  {p:<{width}}  {k.describe()}" for p, k in self.knobs.items()]
        return "\n".join(lines)


def list_spaces() -> list[str]:
    """Names of the search spaces shipped in :mod:`pmvis.search_spaces`."""
    return sorted(p.name[: -len(SPACE_SUFFIX)] for p in resources.files(PACKAGE).iterdir()
                  if p.name.endswith(SPACE_SUFFIX) and not p.name.startswith("."))


def _read_space_text(name_or_path: str | Path, relative_to: Path | None) -> tuple[str, str, str]:
    """(name, source label, YAML text): a packaged name first, else a file path."""
    text_name = str(name_or_path)
    if isinstance(name_or_path, str) and "/" not in text_name and not text_name.endswith(SPACE_SUFFIX) \
            and text_name in list_spaces():
        res = resources.files(PACKAGE) / f"{text_name}{SPACE_SUFFIX}"
        return text_name, str(res), res.read_text()
    path = Path(name_or_path)
    if not path.is_absolute() and relative_to is not None and not path.exists():
        path = relative_to / path
    if not path.is_file():
        raise PmvisError(f"no search space {text_name!r}: not a packaged space "
                         f"({', '.join(list_spaces())}) and not a file")
    text = read_text_utf8(path)
    name = path.name[: -len(SPACE_SUFFIX)] if path.name.endswith(SPACE_SUFFIX) else path.name
    return name, str(path), text


def _load_knobs(name_or_path: str | Path, relative_to: Path | None, seen: tuple[str, ...]) -> tuple[str, str, dict[str, Knob]]:
    name, source, text = _read_space_text(name_or_path, relative_to)
    if source in seen:
        raise PmvisError(f"{seen[-1]}: include cycle: {' -> '.join(seen + (source,))}")
    data = parse_yaml_mapping(text, source, "a search space: a mapping of knob paths to distributions")
    here = Path(source).parent if Path(source).is_file() else None
    knobs: dict[str, Knob] = {}
    includes = data.get(INCLUDE_KEY, [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise PmvisError(f"{source}: {INCLUDE_KEY}: expected a list of space names or paths, got {includes!r}")
    for inc in includes:
        knobs.update(_load_knobs(inc, here, seen + (source,))[2])
    for path, spec in data.items():
        if path == INCLUDE_KEY:
            continue
        if not isinstance(path, str):
            raise PmvisError(f"{source}: knob paths must be strings, got {path!r}")
        try:
            check_knob_path(path)
        except PmvisError as e:
            raise PmvisError(f"{source}: {e}") from None
        knobs[path] = parse_knob(path, spec, source)
    return name, source, knobs


def _errors_of(model: type[BaseModel], values: Mapping[str, Any]) -> list[dict[str, Any]]:
    try:
        model.model_validate(dict(values))
    except ValidationError as e:
        return list(e.errors())
    return []


def _format_errors(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors:
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"{loc + ': ' if loc else ''}{e['msg']}")
    return "; ".join(parts)


def _check_values(space: SearchSpace) -> None:
    """Every value a knob can take must be valid for its field; joint samples must validate."""
    rng = random.Random(_CHECK_SEED)
    defaults: dict[str, dict[str, Any] | None] = {}
    for root in space.roots:
        try:
            defaults[root] = knob_root_model(root)().model_dump(mode="json")
        except ValidationError:
            defaults[root] = None  # the model has required fields: paths checked only
    by_root: dict[str, list[Knob]] = {}
    for knob in space.knobs.values():
        by_root.setdefault(knob.path.split(".", 1)[0], []).append(knob)

    for root, knobs in by_root.items():
        if defaults[root] is None:
            continue
        model = knob_root_model(root)
        prefix = len(root) + 1
        for knob in knobs:
            others = [k for k in knobs if k is not knob]
            for value in knob.candidates():
                applied = apply_dotted(defaults[root], {knob.path[prefix:]: value})
                errors = _errors_of(model, applied)
                if not errors:
                    continue
                field_errors = [e for e in errors if e["loc"]]
                if field_errors or not others:
                    raise PmvisError(f"{space.source}: {knob.path}: value {value!r} is invalid for "
                                     f"{model.__name__}: {_format_errors(field_errors or errors)}")
                # A model-level (cross-field) error with other knobs of this model in the space:
                # valid if some draw of the others makes it valid.
                for _ in range(_COUPLED_TRIES):
                    draw = {k.path[prefix:]: k.draw(rng) for k in others}
                    draw[knob.path[prefix:]] = value
                    if not _errors_of(model, apply_dotted(defaults[root], draw)):
                        break
                else:
                    raise PmvisError(f"{space.source}: {knob.path}: value {value!r} is invalid for "
                                     f"{model.__name__} (also with {_COUPLED_TRIES} draws of "
                                     f"{', '.join(k.path for k in others)}): {_format_errors(errors)}")
        for _ in range(_JOINT_SAMPLES):
            draw = {k.path[prefix:]: k.draw(rng) for k in knobs}
            errors = _errors_of(model, apply_dotted(defaults[root], draw))
            if errors:
                shown = ", ".join(f"{root}.{p}={v!r}" for p, v in draw.items())
                raise PmvisError(f"{space.source}: the knobs {', '.join(k.path for k in knobs)} can draw an "
                                 f"invalid {model.__name__} together ({shown}): {_format_errors(errors)}")


def load_space(name_or_path: str | Path) -> SearchSpace:
    """A packaged space by name (see :func:`list_spaces`), else a YAML file; fully checked."""
    name, source, knobs = _load_knobs(name_or_path, None, ())
    space = SearchSpace(name=name, source=source, knobs=knobs)
    _check_values(space)
    return space
