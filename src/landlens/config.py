"""Run configs: typed sections read from a YAML or JSON file, then ``section.key=value`` overrides.

The classification config (:mod:`landlens.training.config`) and the matching config
(:mod:`landlens.matching.config`) are :class:`RunConfig` subclasses: one pydantic model of
:class:`Section` models (every key typed, unknown keys refused) and an ``out`` directory. This
module holds what they share: reading the file, reading an override's text by the type of its
key, validation, and turning a validation error into one :class:`~landlens.errors.ConfigError`
line that names the key, the value and what was expected.

How values are read:

- A file is read as YAML (``.json``: JSON) and its values must have their key's type: a text key
  refuses a number (``backbone: 100000``; quote it), an integer key refuses ``2.5``, a true/false
  key refuses ``"yes"``. Three reliefs keep hand-written files working: an integer or a number
  written as text in exponent form is accepted for a number key (PyYAML, a YAML 1.1 reader, reads
  ``lr: 1e-3`` as the text ``"1e-3"``), a whole float for an integer key (``epochs: 10.0``) and a
  tuple for a list key (from Python).
- An override's text is read by the type of its key. A text key (text, a choice, optional text)
  keeps the text verbatim: ``model.backbone=1e5`` is the name ``"1e5"``; ``null`` or ``~`` give
  null where the key may be null, and a YAML list or mapping (``data.split=[1,2]``) is refused.
  Every other key reads the text as YAML with YAML 1.2 numbers: ``optim.lr=3e-4`` is ``0.0003``,
  ``ae.widths=[32,64,128]`` a list, ``trainer.patience=null`` null, ``data.verify=maybe`` refused.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo

from landlens.errors import ConfigError, first_line

NULL_TEXTS = ("null", "Null", "NULL", "~")
"""Override texts that mean null for a text key that may be null."""

_NUMBER = re.compile(r"[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][-+]?\d+)?")
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$")


class _OverrideLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads YAML 1.2 exponent numbers (``3e-4``, ``1E5``) as floats."""


_OverrideLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))

C = TypeVar("C", bound="RunConfig")
_SECTION_KEYS: dict[type, str] = {}  # Section class -> its key in the RunConfig it belongs to


# ============================================================================ types

def _strip(tp: Any) -> Any:
    """``Annotated[X, ...]`` -> ``X``."""
    while get_origin(tp) is typing.Annotated:
        tp = get_args(tp)[0]
    return tp


def _members(tp: Any) -> tuple[list[Any], bool]:
    """The non-null members of a (possibly optional) union, and whether null is allowed."""
    tp = _strip(tp)
    members = [_strip(a) for a in get_args(tp)] if get_origin(tp) in (typing.Union, types.UnionType) else [tp]
    nullable = type(None) in members
    return [m for m in members if m is not type(None)], nullable


def _is_choice(tp: Any) -> bool:
    return get_origin(tp) is Literal and all(isinstance(a, str) for a in get_args(tp))


def is_text(annotation: Any) -> bool:
    """Whether a key holds text (text, a choice of words, or either or null): its override text is kept verbatim."""
    members, _ = _members(annotation)
    return bool(members) and all(m is str or _is_choice(m) for m in members)


def choices(annotation: Any) -> tuple[str, ...]:
    """The allowed words of a choice key (``()`` for other keys)."""
    members, _ = _members(annotation)
    return tuple(a for m in members if get_origin(m) is Literal for a in get_args(m))


def _kind(annotation: Any) -> type | None:
    """``float``, ``int`` or ``list`` for a key of that (optional) type, else None."""
    members, _ = _members(annotation)
    if len(members) != 1:
        return None
    m = members[0]
    if m is float or m is int:
        return m
    return list if get_origin(m) is list else None


def _range(metadata: Sequence[Any]) -> str:
    low = high = ""
    for c in metadata:
        if isinstance(c, annotated_types.Ge):
            low = f"[{c.ge}"
        elif isinstance(c, annotated_types.Gt):
            low = f"({c.gt}"
        elif isinstance(c, annotated_types.Le):
            high = f"{c.le}]"
        elif isinstance(c, annotated_types.Lt):
            high = f"{c.lt})"
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {low[1:]}"
    if high:
        return f" {'<=' if high[-1] == ']' else '<'} {high[:-1]}"
    return ""


