"""Typed configs: frozen dataclass trees loaded from YAML plus `--set key=value` overrides.

Every value is checked at load against its field's type (a `Literal` lists the choices) and, for numbers, the range
its `option(...)` declares (`minimum=`, `maximum=`, `exclusive_minimum=`, `exclusive_maximum=`); a key given twice
in a YAML mapping is an error. `describe` (the commands' `--help`) lists types, ranges, choices and defaults.
"""

import argparse
import copy
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import yaml

from fusion_jax.errors import ConfigError  # noqa: F401  (re-exported: callers import it from here)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` as a float (YAML 1.1 alone reads it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _check_unique_keys(node: yaml.Node, source: str, path: str = "", seen: set[int] | None = None) -> None:
    """ConfigError for a key given twice in one mapping (YAML itself keeps the last one without a word)."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, source, f"{path}[{i}]", seen)
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[tuple[str, str], yaml.Node] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: explicit keys may override merged ones
            _check_unique_keys(value_node, source, path, seen)
            continue
        key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
        dotted = f"{path}.{key}" if path else key
        if isinstance(key_node, yaml.ScalarNode):
            earlier = first.setdefault((key_node.tag, key_node.value), key_node)
            if earlier is not key_node:
                a, b = earlier.start_mark, key_node.start_mark
                where = (f"line {a.line + 1} and line {b.line + 1}" if a.line != b.line
                         else f"line {a.line + 1}, columns {a.column + 1} and {b.column + 1}")
                raise ConfigError(f"{source}: key {dotted!r} is given twice ({where}); YAML would silently keep only "
                                  "the second: merge the two into one")
        _check_unique_keys(value_node, source, dotted, seen)


def _load_yaml(text: str, source: str, path: str = "") -> Any:
    """Parse YAML text with `_Loader`, refusing duplicate keys; `source` names the text in messages and `path` is the
    dotted key the text is the value of."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node, source, path)
        return loader.construct_document(node)
    finally:
        loader.dispose()


