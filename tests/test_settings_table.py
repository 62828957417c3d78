"""docs/services.md's settings table is the settings classes, rendered (tools/settings_table.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("settings_table", REPO / "tools" / "settings_table.py")
settings_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(settings_table)


def test_services_doc_matches_the_settings_classes():
    text = (REPO / "docs" / "services.md").read_text()
    assert "<!-- settings-table:" in text
    assert settings_table.regenerate(text) == text, "regenerate with: python tools/settings_table.py"
    assert settings_table.main(["--check"]) == 0


def test_a_stale_row_is_caught():
    text = (REPO / "docs" / "services.md").read_text()
    stale = text.replace("| `MAX_MODEL_LEN` | `4096` |", "| `MAX_MODEL_LEN` | `2048` |")
    assert stale != text and settings_table.regenerate(stale) == text
    missing = text.replace("| `CHUNK_SIZE` (value only)", "| `CHUNK_SIZE_GONE` (value only)")
    assert settings_table.regenerate(missing) == text


def test_every_setting_of_the_classes_is_in_the_table():
    from services.policy.settings import PolicySettings
    from services.value.settings import ValueSettings

    table = settings_table.render_table([PolicySettings, ValueSettings])
    for cls in (PolicySettings, ValueSettings):
        for name in cls.model_fields:
            assert f"| `{name.upper()}`" in table
