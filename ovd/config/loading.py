"""How configs are read: YAML files with ``_base_`` parents, merged over the schema's defaults,
then ``key=value`` command-line overrides; unknown keys are errors naming the closest valid one
(:func:`check_keys`, also used for the pipeline file, :mod:`ovd.config.stages`)."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ovd.config.schema import Config
from ovd.errors import OVDError
from ovd.utils.io import atomic_open

BASE_KEY = "_base_"


def check_keys(data: Any, schema: type, prefix: str, source: str) -> None:
    """Reject keys that are not fields of ``schema`` (recursively), naming the closest valid one."""
    if not isinstance(data, dict):
        return
    hints = get_type_hints(schema)
    names = [f.name for f in fields(schema)]
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise OVDError(f"unknown config key {path!r}{hint}", path=source)
        sub = hints[key]
        if is_dataclass(sub) and isinstance(value, dict):
            check_keys(value, sub, f"{path}.", source)
        item = get_args(sub)[0] if get_origin(sub) is list and get_args(sub) else None
        if is_dataclass(item) and isinstance(value, list):
            for i, entry in enumerate(value):
                check_keys(entry, item, f"{path}[{i}].", source)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The chain of (file, overrides) from the root base to ``path``."""
    path = path.resolve()
    if path in seen:
        raise OVDError("circular _base_ chain", path=path)
    if not path.is_file():
        raise OVDError("config file not found", path=path)
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise OVDError(f"malformed YAML: {e}", path=path) from e
    if not isinstance(data, dict):
        raise OVDError("a config file must be a mapping of keys to values", path=path)
    base = data.pop(BASE_KEY, None)
    chain: list[tuple[Path, dict]] = []
    if base is not None:
        if not isinstance(base, str):
            raise OVDError("_base_ must be a path", path=path, field=BASE_KEY)
        chain = _read_yaml(path.parent / base, (*seen, path))
    return [*chain, (path, data)]


def _merge(cfg: DictConfig, data: dict, source: str) -> DictConfig:
    check_keys(data, Config, "", source)
    try:
        return OmegaConf.merge(cfg, data)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise OVDError(f"invalid value: {msg}", path=source, field=key) from e
    except (TypeError, ValueError) as e:  # e.g. a mapping merged into a list
        raise OVDError(f"invalid value: {str(e).splitlines()[0]}", path=source) from e


_CLI = "<command line>"
_INDEX = re.compile(r"\[(\d+|\*)\]")


def _key_parts(key: str) -> list[str | int]:
    """``data.sources[1].min_size`` (or ``data.sources.1.min_size``) → ``["data", "sources", 1, "min_size"]``;
    ``[*]`` (every entry of a list) becomes ``-1``."""
    parts: list[str | int] = []
    for part in key.split("."):
        m = re.fullmatch(r"([^\[\]]*)((?:\[(?:\d+|\*)\])*)", part)
        if m is None or (not m.group(1) and not m.group(2)):
            raise OVDError(f"malformed key {key!r} (write a.b, a.list[1].b or a.list[*].b)", path=_CLI, field=key)
        name = m.group(1)
        if name:
            parts.append(int(name) if name.isdigit() else name)
        parts += [-1 if i == "*" else int(i) for i in _INDEX.findall(m.group(2))]
    return parts


def _set_in(node: Any, parts: list[str | int], value: Any, key: str, where: str) -> None:
    """Set ``value`` at ``parts`` inside plain containers; ``-1`` stands for every list entry."""
    head, rest = parts[0], parts[1:]
    if isinstance(head, int):
        if not isinstance(node, list):
            raise OVDError(f"{where} is not a list, so it cannot be indexed", path=_CLI, field=key)
        if head >= len(node):
            raise OVDError(f"index {head} out of range: {where} has {len(node)} entries", path=_CLI, field=key)
        for i in range(len(node)) if head == -1 else [head]:
            if rest:
                _set_in(node[i], rest, value, key, f"{where}[{i}]")
            else:
                node[i] = value
        return
    if not isinstance(node, dict):
        raise OVDError(f"{where} is not a mapping, so it has no key {head!r}", path=_CLI, field=key)
    if rest:
        _set_in(node.setdefault(head, {}), rest, value, key, f"{where}.{head}")
    else:
        node[head] = value


def _parse_value(key: str, value: str) -> Any:
    try:
        return yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        raise OVDError(f"cannot parse the value of {key!r}: {value!r}", path=_CLI) from e


def _apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """Apply ``key=value`` overrides in order. A key may index a list: ``data.sources[1].min_size=[320]``
    (or ``data.sources.1.min_size``) changes one entry, ``data.sources[*].min_size=[320]`` every entry.

    Raises:
        OVDError: naming the key: not ``key=value``, an unknown key, an index out of range, a wrong type.
    """
    plain: dict = {}
    for item in overrides:
        if "=" not in item:
            raise OVDError(f"override {item!r} is not of the form key=value", path=_CLI)
        key, text = item.split("=", 1)
        key = key.strip()
        parts = _key_parts(key)
        value = _parse_value(key, text)
        first = next((i for i, p in enumerate(parts) if isinstance(p, int)), None)
        if first is None:
            _set_in(plain, list(parts), value, key, "")
            continue
        if plain:  # earlier plain overrides first: overrides apply in order
            cfg, plain = _merge(cfg, plain, _CLI), {}
        if first == 0:
            raise OVDError("a key cannot start with an index", path=_CLI, field=key)
        list_key = ".".join(str(p) for p in parts[:first])
        node = OmegaConf.select(cfg, list_key, default=None, throw_on_missing=False)
        if not isinstance(node, ListConfig):
            check_keys(_nested(parts[:first], []), Config, "", _CLI)  # names an unknown key
            raise OVDError(f"{list_key} is not a list, so it cannot be indexed", path=_CLI, field=key)
        container = OmegaConf.to_container(node)
        _set_in(container, parts[first:], value, key, list_key)
        try:
            cfg = _merge(cfg, _nested(parts[:first], container), _CLI)
        except OVDError as e:
            if e.field is None:  # an unknown key: the message names it
                raise
            raise OVDError(e.reason, path=_CLI, field=key) from e
    return _merge(cfg, plain, _CLI) if plain else cfg


def _nested(parts: list[str | int], value: Any) -> dict:
    out: Any = value
    for p in reversed(parts):
        out = {p: out}
    return out


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from defaults, a YAML chain and ``key=value`` overrides (see
    :func:`_apply_overrides` for list entries).

    Raises:
        OVDError: a missing or malformed file, an unknown key, or a value of the wrong type.
    """
    cfg = OmegaConf.structured(Config)
    if path is not None:
        for file, data in _read_yaml(Path(path)):
            cfg = _merge(cfg, data, str(file))
    if overrides:
        cfg = _apply_overrides(cfg, overrides)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def config_to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the fully resolved config (atomically) so the run can be reproduced."""
    with atomic_open(path) as f:
        f.write(config_to_yaml(cfg))


def config_from_yaml(text: str, source: str = "<checkpoint>") -> Config:
    """Rebuild a :class:`Config` from the YAML text stored in a checkpoint."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise OVDError(f"malformed config YAML: {e}", path=source) from e
    return OmegaConf.to_object(_merge(OmegaConf.structured(Config), data, source))  # type: ignore[return-value]
