"""Dotted config keys (``section.key``): command-line overrides, the keys a schema has, look-ups.

Shared by the config (which owns the schema) and the search space (which searches its keys), so
neither imports the other's module for them.
"""
from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel

from .errors import PipelineError


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise PipelineError(f"command line: override {text!r} is not section.key=value")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise PipelineError(f"command line: override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(d: dict, overrides: list[str] | dict) -> dict:
    d = copy.deepcopy(d)
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides]
    for keys, value in items:
        if isinstance(keys, str):
            keys = keys.split(".")
        node = d
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return d


def known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a schema (nested sections expanded), for hints and the search space."""
    out = []
    for name, f in model.model_fields.items():
        if name in ("path", "name"):
            continue
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += known_keys(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def lookup(d: dict, key: str):
    """The value at a dotted key of a config dict, None when absent."""
    node = d
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node
