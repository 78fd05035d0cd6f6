"""Every configuration key is documented, and the generated reference says so."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from stream_trainer.config import Settings
from stream_trainer.config_docs import END, START, description_of, embed, item_models, render


def _keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, its description) for every field of ``model``, sections included."""
    found = []
    for name, field in model.model_fields.items():
        found.append((f"{prefix}{name}", description_of(field)))
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            found += _keys(nested, f"{prefix}{name}.")
        for item in item_models(field.annotation):  # list items: record.features[].type
            found += _keys(item, f"{prefix}{name}[].")
    return found


def test_every_config_key_has_a_description() -> None:
    keys = _keys(Settings)
    assert len(keys) > 90  # the walk reaches the nested sections
    missing = [key for key, description in keys if not description.strip()]
    assert not missing, (
        f"config keys without a description: {missing}; add Field(description=...) in "
        "stream_trainer/config.py (a section: a docstring on its model)"
    )


def test_every_row_of_the_reference_has_notes() -> None:
    rows = render().splitlines()[2:]
    assert len(rows) == len(_keys(Settings))
    for row in rows:
        notes = row.rsplit("|", 2)[-2].strip()
        assert notes, f"no notes in {row}"


def test_cells_cannot_hide_text_as_html_or_split_the_table() -> None:
    table = render()
    # topics.lease's description names <kafka.group_id>.lease: GitHub would drop the tag.
    assert "&lt;kafka.group_id&gt;.lease" in table
    for row in table.splitlines():
        assert row.replace("\\|", "").count("|") == 5, row


def test_embed_replaces_only_between_the_markers() -> None:
    page = f"intro\n{START}\nstale\n{END}\noutro\n"
    assert embed(page) == f"intro\n{START}\n{render()}{END}\noutro\n"
    with pytest.raises(ValueError, match="markers"):
        embed("a page without markers")
