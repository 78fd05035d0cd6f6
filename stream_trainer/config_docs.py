"""Renders the configuration reference (a Markdown table) from the config models.

``docs/configuration.md`` embeds the output between markers and a test keeps them equal, so
the reference cannot drift from the code. Update it with
``python -m stream_trainer.config_docs --write`` (run from the repository's root).
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from stream_trainer.config import Settings

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
# Where ``--write`` puts the table, relative to the repository's root.
REFERENCE = Path("docs") / "configuration.md"


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(get_args(annotation)[0])
    if origin in (list, dict):
        inner = ", ".join(_type_name(a) for a in get_args(annotation))
        return f"{origin.__name__}[{inner}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{value!r}`"
    if field.default is PydanticUndefined:
        return ""
    return f"`{field.default!r}`"


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell: ``|`` would end the cell, and GitHub
    would swallow ``<kafka.group_id>`` as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def description_of(field: FieldInfo) -> str:
    """A field's documentation: its ``description``, or for a section without one the first
    line of its model's docstring. Empty when it has neither."""
    if field.description:
        return " ".join(field.description.split())
    nested = _model_of(field.annotation)
    if nested is not None and nested.__doc__:
        return nested.__doc__.strip().splitlines()[0]
    return ""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def item_models(annotation: Any) -> list[type[BaseModel]]:
    """The models a list field's items may be (``list[str | FeatureConfig]``: FeatureConfig)."""
    if get_origin(annotation) is Annotated:
        return item_models(get_args(annotation)[0])
    if get_origin(annotation) is not list:
        return []
    found: list[type[BaseModel]] = []
    pending = list(get_args(annotation))
    while pending:
        arg = pending.pop(0)
        if get_origin(arg) is Annotated:
            pending.append(get_args(arg)[0])
        elif get_origin(arg) in (Union, types.UnionType):
            pending.extend(get_args(arg))
        elif (model := _model_of(arg)) is not None:
            found.append(model)
    return found


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = _model_of(field.annotation)
        kind = "section" if nested is not None else _type_name(field.annotation)
        rows.append(f"| `{path}` | {kind} | {_default(field)} | {_cell(description_of(field))} |")
        if nested is not None:
            rows.extend(_rows(nested, f"{path}."))
        for item in item_models(field.annotation):  # each list item's own keys
            rows.extend(_rows(item, f"{path}[]."))
    return rows


def render() -> str:
    """The reference table, one row per field, nested sections flattened to dotted paths."""
    header = ["| key | type | default | notes |", "| --- | --- | --- | --- |"]
    return "\n".join(header + _rows(Settings, "")) + "\n"


def embed(page: str) -> str:
    """``page`` with the text between the markers replaced by :func:`render`.

    Raises ValueError when ``page`` lacks either marker (nothing would be replaced).
    """
    head, found, rest = page.partition(START)
    _, found_end, tail = rest.partition(END)
    if not found or not found_end:
        raise ValueError(f"the page has no {START} ... {END} markers")
    return f"{head}{START}\n{render()}{END}{tail}"


def main() -> int:
    """Print the table, or with ``--write`` update docs/configuration.md under the current
    directory (the repository's root)."""
    if "--write" in sys.argv:
        try:
            page = embed(REFERENCE.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            sys.stderr.write(f"{REFERENCE}: {error}\n")
            return 1
        REFERENCE.write_text(page, encoding="utf-8")
        return 0
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
