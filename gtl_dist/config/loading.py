"""Building a :class:`RunConfig` from YAML layers and ``--set key=value`` overrides, validated as it is
built: unknown keys are refused naming the key and the file, values are type-checked."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from gtl_dist.config.rules import ConfigError
from gtl_dist.config.run import RunConfig
from gtl_dist.log import get_logger

log = get_logger("config")  # the name the config has always logged under


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it; raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of "
                          f"{', '.join(_type_name(a) for a in inner)}")
    if origin is Literal:  # a choice: the value must be one of the options, of the same type
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = args
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = args
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        # YAML 1.1 reads "3e-4" (no dot) as a string: accept numeric strings for float fields.
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # nan, inf: no setting means either
            raise ConfigError(f"{where}: {value!r} is not a finite number; give a plain number")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            prefix = f"{where}." if where else ""
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}; valid keys here: {', '.join(names)}")
        factory = fields[key].default_factory
        if isinstance(value, dict) and factory is not dataclasses.MISSING:
            default = factory()
            # A section overlays its own defaults: `train.vanilla: {steps: 20}` keeps vanilla's
            # EMA and best-checkpoint selection, `models.ratio: {blocks: 2}` keeps hidden 96.
            if dataclasses.is_dataclass(default):
                value = _merge(dataclasses.asdict(default), value)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def example_override() -> str:
    """A ``--set`` for error hints, read off the default config so it always names a real key: the
    first setting of the models section with its default (``models.denoiser.hidden=512``)."""
    keys, node = ["models"], RunConfig().models
    while dataclasses.is_dataclass(node):
        keys.append(dataclasses.fields(node)[0].name)
        node = getattr(node, keys[-1])
    return f"{'.'.join(keys)}={node}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.denoiser.steps=10"`` -> (["train", "denoiser", "steps"], 10). Values are YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set {example_override()}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key must be a dotted path of config sections and a "
                          f"setting, e.g. --set {example_override()}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def _nest(keys: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for k in reversed(keys):
        out = {k: out}
    return out


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _known_only(cls: type, data: dict[str, Any], where: str, dropped: list[str]) -> dict[str, Any]:
    """``data`` without the keys ``cls`` does not have (recursively); their paths go to ``dropped``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            dropped.append(path)
            continue
        kind = hints[key]
        if isinstance(value, dict) and dataclasses.is_dataclass(kind):
            value = _known_only(kind, value, path, dropped)
        out[key] = value
    return out


def config_from_dict(data: dict[str, Any], source: str = "<dict>", strict: bool = True) -> RunConfig:
    """Build and validate a config from a mapping. ``strict=False`` is for configs this package
    wrote earlier (export metadata, a run directory's config.yaml): keys a later version removed
    are dropped with a warning instead of refused, so old models and runs stay readable."""
    if not strict:
        dropped: list[str] = []
        data = _known_only(RunConfig, data, "", dropped)
        if dropped:
            log.warning("%s: ignoring key(s) this version of gtl_dist no longer has: %s",
                        source, ", ".join(dropped))
    try:
        cfg = _build(RunConfig, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    validate(cfg, source)
    return cfg


def load_config(paths: list[str | Path] | str | Path = (), overrides: list[str] = ()) -> RunConfig:
    """Load YAML files in order (later wins), apply ``key=value`` overrides, validate.

    Each file is checked on its own first, so an unknown key is reported against the file
    that contains it; overrides are reported as ``--set``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    merged: dict[str, Any] = {}
    sources = []
    for p in paths:
        p = Path(p)
        data = _load_yaml(p)
        try:
            _build(RunConfig, data, "")  # validates keys and types against this file alone
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None
        merged = _merge(merged, data)
        sources.append(str(p))
    for text in overrides:
        keys, value = parse_override(text)
        over = _nest(keys, value)
        try:
            _build(RunConfig, _merge(merged, over), "")
        except ConfigError as exc:
            raise ConfigError(f"--set {text}: {exc}") from None
        merged = _merge(merged, over)
    return config_from_dict(merged, " + ".join(sources + ["--set"] * bool(overrides)) or "<defaults>")


def validate(cfg: RunConfig, source: str = "<config>") -> None:
    """Every section's ``check``, innermost first, then the config's own, then every entry of a
    stage's ``model_grid`` applied to its model section; a broken rule is reported as
    ``<source>: <section.key>: <what is wrong and the fix>``."""
    try:
        check_section(cfg, "")
        for stage in (f.name for f in dataclasses.fields(cfg.train)):
            for index in range(len(getattr(cfg.train, stage).model_grid or [])):
                with_model_point(cfg, stage, index)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def with_model_point(cfg: RunConfig, stage: str, index: int) -> RunConfig:
    """``cfg`` with entry ``index`` of ``train.<stage>.model_grid`` applied to the stage's model
    section (the ``models.*`` section among its inputs, gtl_dist/stages.py), type-checked and
    validated like a section of a config file."""
    from gtl_dist.stages import STAGES
    where = f"train.{stage}.model_grid[{index}]"
    sections = [p for p in STAGES[stage].sections if p.startswith("models.")] if stage in STAGES else []
    if len(sections) != 1:
        raise ConfigError(f"{where}: stage {stage} has no model section of its own to vary; "
                          f"set train.{stage}.model_grid=null")
    name = sections[0].split(".")[1]
    current = getattr(cfg.models, name)
    point = _build(type(current), {**dataclasses.asdict(current), **getattr(cfg.train, stage).model_grid[index]},
                   f"{where} (models.{name})")
    check_section(point, f"{where}.")
    return dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, **{name: point}))


def check_section(section: Any, where: str) -> None:
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            check_section(value, f"{where}{f.name}.")
    if hasattr(section, "check"):
        try:
            section.check()
        except ConfigError as exc:
            raise ConfigError(f"{where}{exc}") from None
