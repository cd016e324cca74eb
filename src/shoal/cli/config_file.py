"""Editing the TOML config file in place, keeping the user's comments and layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import ParseError
from tomlkit.items import Table

from shoal import settings as settings_mod
from shoal.errors import ConfigError


def lookup(document: dict[str, Any], key: str) -> Any:
    value: Any = document
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def file_value(path: Path, key: str) -> Any:
    """What the file itself says for `key` (None when absent), ignoring env and defaults."""
    if not path.is_file():
        return None
    try:
        document = tomlkit.parse(path.read_text()).unwrap()
    except ParseError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        return lookup(document, key)
    except KeyError:
        return None


def parse_value(text: str) -> Any:
    """TOML syntax (`4`, `true`, `["a"]`, `"x"`), or else the text itself."""
    try:
        return tomlkit.parse(f"v = {text}")["v"]
    except ParseError:
        return text


def set_value(path: Path, key: str, text: str) -> None:
    """Set `key` in the file at `path`, refusing a change that would not load."""
    try:
        document = tomlkit.parse(path.read_text()) if path.is_file() else tomlkit.document()
    except ParseError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    *tables, last = key.split(".")
    node: Any = document
    for part in tables:
        if part not in node:
            node[part] = tomlkit.table()
        node = node[part]
        if not isinstance(node, Table | dict):
            raise ConfigError(f"{key!r}: {part!r} is not a table")
    node[last] = parse_value(text)
    candidate = path.with_name(path.name + ".new")
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate.write_text(tomlkit.dumps(document))
    try:
        settings_mod.load(candidate, environ=False)
    except ConfigError:
        candidate.unlink()
        raise
    candidate.replace(path)