class ConfigData(dict):
    """A plain config dict that remembers which dotted keys were set by `--set` (key -> raw value)."""

    def __init__(self, *args: Any, set_by: Mapping[str, str] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.set_by = dict(set_by)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric config field (of each item of a tuple field); NaN and ±inf are outside it."""

    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None

    def __post_init__(self) -> None:
        if self.minimum is not None and self.exclusive_minimum is not None:
            raise TypeError("give minimum or exclusive_minimum, not both")
        if self.maximum is not None and self.exclusive_maximum is not None:
            raise TypeError("give maximum or exclusive_maximum, not both")

    def __bool__(self) -> bool:
        return any(b is not None for b in dataclasses.astuple(self))

    def contains(self, x: float) -> bool:
        return (math.isfinite(x)
                and (self.minimum is None or x >= self.minimum)
                and (self.exclusive_minimum is None or x > self.exclusive_minimum)
                and (self.maximum is None or x <= self.maximum)
                and (self.exclusive_maximum is None or x < self.exclusive_maximum))

    def __str__(self) -> str:
        """``>= 1``, ``> 0``, ``<= 255``, ``in [0, 1)``."""
        low = (f"[{self.minimum!r}" if self.minimum is not None
               else f"({self.exclusive_minimum!r}" if self.exclusive_minimum is not None else None)
        high = (f"{self.maximum!r}]" if self.maximum is not None
                else f"{self.exclusive_maximum!r})" if self.exclusive_maximum is not None else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        return ("<= " if high[-1] == "]" else "< ") + high[:-1]


def _numbers(value: Any, path: str) -> list[tuple[str, float]]:
    """(dotted key, number) for a number or each number of a tuple; bools and None are not numbers here."""
    if isinstance(value, (tuple, list)):
        return [item for i, v in enumerate(value) for item in _numbers(v, f"{path}[{i}]")]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(path, value)]
    return []


def _is_related(key: str, path: str) -> bool:
    """True if one dotted key is the other or an ancestor of it (`a.b` of `a.b[1]`)."""
    key, path = key.replace("[", ".["), path.replace("[", ".[")
    return not path or (key + ".").startswith(path + ".") or (path + ".").startswith(key + ".")


@dataclasses.dataclass
class _Ctx:
    source: str
    set_by: Mapping[str, str]

    def error(self, path: str, msg: str, section: bool = False) -> ConfigError:
        sets = [f"--set {k}={v}" for k, v in self.set_by.items() if _is_related(k, path)]
        # A bad leaf value came wholly from its override; a section check also involves the file.
        where = sets if sets and not section else [self.source, *sets]
        return ConfigError(f"{path + ': ' if path else ''}{msg} (in {', '.join(where)})")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return " | ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " | ".join(map(_type_name, args))
    if origin in (tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def _suggest(word: Any, options: Sequence[Any]) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _convert(tp: Any, value: Any, path: str, ctx: _Ctx) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, ctx)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _convert(option, value, path, ctx)
            except ConfigError:
                if len(options) == 1:
                    raise
        raise ctx.error(path, f"expected {_type_name(tp)}, got {_got(value)}")
    # `--set name=123` means the string "123" when the field is a string.
    wants_str = tp is str or (origin is Literal and all(isinstance(a, str) for a in args))
    if wants_str and not isinstance(value, str) and path in ctx.set_by:
        value = ctx.set_by[path]
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        choices = ", ".join(map(repr, args))
        raise ctx.error(path, f"invalid choice {value!r}; valid choices: {choices}{_suggest(value, args)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ctx.error(path, f"expected a list ({_type_name(tp)}), got {_got(value)}")
        items = list(args[:1]) * len(value) if args[1:] == (Ellipsis,) else list(args)
        if len(items) != len(value):
            raise ctx.error(path, f"expected {len(items)} items ({_type_name(tp)}), got {len(value)}: {value!r}")
        return tuple(_convert(t, v, f"{path}[{i}]", ctx) for i, (t, v) in enumerate(zip(items, value)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ctx.error(path, f"expected a mapping ({_type_name(tp)}), got {_got(value)}")
        for k in value:
            if not isinstance(k, str):
                raise ctx.error(path, f"keys must be strings, got {_got(k)}")
        return {k: _convert(args[1], v, f"{path}.{k}", ctx) for k, v in value.items()}
    if tp in (int, float, bool, str):
        allowed = (int, float) if tp is float else tp  # ints are fine where floats are expected
        # bool subclasses int, so it is checked both ways: True is not an int, 1 is not a bool.
        if isinstance(value, bool) != (tp is bool) or not isinstance(value, allowed):
            hint = " (strings are not converted)" if tp is not str and isinstance(value, str) else ""
            raise ctx.error(path, f"expected {tp.__name__}, got {_got(value)}{hint}")
        return float(value) if tp is float else value
    raise TypeError(f"{path}: unsupported config field type {tp!r}")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _merge(base: dict, given: Mapping) -> dict:
    out = dict(base)
    for k, v in given.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _build(cls: type, data: Any, path: str, ctx: _Ctx) -> Any:
    if not isinstance(data, Mapping):
        raise ctx.error(path, f"expected a mapping for section {cls.__name__}, got {_got(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            valid = f"valid keys here: {', '.join(fields)}{_suggest(key, list(fields))}"
            raise ctx.error(f"{prefix}{key}", f"unknown key; {valid}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            value = data[name]
            default = _default(f)
            # A partly given section keeps the parent's defaults for the rest (a default MeshConfig(fsdp=-1)
            # stays fsdp=-1 under `--set mesh.tensor=2`), and so do partly given mappings such as mesh.rules.
            if isinstance(value, Mapping) and (dataclasses.is_dataclass(default) or isinstance(default, dict)):
                value = _merge(to_dict(default), value)
            kwargs[name] = _convert(hints[name], value, prefix + name, ctx)
            bounds = f.metadata.get("bounds")
            for key, number in _numbers(kwargs[name], prefix + name) if bounds else ():
                if not bounds.contains(number):
                    raise ctx.error(key, f"must be {bounds}, got {number!r}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ctx.error(prefix + name, f"missing required key ({_type_name(hints[name])})", section=True)
    obj = cls(**kwargs)
    if callable(getattr(obj, "validate", None)):
        try:
            obj.validate()
        except ValueError as e:
            raise ctx.error(path, str(e), section=True) from e
    return obj


def from_dict(cls: type, data: Mapping, *, source: str = "<dict>") -> Any:
    """Build and validate the config `cls` from nested plain data; missing keys take defaults."""
    return _build(cls, data, "", _Ctx(source, getattr(data, "set_by", {})))


def to_dict(obj: Any) -> Any:
    """Plain, YAML-serialisable data for a config (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _parse_override(text: str) -> tuple[str, Any, str]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not all(key.split(".")):
        raise ConfigError(f"malformed override {text!r}: expected --set key=value "
                          "(dotted key, YAML value), e.g. --set train.steps=100; --help lists the keys")
    try:
        value = _load_yaml(raw, f"--set {text}", key)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text}: value is not valid YAML ({getattr(e, 'problem', e)})") from e
    if isinstance(value, str):
        try:  # catch float spellings YAML leaves as strings (inf, nan, 1_0.5)
            value = float(value)
        except ValueError:
            pass
    return key, value, raw.strip()


_INDEX = re.compile(r"^([^\[\]]+)((?:\[-?[0-9]+\])*)$")


def _key_steps(key: str, text: str) -> list[str | int]:
    """``sources[1].align`` → ["sources", 1, "align"]."""
    steps: list[str | int] = []
    for part in key.split("."):
        m = _INDEX.match(part)
        if not m:
            raise ConfigError(f"malformed override {text!r}: {part!r} is not a key or key[index]")
        steps.append(m.group(1))
        steps.extend(int(i) for i in re.findall(r"-?[0-9]+", m.group(2)))
    return steps


def _key_text(steps: Sequence[str | int]) -> str:
    return "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")


