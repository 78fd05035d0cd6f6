"""Renders the configuration reference (a Markdown table) from the config models.

The README embeds the output between markers and a test keeps them equal, so the reference
cannot drift from the code. Update it with ``python -m stream_trainer.config_docs --write``.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from stream_trainer.config import Settings

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


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


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = _model_of(field.annotation)
        if nested is not None:
            doc = (nested.__doc__ or "").strip().splitlines()[0]
            rows.append(f"| `{path}` | section | {_default(field)} | {doc} |")
            rows.extend(_rows(nested, f"{path}."))
            continue
        description = (field.description or "").replace("|", "\\|")
        rows.append(
            f"| `{path}` | {_type_name(field.annotation)} | {_default(field)} | {description} |"
        )
    return rows


def render() -> str:
    """The reference table, one row per field, nested sections flattened to dotted paths."""
    header = ["| key | type | default | notes |", "| --- | --- | --- | --- |"]
    return "\n".join(header + _rows(Settings, "")) + "\n"


def embed(readme: str) -> str:
    """``readme`` with the text between the markers replaced by :func:`render`."""
    head, _, rest = readme.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{render()}{END}{tail}"


def main() -> int:
    """Print the table, or with ``--write`` update README.md in the current directory."""
    if "--write" in sys.argv:
        path = Path("README.md")
        path.write_text(embed(path.read_text(encoding="utf-8")), encoding="utf-8")
        return 0
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
