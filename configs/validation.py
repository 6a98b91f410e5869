"""How a config section is checked: pydantic types, range checks, and errors that name the dotted key.

`@section` makes a dataclass a pydantic dataclass (types checked at construction, unknown keys rejected)
whose errors come out as `ConfigError`s in this project's words: `model.d_state expects int, got 'abc'
(str)`, `unknown key 'model.d_stat'; valid keys: ... (did you mean 'model.d_state'?)`. Sections derive
from `Section` and check ranges in `_validate`. Nothing here converts values by hand: pydantic does.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

import pydantic
from pydantic import BeforeValidator, StrictBool
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or is out of range. The message names the key."""


# --------------------------------------------------------------------------------------------------
# Field types and the pydantic settings every section shares


def _not_bool(value: object) -> object:
    # pydantic's lax mode reads True as 1; `true` is never a count or a rate here.
    if isinstance(value, bool):
        raise PydanticCustomError("bool_is_not_a_number", "a bool is not a number")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
Bool = StrictBool  # 1 or "yes" are not booleans either

# Unknown keys are errors; inf / nan are not valid numbers; '12' -> 12 and 500.0 -> 500 are fine, 2.5 -> int is not.
_PYDANTIC = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)


def section(cls: type) -> type:
    """Make `cls` a pydantic dataclass whose constructor raises ConfigError (not pydantic's ValidationError)."""
    cls = pydantic.dataclasses.dataclass(config=_PYDANTIC)(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except pydantic.ValidationError as e:
            raise config_error(e, type(self)) from None

    cls.__init__ = __init__
    return cls


# --------------------------------------------------------------------------------------------------
# pydantic's errors as messages that name the dotted key


def join_key(prefix: str, key: object) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is None and hasattr(tp, "__name__"):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # Annotated[...] stripped: `Int` reads as `int` in messages


def _child_type(tp: Any, part: str | int) -> Any:
    """The annotation one step down `tp` (a field of a dataclass, an item of a list or tuple); None if unknown."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp, args = args[0], list(typing.get_args(args[0]))  # X | None: walk into X
    if dataclasses.is_dataclass(tp) and isinstance(part, str):
        return field_types(tp).get(part)
    if isinstance(part, int) and typing.get_origin(tp) is list:
        return args[0]
    if isinstance(part, int) and typing.get_origin(tp) is tuple:
        return args[0] if len(args) == 2 and args[1] is Ellipsis else args[part] if part < len(args) else None
    return None


# Keys that existed once: what to use instead (the error names it rather than guessing a close match).
REMOVED_KEYS = {
    "preprocess.caption_model": "model captions are two models now: set preprocess.caption_audio_model (audio -> "
    "text, e.g. Qwen/Qwen2-Audio-7B-Instruct) and preprocess.caption_text_model (the rephraser, e.g. "
    "meta-llama/Meta-Llama-3-8B-Instruct); see docs/preprocessing.md",
}


def unknown_key(key: object, names: list[str], prefix: str) -> ConfigError:
    if join_key(prefix, key) in REMOVED_KEYS:
        return ConfigError(f"{join_key(prefix, key)} is no longer a setting: {REMOVED_KEYS[join_key(prefix, key)]}")
    msg = f"unknown key {join_key(prefix, key)!r}; valid keys: {', '.join(sorted(names))}"
    close = difflib.get_close_matches(str(key), names, n=1)
    if close:
        msg += f" (did you mean {join_key(prefix, close[0])!r}?)"
    return ConfigError(msg)


def _describe(error: Mapping[str, Any], root: type) -> str | ConfigError:
    """One pydantic error as a sentence; a ConfigError raised by a section's `_validate` is passed through."""
    kind, loc, value = error["type"], error["loc"], error["input"]
    if kind == "value_error" and isinstance(error.get("ctx", {}).get("error"), ConfigError):
        return error["ctx"]["error"]
    prefix, types_ = getattr(root, "_section", ""), [root]
    for part in loc[:-1]:
        prefix = join_key(prefix, part)
        types_.append(_child_type(types_[-1], part))
    parent, last = types_[-1], loc[-1] if loc else None
    if kind == "unexpected_keyword_argument" and dataclasses.is_dataclass(parent):
        return unknown_key(last, _field_names(parent), prefix).args[0]
    if kind == "missing" and typing.get_origin(parent) is tuple:  # too few items: talk about the tuple
        return f"{prefix} expects {_type_name(parent)} ({len(typing.get_args(parent))} items), got {value!r}"
    key, tp = (join_key(prefix, last), _child_type(parent, last)) if loc else (prefix or "the config", root)
    if kind == "too_long" and typing.get_origin(tp) is tuple:
        return f"{key} expects {_type_name(tp)} ({len(typing.get_args(tp))} items), got {value!r}"
    if kind == "literal_error":
        return f"{key} must be one of {', '.join(repr(a) for a in typing.get_args(tp))}; got {value!r}"
    if kind == "finite_number":
        return f"{key} expects a finite float, got {value!r}"
    if kind in ("dataclass_type", "dataclass_args_type"):
        return f"{key} expects a mapping of {_type_name(tp)} keys, got {value!r}"
    if tp is None:  # not reachable through the schema: fall back to pydantic's own words
        return f"{key}: {error['msg']} (got {value!r})"
    return f"{key} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"


def config_error(e: pydantic.ValidationError, root: type) -> ConfigError:
    """pydantic's errors for `root` (a section class) as one ConfigError, one line per error."""
    described = [_describe(err, root) for err in e.errors()]
    if len(described) == 1 and isinstance(described[0], ConfigError):
        return described[0]
    return ConfigError("\n".join(str(d) for d in described))


def plain(value: Any) -> Any:
    """Nested dicts of YAML-safe values: tuples become lists."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# Range checks


class Section:
    """Base of every config section: `_validate` checks ranges after pydantic has checked types."""

    _section: ClassVar[str] = ""  # the YAML section, for dotted key names in errors

    def __post_init__(self) -> None:
        self._validate()

    def _key(self, name: str) -> str:
        return join_key(self._section, name)

    def _require(self, name: str, ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(f"{self._key(name)} must be {what}, got {getattr(self, name)!r}")

    def _validate(self) -> None:
        pass


def check_key_path(parts: list[str], schema: type) -> None:
    """Reject a dotted key (`model.d_state` as ['model', 'd_state']) that `schema` does not have."""
    cls: Any = schema
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{prefix!r} is a value, not a section")
        names = _field_names(cls)
        if part not in names:
            raise unknown_key(part, names, prefix)
        cls = field_types(cls)[part]