def apply_overrides(data: Mapping, overrides: Sequence[str]) -> ConfigData:
    """Return a copy of `data` with each `a.b.c=value` override applied (values parsed as YAML)."""
    out = ConfigData(copy.deepcopy(dict(data)), set_by=getattr(data, "set_by", {}))
    for text in overrides:
        key, value, raw = _parse_override(text)
        steps = _key_steps(key, text)
        node = out
        for i, step in enumerate(steps[:-1]):
            where = _key_text(steps[: i + 1])
            if isinstance(step, int):
                if not isinstance(node, list) or not -len(node) <= step < len(node):
                    raise ConfigError(f"--set {text}: {where} does not exist: an index reaches only into a list the "
                                      f"config file gives ({_key_text(steps[:i])} has "
                                      f"{len(node) if isinstance(node, list) else 'no'} items)")
                node = node[step]
                continue
            if node.get(step) is None and not isinstance(steps[i + 1], int):
                node[step] = {}
            if not isinstance(node.get(step), list if isinstance(steps[i + 1], int) else dict):
                raise ConfigError(f"--set {text}: cannot set {key}, {where} is {node.get(step)!r}, not a "
                                  f"{'list' if isinstance(steps[i + 1], int) else 'section'}")
            node = node[step]
        if isinstance(steps[-1], int):
            raise ConfigError(f"--set {text}: set a key of the list item, e.g. {key}.name=...")
        if not isinstance(node, dict):
            raise ConfigError(f"--set {text}: {_key_text(steps[:-1])} is not a section")
        node[steps[-1]] = value
        out.set_by = {k: v for k, v in out.set_by.items() if not k.startswith(key + ".")}
        out.set_by[key] = raw
    return out


