"""Generate the settings tables of the docs from the settings classes (one source for every setting).

A table lives between two markers that name the classes it documents, by dotted name:

    <!-- settings-table: services.policy.settings.PolicySettings services.value.settings.ValueSettings -->
    | setting (after the prefix) | default | meaning |
    ...
    <!-- /settings-table -->

Each class is a pydantic-settings class; its ``env_prefix`` (``CPL_POLICY_``) names the service in the table.
A setting that only some classes have is marked "(policy only)"; a default that differs between classes is
listed per service. ``python tools/settings_table.py`` rewrites the tables of every docs/*.md;
``--check`` exits 1 when a table differs from the code (tests/test_settings_table.py runs the check).
"""

from __future__ import annotations

import argparse
import enum
import importlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
"""Every doc may hold tables; today docs/services.md does."""
BLOCK = re.compile(r"(<!-- settings-table: (?P<classes>[^>]*?) -->\n)(?P<body>.*?)(<!-- /settings-table -->)", re.S)
HEADER = "| setting (after the prefix) | default | meaning |\n| --- | --- | --- |\n"


def import_class(dotted: str) -> type[BaseModel]:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def service_name(cls: type[BaseModel]) -> str:
    prefix = str(cls.model_config.get("env_prefix", ""))
    return prefix.removeprefix("CPL_").strip("_").lower() or cls.__name__


def shown_default(info: Any) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    value = info.default_factory() if info.default_factory is not None else info.default
    if value is None:
        return "unset"
    if value == sys.executable:
        return "the running interpreter"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, list | tuple):
        value = list(value)
    return f"`{value}`"


def render_table(classes: Sequence[type[BaseModel]]) -> str:
    names: list[str] = []
    for cls in classes:
        names += [n for n in cls.model_fields if n not in names]
    rows = []
    for name in names:
        owners = [c for c in classes if name in c.model_fields]
        label = f"`{name.upper()}`"
        if len(owners) < len(classes):
            label += " (" + ", ".join(service_name(c) for c in owners) + " only)"
        defaults = [shown_default(c.model_fields[name]) for c in owners]
        if len(set(defaults)) == 1:
            default = defaults[0]
        else:
            default = ", ".join(f"{service_name(c)} {d}" for c, d in zip(owners, defaults, strict=True))
        descriptions = [c.model_fields[name].description for c in owners]
        if not all(descriptions):
            raise ValueError(f"setting {name} of {[c.__name__ for c in owners]} has no description")
        if len(set(descriptions)) == 1:
            meaning = descriptions[0]
        else:
            meaning = "; ".join(f"{service_name(c)}: {d}" for c, d in zip(owners, descriptions, strict=True))
        rows.append(f"| {label} | {default} | {meaning} |\n")
    return HEADER + "".join(rows)


def regenerate(text: str) -> str:
    def table(match: re.Match[str]) -> str:
        classes = [import_class(d) for d in match["classes"].split()]
        return match.group(1) + render_table(classes) + match.group(4)

    return BLOCK.sub(table, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a table differs from the code")
    args = parser.parse_args(argv)
    stale = []
    for path in DOCS:
        text = path.read_text()
        new = regenerate(text)
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print("settings tables differ from the code: " + ", ".join(str(p) for p in stale), file=sys.stderr)
        print("regenerate with: python tools/settings_table.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
