"""Dotted config keys (``section.key``): command-line overrides, the keys a schema has, look-ups,
and the one YAML reader every config document and override value goes through (``parse_yaml``).

Shared by the config (which owns the schema) and the search space (which searches its keys), so
neither imports the other's module for them.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import yaml
from pydantic import BaseModel

from pipeline.core.errors import PipelineError

# A config is a page of settings: more values than this after aliases are expanded is a "billion
# laughs" document, refused before it is built.
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 32  # a config nests a few levels (tune.space.<key>.when); pydantic stops near 300
INT64 = 2**63
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float", "str", "seq", "map", "timestamp")}


class _Refused(Exception):
    """A document PyYAML reads but a config may not hold; ``line`` is 1-based or None."""

    def __init__(self, msg: str, mark=None):
        super().__init__(msg)
        self.line = mark.line + 1 if mark is not None else None


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses what would silently mean something else: a key given twice in a
    mapping (the last would win), a NaN or infinite number, an integer outside int64, a NUL in a
    text and tags beyond plain data (``!!binary``, ``!!set``). A date stays the text it was
    written as (``data.dir: 2024-01-01`` is a folder name, not a ``datetime.date``)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # ``<<: *base`` keys may be overridden by the mapping's own keys
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # unhashable: SafeLoader's own error names it
                if first is not key_node:
                    raise _Refused(
                        f"duplicate key {key!r} (first at line {first.start_mark.line + 1}); "
                        "expected each key once in a mapping",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_float(self, node):
        value = super().construct_yaml_float(node)
        if not math.isfinite(value):
            raise _Refused(f"{node.value} is not a finite number; expected a finite number", node.start_mark)
        return value

    def construct_yaml_int(self, node):
        try:
            value = super().construct_yaml_int(node)
        except ValueError:  # more digits than Python converts
            value = INT64
        if not -INT64 <= value < INT64:
            raise _Refused(
                f"integer {node.value[:30]}{'...' if len(node.value) > 30 else ''} is out of range; "
                "expected an integer between -2**63 and 2**63-1",
                node.start_mark,
            )
        return value

    def construct_yaml_str(self, node):
        value = super().construct_yaml_str(node)
        if "\x00" in value:
            raise _Refused("a text value holds a NUL character; expected plain text", node.start_mark)
        return value

    def construct_undefined(self, node):
        tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
        raise _Refused(
            f"tag {tag} is not allowed in a config; expected plain values (numbers, text, "
            "true/false, null, lists, mappings)",
            node.start_mark,
        )


for _tag in list(yaml.SafeLoader.yaml_constructors):
    if _tag not in _PLAIN_TAGS:
        _ConfigLoader.add_constructor(_tag, _ConfigLoader.construct_undefined)
_ConfigLoader.add_constructor("tag:yaml.org,2002:float", _ConfigLoader.construct_yaml_float)
_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)
_ConfigLoader.add_constructor("tag:yaml.org,2002:str", _ConfigLoader.construct_yaml_str)
_ConfigLoader.add_constructor("tag:yaml.org,2002:timestamp", _ConfigLoader.construct_yaml_str)


def _size(node, memo: dict, open_: set) -> tuple[int, int]:
    """(values, levels) of the document once aliases are expanded: an alias counts its whole subtree."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in open_:
        raise _Refused("an alias refers to the value that contains it; expected a finite document", node.start_mark)
    open_.add(id(node))
    children = (
        [c for pair in node.value for c in pair]
        if isinstance(node, yaml.MappingNode)
        else node.value
        if isinstance(node, yaml.SequenceNode)
        else []
    )
    sizes = [_size(c, memo, open_) for c in children]
    n, levels = 1 + sum(s for s, _ in sizes), 1 + max((h for _, h in sizes), default=0)
    open_.discard(id(node))
    memo[id(node)] = n, levels
    if n > MAX_YAML_VALUES:
        raise _Refused(
            f"the document expands to more than {MAX_YAML_VALUES} values (YAML aliases?); "
            "expected a config of ordinary size",
            node.start_mark,
        )
    if levels > MAX_YAML_DEPTH:
        raise _Refused(
            f"values nested more than {MAX_YAML_DEPTH} levels deep; expected a config of ordinary depth",
            node.start_mark,
        )
    return n, levels


def _load(text: str):
    """One YAML document through ``_ConfigLoader``; raises ``yaml.YAMLError`` or ``_Refused``."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _size(node, {}, set())
        return loader.construct_document(node)
    except RecursionError:
        raise _Refused("the document is nested too deeply; expected a config of ordinary depth") from None
    finally:
        loader.dispose()


def _yaml_problem(e: yaml.YAMLError) -> tuple[int | None, str]:
    """(1-based line or None, one-line cause) of a PyYAML error."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "context", None)
    if problem is None:  # a ReaderError (a character YAML does not allow): its own first line
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
    return (mark.line + 1 if mark is not None else None), " ".join(str(problem).split())


def parse_yaml(text: str, where: str):
    """The values of one YAML document (a config file's text, an ensemble file, a ``--params``
    file), every problem one ``PipelineError`` line ``<where>:<line>: <cause>``."""
    try:
        return _load(text)
    except _Refused as e:
        line, msg = e.line, str(e)
    except yaml.YAMLError as e:
        line, msg = _yaml_problem(e)
        msg = f"invalid YAML ({msg})"
    raise PipelineError(f"{where}{f':{line}' if line else ''}: {msg}")


def parse_override(text: str) -> tuple[list[str], Any]:
    shown = repr(text) if len(text) <= 80 else repr(text[:77] + "...")
    where = f"command line: override {shown}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raise PipelineError(f"{where} is not valid UTF-8 text; expected section.key=value in UTF-8") from None
    if "=" not in text:
        raise PipelineError(f"{where} is not section.key=value")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(k.strip() for k in keys):
        raise PipelineError(f"{where} has an empty key")
    try:
        value = _load(raw) if raw.strip() else None
    except yaml.YAMLError:  # not YAML: the text as written (``data.dir=a: b``)
        value = raw
    except _Refused as e:
        raise PipelineError(f"{where}: {e}") from None
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
