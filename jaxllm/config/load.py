"""Strict YAML → frozen-dataclass conversion, dotted overrides and plain-data dumps.

Every section is a frozen dataclass. Loading is strict: an unknown key fails with its dotted
path and the closest valid key; a value of the wrong type names the key, the expected type and
the value given; range checks live in each section's `_validate` and are reported the same way.
A float key takes finite numbers only; a file that is not UTF-8, or that gives a key twice in
one mapping, fails naming the file (and line).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from jaxllm.errors import ConfigError

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first = key, line, first


class _StrictLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader (plain data only, no objects from tags), except that a key
    given twice in one mapping is an error: YAML would keep the last silently, so a second
    `loader:` block would throw the first away. A merge (`<<: *base`) may still be overridden
    by the mapping's own keys."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not None:
                    raise _DuplicateKey(key, line, first)
                seen[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as e:
        raise ConfigError(
            f"{p}:{e.line}: key {e.key!r} given twice in one mapping (first at line "
            f"{e.first}); keep one"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys, got {type(raw).__name__}")
    return raw


def set_dotted(raw: dict[str, Any], key: str, value: Any, where: str = "--set") -> None:
    """Sets `a.b.0.c` inside nested dicts/lists, creating missing mappings; errors name the
    key after `where` (the command line's `--set`, or the pipeline entry that gave it)."""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, parts[: i + 1], where)]
            continue
        if not isinstance(node.get(part), dict | list):
            if parts[i + 1].isdigit():  # an index into a list the config does not give
                at = ".".join(parts[: i + 1])
                whole = f"--set '{at}=[...]'" if where == "--set" else f"{at}: [...]"
                raise ConfigError(
                    f"{where} {key}: the config gives no list at {at} to index; set the "
                    f"whole list, e.g. {whole}"
                )
            node[part] = {}
        node = node[part]
    if isinstance(node, list):
        node[_list_index(node, parts[-1], parts, where)] = value
    elif isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        for k, v in value.items():  # a mapping merges into a mapping, key by key
            set_dotted(node[parts[-1]], str(k), v, where)
    else:
        node[parts[-1]] = value


def key_type(root: Any, key: str) -> Any:
    """The declared type of dotted `key` under dataclass `root` (list items by index), or
    None when the key names no field."""
    tp = root
    for part in key.split("."):
        if get_origin(tp) in (Union, types.UnionType):
            given = [a for a in get_args(tp) if a is not type(None)]
            tp = given[0] if len(given) == 1 else None
        if dataclasses.is_dataclass(tp):
            if part not in {f.name for f in dataclasses.fields(tp)}:
                return None
            tp = get_type_hints(tp)[part]
        elif get_origin(tp) is tuple and part.isdigit():
            tp = get_args(tp)[0]
        else:
            return None
    return tp


def parse_set_value(key: str, text: str, tp: Any) -> Any:
    """A `--set` value: YAML (numbers, bools, lists, mappings), except for a key declared as
    text (a str, or a choice of strings), which takes the text as written — `*.jsonl`,
    `[draft] be brief`, `Rules: be brief`, `123` stay strings — unless it is quoted."""
    value = text.strip()
    is_text = tp is str or (
        get_origin(tp) is Literal and all(isinstance(a, str) for a in get_args(tp))
    )
    if is_text and value[:1] not in ("'", '"'):
        return value
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        if tp is None:  # an unknown key: its own error (with the closest key) comes later
            return value
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            f"--set {key}: {value!r} is not valid YAML ({problem}); quote it, "
            f"e.g. --set '{key}=\"...\"'"
        ) from None


def _list_index(node: list, part: str, parts: list[str], where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{where} {'.'.join(parts)}: no list item {part} (list has {len(node)})")
    return int(part)


def to_dict(cfg: Any) -> Any:
    """Plain, YAML-safe data (tuples as lists) that `from_dict` reads back to an equal config."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def replace(cfg: Any, **dotted: Any) -> Any:
    """`replace(cfg, **{"inputs.data_dir": "x"})`: a copy with nested fields changed."""
    for key, value in dotted.items():
        head, _, rest = key.partition(".")
        if rest:
            value = replace(getattr(cfg, head), **{rest: value})
        cfg = dataclasses.replace(cfg, **{head: value})
    return cfg


def resolve_path(path: str) -> Path:
    """Paths as written in configs; `asset:corpus/x.gz` names a file shipped in the package."""
    if path.startswith("asset:"):
        return Path(str(resources.files("jaxllm") / "assets" / path[len("asset:") :].lstrip("/")))
    return Path(path).expanduser()


def is_remote(path: Any) -> bool:
    """Whether `path` names object storage (`gs://`, `s3://`, ...) rather than a local file."""
    return "://" in str(path)


def storage_path(path: Any) -> Any:
    """Where a run writes: a `pathlib.Path` for a local path (unchanged behaviour) and an
    `etils.epath.Path` for a bucket URI (`gs://b/run`), which `pathlib` would mangle into
    `gs:/b/run`; both support `/`, `exists`, `mkdir`, `read_text` and `write_text`."""
    if not isinstance(path, str | Path) or not is_remote(path):
        return path if not isinstance(path, str) else Path(path)
    from etils import epath  # local: only runs that write to buckets pay for it

    return epath.Path(path)


# ----------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _bad(path: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(
        f"config key '{path}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, path)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        given = [a for a in args if a is not type(None)]
        if len(given) == 1:  # an optional value: its own message (a bad key inside, a range)
            return _convert(given[0], value, path)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError:
                pass
        raise _bad(path, tp, value)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise _bad(path, tp, value)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _bad(path, tp, value)
        (elem,) = get_args(tp)[:1]
        return tuple(_convert(elem, v, f"{path}.{i}") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            number = float(value)  # YAML 1.1 reads `3e-4` (no dot) as a string
        if number is not None:
            if not math.isfinite(number):  # .nan, .inf, 1e999: no setting means these
                raise ConfigError(f"config key '{path}': expected a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {tp} at {path}")
    raise _bad(path, tp, value)


def _convert_dataclass(cls: Any, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise _bad(path or "<root>", cls, value)
    value = _apply_preset(cls, value, path)
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, v in value.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            prefix = f"{path}." if path else ""
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown config key '{where}': {hint}(valid keys here: {', '.join(names)})"
            )
        kwargs[key] = _convert(hints[key], v, where)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = f"{path}.{missing[0]}" if path else missing[0]
        raise ConfigError(f"config key '{where}' is required ({_type_name(hints[missing[0]])})")
    obj = cls(**kwargs)
    if hasattr(obj, "_validate"):
        try:
            obj._validate()
        except ValueError as e:
            key, _, msg = str(e).partition(": ")
            raise ConfigError(f"config key '{path + '.' if path else ''}{key}': {msg}") from None
    return obj


def _apply_preset(cls: Any, value: dict, path: str) -> dict:
    """`preset: name` fills a section from `cls.PRESETS`; keys given beside it win."""
    presets = getattr(cls, "PRESETS", None)
    name = value.get("preset")
    if not presets or not name:
        return value
    if name not in presets:
        close = difflib.get_close_matches(str(name), list(presets), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        where = f"{path}.preset" if path else "preset"
        raise ConfigError(
            f"config key '{where}': unknown preset '{name}'; {hint}(presets: {', '.join(presets)})"
        )
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in presets[name].items()}
    for k, v in value.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k].update(v)
        else:
            merged[k] = v
    return merged
