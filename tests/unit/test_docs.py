"""The README's configuration table stays in step with the settings the code reads."""

from __future__ import annotations

from pathlib import Path

from kessai.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_documented_in_the_readme() -> None:
    text = README.read_text()
    missing = [
        f"KESSAI_{name.upper()}"
        for name in Settings.model_fields
        if f"`KESSAI_{name.upper()}`" not in text
    ]
    assert missing == []