def _describe_one(tp: Any, metadata: Sequence[Any]) -> str:
    if _is_choice(tp):
        return "one of " + ", ".join(get_args(tp))
    if tp is str:
        return "text"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer" + _range(metadata)
    if tp is float:
        return "a number" + _range(metadata)
    if get_origin(tp) is list:
        (item,) = get_args(tp) or (Any,)
        size = {getattr(c, "min_length", None) for c in metadata} | {getattr(c, "max_length", None) for c in metadata}
        size.discard(None)
        n = f"{size.pop()} " if len(size) == 1 else ""
        words = {int: "integers", float: "numbers", str: "texts"}.get(_strip(item), "values")
        return f"a list of {n}{words}"
    return getattr(tp, "__name__", str(tp))


def describe(field: FieldInfo) -> str:
    """What a key accepts, in words: ``an integer >= 1 or null``, ``one of sgd, adam``..."""
    members, nullable = _members(field.annotation)
    parts = [_describe_one(m, field.metadata) for m in members]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    return text + (" or null" if nullable else "")


def int_as_text(value: Any) -> Any:
    """A before-validator for choice keys whose words are numbers (``precision: 32`` in a file)."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# ============================================================================ models

class Section(BaseModel):
    """One section of a run config: typed keys with defaults, unknown keys refused.

    Assignments are validated too, and a bad one raises :class:`ConfigError` (one line).
    """

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _relax(cls, value: Any, info: ValidationInfo) -> Any:
        """The reliefs of the module docstring: numbers as exponent text, whole floats, tuples."""
        kind = _kind(cls.model_fields[info.field_name].annotation) if info.field_name else None
        if kind is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value.strip().replace("_", ""))
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if kind is list and isinstance(value, tuple):
            return list(value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise _one_line(type(self), exc, {}, prefix=_SECTION_KEYS.get(type(self), "")) from None


class RunConfig(Section):
    """A whole run config: :class:`Section` fields plus plain keys (``out``).

    Subclasses add the sections and may override :meth:`validate` with the checks that span
    several keys; :meth:`load` is the one door from a file and overrides to a checked config.
    """

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        for name, section in cls.sections().items():
            _SECTION_KEYS[section] = name

    @classmethod
    def sections(cls) -> dict[str, type[Section]]:
        """Section name -> its model."""
        out = {}
        for name, f in cls.model_fields.items():
            tp = _strip(f.annotation)
            if isinstance(tp, type) and issubclass(tp, Section):
                out[name] = tp
        return out

    @classmethod
    def all_keys(cls) -> list[str]:
        """Every key: ``section.key`` for section keys, the plain name for the others (``out``)."""
        sections = cls.sections()
        return [f"{name}.{k}" if name in sections else name
                for name in cls.model_fields for k in (sections[name].model_fields if name in sections else [name])]

    def to_dict(self) -> dict[str, Any]:
        """Nested dicts of JSON values (what a run directory's ``config.json`` holds)."""
        return self.model_dump(mode="json")

    def validate(self: C) -> C:  # type: ignore[override]
        """Checks that span several keys; each key's own type and range are checked on construction."""
        return self

    # ------------------------------------------------------------------ keys and overrides

    @classmethod
    def key_field(cls, key: str) -> tuple[type[Section], str, FieldInfo]:
        """The model holding ``key``, the key's name in it and its field; unknown keys raise ConfigError."""
        sections = cls.sections()
        parts = key.split(".")
        if len(parts) == 1:
            if key in sections:
                raise ConfigError(f"{key!r} is a section: give one of its keys, section.key (e.g. {cls.all_keys()[0]})")
            if key in cls.model_fields:
                return cls, key, cls.model_fields[key]
            raise ConfigError(_unknown(cls, [], key))
        if len(parts) > 2:
            raise ConfigError(f"{key!r}: a key is section.key (e.g. {cls.all_keys()[0]})")
        section, name = parts
        if section not in sections:
            if section in cls.model_fields:
                raise ConfigError(f"{section!r} is not a section: set it as {section}=VALUE")
            raise ConfigError(_unknown(cls, [], section, then=name))
        model = sections[section]
        if name not in model.model_fields:
            raise ConfigError(_unknown(cls, [section], name))
        return model, name, model.model_fields[name]

    @classmethod
    def parse_override(cls, text: str) -> tuple[str, Any]:
        """``'optim.lr=3e-4'`` -> ``('optim.lr', 0.0003)``: the text read by the key's type, then checked.

        Raises:
            ConfigError: not ``key=value``, an unknown key, or a value the key does not accept
                (one line naming the key, the value and what the key accepts).
        """
        if "=" not in text:
            raise ConfigError(f"override {text!r} must look like section.key=value")
        key, _, value_text = text.partition("=")
        key = key.strip()
        model, name, field = cls.key_field(key)
        value = _read_text(key, value_text, field)
        try:
            checked = model.model_validate({name: value})
        except ValidationError as exc:
            raise _one_line(model, exc, {}, prefix=_SECTION_KEYS.get(model, ""), shown=value_text) from None
        return key, getattr(checked, name)

    @classmethod
    def with_values(cls, raw: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of nested dicts ``raw`` with ``{'section.key': value}`` set (keys checked, values not)."""
        out = copy.deepcopy(dict(raw))
        for key, value in values.items():
            cls.key_field(key)
            section, _, name = key.rpartition(".")
            if not section:
                out[name] = value
                continue
            sect = out.get(section)
            if sect is None:
                sect = out[section] = {}
            if not isinstance(sect, dict):
                raise ConfigError(f"section {section!r} must be a mapping of keys, got {sect!r}")
            sect[name] = value
        return out

    @classmethod
    def with_overrides(cls, raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
        """A copy of nested dicts ``raw`` with ``section.key=value`` overrides applied (each read and checked)."""
        values: dict[str, Any] = {}
        for text in overrides:
            key, value = cls.parse_override(text)
            values.pop(key, None)  # a later override of the same key wins, in its place
            values[key] = value
        return cls.with_values(raw, values)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_dict(cls: type[C], raw: Mapping[str, Any], source: str = "config") -> C:
        """Build from nested dicts (a file's, a run's ``config.json``): types and ranges checked, not
        :meth:`validate`. Errors name ``source``."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
        sections = cls.sections()
        data = {k: ({} if v is None and k in sections else v) for k, v in raw.items()}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _one_line(cls, exc, data, source=source) from None

    @classmethod
    def load(cls: type[C], path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (), *,
             base: Mapping[str, Any] | None = None) -> C:
        """Read a config file (or start from the defaults), apply overrides, build and :meth:`validate`.

        ``base`` (nested dicts) goes under the file and the overrides.
        """
        raw = read_config_file(path) if path is not None else {}
        if base:
            raw = merge_config_dicts(base, raw)
        raw = cls.with_overrides(raw, overrides)
        return cls.from_dict(raw, str(path) if path is not None else "config").validate()


# ============================================================================ reading

def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON config file into nested dicts."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text()
        raw = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {p}: {first_line(exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {p} must be a mapping of sections")
    return raw


def merge_config_dicts(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section (a copy; ``top``'s values win)."""
    out = copy.deepcopy(dict(base))
    for section, values in top.items():
        if isinstance(values, Mapping) and isinstance(out.get(section), dict):
            out[section].update(copy.deepcopy(dict(values)))
        else:
            out[section] = copy.deepcopy(values)
    return out


def _read_text(key: str, text: str, field: FieldInfo) -> Any:
    """An override's text as a value of the key's type (see the module docstring)."""
    if is_text(field.annotation):
        _, nullable = _members(field.annotation)
        if nullable and text.strip() in NULL_TEXTS:
            return None
        if text.lstrip().startswith(("[", "{")):
            try:
                parsed = yaml.load(text, Loader=_OverrideLoader)
            except yaml.YAMLError:
                parsed = text
            if isinstance(parsed, (list, dict)):
                what = "a list" if isinstance(parsed, list) else "a mapping"
                raise ConfigError(f"{key}={text}: expected {describe(field)}, got {what}")
        return text
    if not text.strip():
        return text
    try:
        return yaml.load(text, Loader=_OverrideLoader)
    except yaml.YAMLError:
        return text  # refused by the key's type, with the text shown


# ============================================================================ errors

def _unknown(root: type[RunConfig], path: list[str], name: str, then: str | None = None) -> str:
    """``unknown key optim.lrr: did you mean optim.lr? (optim keys: ...)``; ``then``: the key an unknown
    section was given with (``model.backbone`` in a matching config: did you mean features.backbone?)."""
    sections = root.sections()
    if not path:
        names = list(root.model_fields)
        near = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        elsewhere = [k for k in root.all_keys() if k.endswith("." + (then or name))]
        hint = f": did you mean {near[0]!r}?" if near else f": did you mean {elsewhere[0]}?" if elsewhere else ""
        return f"unknown section {name!r}{hint} (sections: {', '.join(names)})"
    section = path[0]
    names = list(sections[section].model_fields)
    near = [f"{section}.{n}" for n in difflib.get_close_matches(name, names, n=1, cutoff=0.6)]
    near = near or [k for k in root.all_keys() if k.endswith("." + name)]
    hint = f": did you mean {near[0]}?" if near else ""
    return f"unknown key {section}.{name}{hint} ({section} keys: {', '.join(names)})"


def _one_line(model: type[BaseModel], exc: ValidationError, raw: Mapping[str, Any], *, source: str | None = None,
              prefix: str = "", shown: str | None = None) -> ConfigError:
    """The first error of a validation as one line naming the key, the value and what is expected."""
    err = exc.errors(include_url=False)[0]
    loc = list(err["loc"])
    path: list[str] = []
    current: type[BaseModel] | None = model
    field: FieldInfo | None = None
    value: Any = raw
    for part in loc:  # walk the models; union branch tags and list indices stop the walk
        if current is None or not isinstance(part, str) or part not in current.model_fields:
            break
        path.append(part)
        field = current.model_fields[part]
        value = value.get(part) if isinstance(value, Mapping) else None
        tp = _strip(field.annotation)
        current = tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None
    if shown is None:
        shown = repr(value if path and value is not None else err.get("input"))
    lead = f"{source}: " if source else ""
    full = ".".join([prefix, *path] if prefix else path)
    root = model if isinstance(model, type) and issubclass(model, RunConfig) else None
    kind = err["type"]
    if kind == "extra_forbidden":
        name = str(loc[len(path)])
        if root is not None:
            return ConfigError(lead + _unknown(root, path, name))
        section = prefix or model.__name__
        names = ", ".join(model.model_fields)
        near = difflib.get_close_matches(name, list(model.model_fields), n=1, cutoff=0.6)
        hint = f": did you mean {section}.{near[0]}?" if near else ""
        return ConfigError(f"{lead}unknown key {section}.{name}{hint} ({section} keys: {names})")
    if field is None:
        return ConfigError(f"{lead}{first_line(exc)}")
    tp = _strip(field.annotation)
    if isinstance(tp, type) and issubclass(tp, BaseModel) and current is not None and len(path) == len(loc):
        return ConfigError(f"{lead}section {full!r} must be a mapping of keys, got {shown}")
    if choices(field.annotation) and is_text(field.annotation) and str not in _members(field.annotation)[0]:
        _, nullable = _members(field.annotation)
        return ConfigError(f"{lead}{full}={shown} is not one of {', '.join(choices(field.annotation))}"
                           + (" or null" if nullable else ""))
    if kind == "value_error":
        return ConfigError(f"{lead}{full}={shown}: {first_line(err['ctx']['error'])}")
    hint = ""
    if is_text(field.annotation) and isinstance(value, (int, float, bool)) and not isinstance(value, str):
        hint = " (write it in quotes to mean the text)"
    return ConfigError(f"{lead}{full}={shown}: expected {describe(field)}{hint}")


__all__ = [
    "NULL_TEXTS",
    "RunConfig",
    "Section",
    "choices",
    "describe",
    "int_as_text",
    "is_text",
    "merge_config_dicts",
    "read_config_file",
]