def _read_yaml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: not valid UTF-8 at byte offset {e.start} (line {line}: "
                          f"{raw[e.start:e.start + 4]!r}, {e.reason}); save the file as UTF-8") from None
    try:
        data = _load_yaml(text, path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = ": ".join(filter(None, [getattr(e, "context", None), getattr(e, "problem", None)]))
        raise ConfigError(f"{path}{at}: invalid YAML: {problem or e}") from e
    if data is None:  # empty file
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def load(cls: type, path: str | None, overrides: Sequence[str] = ()) -> Any:
    """Load `cls` from a YAML file (None: defaults only), then apply `--set` overrides."""
    data = _read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides), source=path or "<defaults>")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config FILE` and repeatable `--set KEY=VALUE` to `parser`."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML config file; keys not given take their defaults")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override one config key (the keys are listed below), e.g. --set KEY=3 (value is YAML: "
                             "3, 1e-5, true, null, [1,2]); repeatable, applied after --config")


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Load `cls` from the `--config`/`--set` arguments parsed by `add_config_arguments`."""
    return load(cls, args.config, args.overrides)


def _describe_rows(cls: type, prefix: str, defaults: Any = None) -> list[tuple[str, str, str]]:
    """Rows of (key, type = default, help); `defaults` is the parent's default instance of `cls`, if any."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        if defaults is not None:
            value = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = dataclasses.MISSING
        if dataclasses.is_dataclass(tp):
            rows += _describe_rows(tp, key + ".", None if value is dataclasses.MISSING else value)
            continue
        # JSON is valid YAML, so a default can be pasted into --set.
        default = "(required)" if value is dataclasses.MISSING else json.dumps(to_dict(value))
        help_lines = str(f.metadata.get("help", "")).strip().splitlines()
        bounds = f.metadata.get("bounds")
        type_text = f"{_type_name(tp)} ({bounds})" if bounds else _type_name(tp)
        rows.append((key, f"{type_text} = {default}", help_lines[0] if help_lines else ""))
        item = _section_type(tp)
        if item is not None:  # a list of sections (`sources[].name`) or an optional section (`corpus.paths`)
            rows += _describe_rows(item, key + ("[]." if typing.get_origin(tp) is tuple else "."))
    return rows


def _section_type(tp: Any) -> type | None:
    """The dataclass of a `tuple[Section, ...]` or a `Section | None` field, else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
    origin = typing.get_origin(tp)
    if origin in (tuple, Union, types.UnionType) and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def describe(cls: type) -> str:
    """One line per dotted key: type, default and the first line of the field's help (on its own line when the
    default is long)."""
    rows = _describe_rows(cls, "")
    wk = max((len(r[0]) for r in rows), default=0)
    wt = min(max((len(r[1]) for r in rows), default=0), 44)
    lines = []
    for k, t, h in rows:
        if len(t) > wt and h:
            lines += [f"  {k:<{wk}}  {t}", f"  {'':<{wk}}  {'':<{wt}}  {h}"]
        else:
            lines.append(f"  {k:<{wk}}  {t:<{wt}}  {h}".rstrip())
    return "\n".join(lines)


def check_choices(obj: Any, prefix: str = "") -> None:
    """Every ``Literal`` field of the config dataclass ``obj`` holds one of its choices (the loader checks this on
    load; ``validate`` calls it for a config built in Python)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp, value = hints[f.name], getattr(obj, f.name)
        args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
            Union, types.UnionType) else [tp]
        choices = [c for a in args if typing.get_origin(a) is Literal for c in typing.get_args(a)]
        if choices and value not in choices and not (value is None and type(None) in typing.get_args(tp)):
            raise ConfigError(f"{prefix}{f.name} must be one of {tuple(choices)}, got {value!r}")


def option(text: str, default: Any = dataclasses.MISSING, *, minimum: float | None = None,
           maximum: float | None = None, exclusive_minimum: float | None = None,
           exclusive_maximum: float | None = None, **kw) -> Any:
    """A config dataclass field with its ``--help`` text and, for numbers, its allowed range:
    ``steps: int = option("optimizer steps", 1000, minimum=1)``. The loader refuses a given value outside the range
    (each item of a tuple), naming the key and the range, and ``--help`` lists the range."""
    metadata: dict[str, Any] = {"help": text}
    bounds = Bounds(minimum, maximum, exclusive_minimum, exclusive_maximum)
    if bounds:
        metadata["bounds"] = bounds
    return dataclasses.field(default=default, metadata=metadata, **kw)
