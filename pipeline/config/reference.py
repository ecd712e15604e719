"""The config reference, generated from the schema (``make docs`` writes ``docs/reference/config.md``), so the
documentation of every key, its type, its default and its meaning cannot drift from what ``load_config``
accepts.

    python -m pipeline.config.reference docs/reference/config.md
"""

from __future__ import annotations

import json
import re
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pipeline.config.options import DataOptions
from pipeline.config.schema import Config

HIDDEN = ("path", "name", "plan")  # derived from the file and the run, never written in it


def _type(ann) -> str:
    """A readable type: ``int | auto``, ``list[str]``, ``a | b`` for literals."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) if not isinstance(a, str) else a for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type(a) for a in args if a is not type(None)) + (" | null" if type(None) in args else "")
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type(a) for a in args)}]" if args else name
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section"
    return getattr(ann, "__name__", str(ann)).replace("NoneType", "null")


def _default(field) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    return "`" + json.dumps(value if not isinstance(value, tuple) else list(value)) + "`"


def _cell(text: str) -> str:
    return re.sub(r"\s+", " ", text or "").replace("|", "\\|").strip()


def _table(model: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        rows.append(_row(f"{prefix}{field.alias or name}", field))
    return rows


def _row(key: str, field) -> str:
    return f"| `{key}` | {_cell(_type(field.annotation))} | {_default(field)} | {_cell(field.description)} |"


def _section_model(ann) -> type[BaseModel] | None:
    """The section model a field holds (``X``, ``X | None``), or None for a plain value."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in typing.get_args(ann):
        found = _section_model(a)
        if found is not None:
            return found
    return None


def reference_markdown() -> str:
    """Every key of an experiment config, section by section."""
    out = [
        "# Config reference",
        "",
        "Generated from the schema (`pipeline/config/`) by `make docs`: every key an experiment config may hold,",
        "its type, its default and what it means. `auto` values are resolved by the run's plan",
        "([Time budgets and auto](../budgets.md)); a format's own `data` keys are its reader's `Options`.",
        "",
        "## Top-level keys",
        "",
    ]
    top = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    sections = []
    for name, field in Config.model_fields.items():
        if name in HIDDEN:
            continue
        model = DataOptions if name == "data" else _section_model(field.annotation)
        if model is None:
            top.append(
                f"| `{name}` | {_cell(_type(field.annotation))} | {_default(field)} | {_cell(field.description)} |"
            )
        else:
            doc = _cell((model.__doc__ or "").split("\n\n")[0]) if model.__doc__ != BaseModel.__doc__ else ""
            sections += ["", f"## `{name}`", "", *([doc, ""] if doc else []), *_table(model, f"{name}.")]
    return "\n".join(out + top + sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = reference_markdown()
    if not argv:
        sys.stdout.write(text)
        return 0
    path = Path(argv[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
