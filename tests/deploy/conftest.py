from __future__ import annotations

import pytest

from tests.deploy import deployfiles


@pytest.fixture(scope="session")
def containers() -> list[deployfiles.Container]:
    return deployfiles.all_containers()


@pytest.fixture(scope="session")
def entry_points(containers: list[deployfiles.Container]) -> dict[tuple[str, ...], str]:
    """Every command our containers and images run, parsed once by the real `cpl` parser."""
    argvs = [c.argv or [] for c in containers if c.ours] + [argv for _, argv in deployfiles.dockerfile_cmds()]
    unique = sorted({tuple(a) for a in argvs})
    return deployfiles.check_entry_points([list(a) for a in unique])
