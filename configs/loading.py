"""Reading experiment configs: YAML files that inherit (`base:`), and `section.key=value` overrides.

OmegaConf does the YAML work: it reads `1e-4` as a float (PyYAML's YAML 1.1 reads it as a string), merges a
file over its base, and parses override values (`model.attn_layers=[3,7]`). The result is handed, as plain
dicts, to `ExperimentConfig.from_dict`, where pydantic checks types and the sections check ranges.

A config file may name its base, relative to its own folder or as a shipped name:

    base: paper.yaml        # or `base: paper`
    name: debug             # a file without `name` is named after itself (debug.yaml -> debug)
    model:
      d_model: 64           # only what differs from the base

Lists are replaced, not appended (`model.attn_layers: [3]` over `[1, 2]` is `[3]`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from configs.schema import ExperimentConfig
from configs.validation import ConfigError, check_key_path

CONFIG_DIR = Path(__file__).resolve().parent
BASE_KEY = "base"


def resolve_config_path(path: str | Path, relative_to: Path | None = None) -> Path:
    """A path to a YAML file, or the bare name of a shipped config (`paper` -> configs/paper.yaml).

    relative_to: the folder a relative path is first looked up in (a file's own folder, for `base:`).
    """
    p = Path(path)
    candidates = [relative_to / p] if relative_to is not None and not p.is_absolute() else []
    candidates.append(p)
    if p.suffix == "" and p.parent == Path("."):
        candidates.append(CONFIG_DIR / f"{p.name}.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    names = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {str(path)!r} not found; give a YAML path or one of: {names}")


def _read(path: Path) -> DictConfig:
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {node!r}")
    # `model:` with everything commented out changes nothing (it would otherwise replace the base's section).
    for key in [k for k, v in node.items_ex(resolve=False) if v is None and k != "name"]:
        del node[key]
    return node


def load_file(path: str | Path) -> dict[str, Any]:
    """The file's sections merged over its base's (recursively), as plain dicts; `base` is removed."""
    return _plain_container(_load_node(path), path)


def _load_node(path: str | Path, _children: tuple[Path, ...] = ()) -> DictConfig:
    """The file merged over its base chain, interpolations left unresolved until the config is complete."""
    resolved = resolve_config_path(path).resolve()
    if resolved in _children:
        chain = " -> ".join(str(p.name) for p in (*_children, resolved))
        raise ConfigError(f"config inheritance loops: {chain}")
    node = _read(resolved)
    if "name" not in node and not _children:
        node["name"] = resolved.stem  # an inheriting file must not take its base's run name
    base = node.pop(BASE_KEY, None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{resolved}: {BASE_KEY} expects a config path or name, got {base!r}")
        try:
            base_path = resolve_config_path(base, relative_to=resolved.parent)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{resolved}: base {e}") from None
        node = _merge(_load_node(base_path, (*_children, resolved)), node, resolved)
    return node


# Mappings that a file over its base, or an override, replaces whole instead of merging into (lists are always
# replaced): a search space names the dimensions to search, and a merged one would keep every dimension of the base.
REPLACED_WHOLE = ("tune.space",)
_ABSENT = object()


def _merge(base: DictConfig, over: DictConfig, where: object) -> DictConfig:
    for key in REPLACED_WHOLE:
        if OmegaConf.select(over, key, default=_ABSENT) is not _ABSENT:
            section, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(base, section, default=None)
            if isinstance(parent, DictConfig) and leaf in parent:
                base = base.copy()  # shallow: the section below is replaced, not edited in place
                base[section] = {k: v for k, v in OmegaConf.to_container(parent).items() if k != leaf}
    try:
        return OmegaConf.merge(base, over)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: cannot merge: {e}") from None


def _plain_container(node: DictConfig, where: object) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(node, resolve=True)  # ${section.key} interpolations resolved here
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {e}") from None


def apply_overrides(
    raw: Mapping[str, Any], overrides: Sequence[str], schema: type | None = ExperimentConfig
) -> dict[str, Any]:
    """Return a copy of `raw` with `section.key=value` overrides applied (values parsed as YAML).

    `model.attn_layers=[3,7]`, `train.lr=3e-4`, `model.arch=transformer`, `name=foo`. Keys are checked
    against `schema` (None: not checked here); values are checked when the config is built.
    """
    return _plain_container(_apply(OmegaConf.create(dict(raw)), overrides, schema), "overrides")


def _apply(node: DictConfig, overrides: Sequence[str], schema: type | None) -> DictConfig:
    if isinstance(overrides, str):  # a lone "a.b=c" would otherwise be iterated character by character
        overrides = [overrides]
    for item in overrides:
        key, sep, _ = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value (or name=value)")
        try:
            if schema is not None:
                check_key_path(key.split("."), schema)
            parsed = OmegaConf.from_dotlist([item])
        except ConfigError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
        node = _merge(node, parsed, f"override {item!r}")
    return node


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML config (None: the defaults, i.e. the paper's setup), apply overrides, validate.

    Interpolations (`${model.d_model}`) are resolved once, after the base chain and the overrides are merged.
    Raises ConfigError naming the offending dotted key; FileNotFoundError for a missing file.
    """
    node = _load_node(path) if path is not None else OmegaConf.create({})
    node = _apply(node, overrides, ExperimentConfig)
    return ExperimentConfig.from_dict(_plain_container(node, path or "overrides"))


def changes(
    old: Mapping[str, Any], new: Mapping[str, Any], keys: Callable[[str], bool] = lambda key: True
) -> list[str]:
    """`"key: old -> new"` for every dotted key (nested mappings flattened) whose value differs, sorted, among the
    keys `keys` accepts (by default all); a key on one side only reads None on the other. E.g. of two configs'
    `to_dict()`."""

    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
        return out

    a, b = flat(old), flat(new)
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if keys(k) and a.get(k) != b.get(k)
    ]
