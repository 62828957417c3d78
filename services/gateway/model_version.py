"""Model version labels: what ``*_MODEL_VERSION`` and ``POST /admin/checkpoint``'s ``version`` accept.

A label travels in the ``X-Model-Version`` response header, in JSON bodies, in logs and as a Prometheus label
value. HTTP header values must be visible Latin-1 without control characters; a label outside that set (``"v✓"``,
``"x\\ny"``) once made every model answer fail while ``/ready`` stayed 200. So labels are restricted to a small
header-safe set, checked where they enter: the setting at start-up and the swap request (docs/services.md).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema

VERSION_LABEL_MAX_LENGTH = 64
VERSION_LABEL_CHARS = "A-Z a-z 0-9 . _ - + : @ /"
_LABEL = re.compile(rf"[A-Za-z0-9._+:@/-]{{1,{VERSION_LABEL_MAX_LENGTH}}}")
VERSION_LABEL_PATTERN = f"^{_LABEL.pattern}$"


def check_version_label(label: str) -> str:
    """``label`` if it is a valid version label, else ``ValueError`` saying what is allowed."""
    if not _LABEL.fullmatch(label):
        raise ValueError(
            f"invalid model version label {label!r}: use 1-{VERSION_LABEL_MAX_LENGTH} characters from "
            f"{VERSION_LABEL_CHARS} (it is sent in the X-Model-Version header)"
        )
    return label


VersionLabel = Annotated[
    str,
    AfterValidator(check_version_label),
    # The schema shows the rule to clients; the validator (not a pattern constraint) checks it, so the error
    # message names the allowed characters instead of quoting a regular expression.
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": VERSION_LABEL_MAX_LENGTH,
            "pattern": VERSION_LABEL_PATTERN,
            "description": f"model version label: 1-{VERSION_LABEL_MAX_LENGTH} characters from {VERSION_LABEL_CHARS}",
        }
    ),
]
