"""No drift between the code and the deployment files.

- Every `CPL_*` variable that docker-compose.yml or a rendered overlay sets is a setting some pydantic-settings
  class under services/ reads (found generically: every BaseSettings subclass with an env_prefix).
- Every container running one of our images sets the settings its service requires (no default) plus the ones a
  deployment needs to work (DEPLOYMENT_NEEDS), which must themselves be real settings.
- Every setting of every class is documented in docs/.
- Every command our containers and images run is accepted by the real `cpl` parser (services.cli:main).

PENDING lists what the deployment files already carry for services not yet on main (the search service of
issue 11, the train worker of issue 12). While a component is pending its commands and `CPL_*` names are exempt
from the two "is it real" checks, and test_pending_components_have_not_landed fails as soon as the component's
code appears, so the exemption is removed and the names are checked against the real settings.
"""

from __future__ import annotations

import pytest

from tests.deploy import deployfiles
from tests.deploy.deployfiles import Container

# Component -> what marks it as landed (a settings prefix, a package, a command), its commands, its CPL_* names.
PENDING: dict[str, dict[str, list]] = {
    "search service (issue 11)": {
        "prefixes": ["CPL_SEARCH_"],
        "paths": ["services/search"],
        "landed_if_parses": [["cpl", "serve", "search"], ["cpl", "worker"]],
        "commands": [["cpl", "serve", "search"], ["cpl", "worker"]],
        "settings": [
            "CPL_SEARCH_REDIS_URL",
            "CPL_SEARCH_PORT",
            "CPL_SEARCH_POLICY_URL",
            "CPL_SEARCH_VALUE_URL",
            "CPL_SEARCH_API_KEYS_FILE",
            "CPL_SEARCH_ADMIN_TOKEN_FILE",
            "CPL_SEARCH_SLICE_SECONDS",
        ],
    },
    "train worker (issue 12)": {
        "prefixes": ["CPL_TRAIN_", "CPL_TRAINER_"],
        "paths": ["services/trainer"],
        "landed_if_parses": [],
        "commands": [["cpl", "worker", "--queues", "train"]],
        "settings": [
            "CPL_TRAIN_CHECKPOINT_ROOT",
            "CPL_TRAIN_POLICY_URL",
            "CPL_TRAIN_VALUE_URL",
        ],
    },
}

# What a container of each role reads, and what a deployment must set beyond the settings without a default:
# the model, the hot-swap root and the admin token file (hot-swap is off without them), the port the probes use.
ROLES: dict[tuple[str, ...], tuple[str, list[str]]] = {
    ("cpl", "serve", "policy"): ("CPL_POLICY_", ["MODEL", "PORT", "CHECKPOINT_ROOT", "ADMIN_TOKEN_FILE"]),
    ("cpl", "serve", "value"): ("CPL_VALUE_", ["MODEL", "PORT", "CHECKPOINT_ROOT", "ADMIN_TOKEN_FILE"]),
}


def pending_commands() -> set[tuple[str, ...]]:
    return {tuple(c) for part in PENDING.values() for c in part["commands"]}


def pending_settings() -> set[str]:
    return {s for part in PENDING.values() for s in part["settings"]}


@pytest.fixture(scope="module")
def real_settings() -> dict[str, deployfiles.Setting]:
    return {s.env: s for s in deployfiles.settings()}


def test_settings_are_discovered(real_settings: dict[str, deployfiles.Setting]) -> None:
    owners = {s.owner for s in real_settings.values()}
    assert {"services.policy.settings.PolicySettings", "services.value.settings.ValueSettings"} <= owners
    assert real_settings["CPL_POLICY_MODEL"].required


def test_pending_components_have_not_landed(
    real_settings: dict[str, deployfiles.Setting], entry_points: dict[tuple[str, ...], str]
) -> None:
    landed = []
    for component, part in PENDING.items():
        prefixes = [s.env for s in real_settings.values() if s.prefix in part["prefixes"]]
        parsed = [c for c in part["landed_if_parses"] if entry_points.get(tuple(c)) == "ok"]
        paths = [p for p in part["paths"] if (deployfiles.ROOT / p).exists()]
        if prefixes or parsed or paths:
            landed.append(f"{component}: settings {sorted(prefixes)[:5]}, commands {parsed}, code {paths}")
    assert not landed, (
        "these components are on main now: remove them from PENDING in tests/deploy/test_drift.py and make "
        "docker-compose.yml and k8s/ use their real settings and commands:\n" + "\n".join(landed)
    )


def test_every_cpl_variable_set_is_a_real_setting(
    containers: list[Container], real_settings: dict[str, deployfiles.Setting]
) -> None:
    unknown = [
        f"{c.where}: {name}"
        for c in containers
        for name in c.env
        if name.startswith("CPL_") and name not in real_settings and name not in pending_settings()
    ]
    assert not unknown, "set in the deployment files but read by no settings class:\n" + "\n".join(unknown)


def test_pending_names_are_not_already_real(real_settings: dict[str, deployfiles.Setting]) -> None:
    assert not pending_settings() & set(real_settings)


def test_containers_set_required_and_needed_settings(
    containers: list[Container], real_settings: dict[str, deployfiles.Setting]
) -> None:
    missing = []
    checked = 0
    for c in containers:
        if not c.ours or c.argv is None or tuple(c.argv[:3]) not in ROLES:
            continue
        prefix, needs = ROLES[tuple(c.argv[:3])]
        for name in needs:
            assert f"{prefix}{name}" in real_settings, f"DEPLOYMENT_NEEDS names {prefix}{name}, not a setting"
        required = [s.name for s in real_settings.values() if s.prefix == prefix and s.required]
        for name in sorted({*required, *needs}):
            if f"{prefix}{name}" not in c.env and f"--{name.lower().replace('_', '-')}" not in c.argv:
                missing.append(f"{c.where}: {prefix}{name}")
        checked += 1
    assert checked >= 4, "no gateway container found"
    assert not missing, "settings the service needs but the deployment does not set:\n" + "\n".join(missing)


def test_every_setting_is_documented(real_settings: dict[str, deployfiles.Setting]) -> None:
    docs = deployfiles.documentation()
    undocumented = [f"{s.env} ({s.owner})" for s in real_settings.values() if not deployfiles.is_documented(s, docs)]
    assert not undocumented, "settings missing from docs/:\n" + "\n".join(undocumented)


def test_settings_set_by_the_deployment_are_named_in_the_operator_guide(containers: list[Container]) -> None:
    guide = (deployfiles.ROOT / "docs" / "deploy.md").read_text()
    names = {name for c in containers for name in c.env if name.startswith("CPL_")}
    assert not [n for n in sorted(names) if n not in guide]


def test_containers_run_real_entry_points(
    containers: list[Container], entry_points: dict[tuple[str, ...], str]
) -> None:
    bad = []
    for c in containers:
        if not c.ours:
            continue
        if c.argv is None:
            bad.append(f"{c.where}: no explicit command (image {c.image})")
            continue
        if tuple(c.argv) in pending_commands():
            continue
        if entry_points[tuple(c.argv)] != "ok":
            bad.append(f"{c.where}: {' '.join(c.argv)}: {entry_points[tuple(c.argv)]}")
    assert not bad, "\n".join(bad)


def test_images_default_commands_are_real_entry_points(entry_points: dict[tuple[str, ...], str]) -> None:
    bad = [
        f"{where}: {entry_points[tuple(argv)]}"
        for where, argv in deployfiles.dockerfile_cmds()
        if tuple(argv) not in pending_commands() and entry_points[tuple(argv)] != "ok"
    ]
    assert not bad, "\n".join(bad)


def test_the_entry_point_check_can_fail(entry_points: dict[tuple[str, ...], str]) -> None:
    results = deployfiles.check_entry_points([["cpl", "serve", "policyy"], ["cpl", "serve", "policy", "--modle", "x"]])
    assert all(v.startswith("rejected") for v in results.values()), results
    assert entry_points[("cpl", "serve", "policy")] == "ok"


def test_every_service_of_the_stack_is_deployed(containers: list[Container]) -> None:
    runs = {tuple(c.argv) for c in containers if c.ours and c.argv}
    expected = {("cpl", "serve", "policy"), ("cpl", "serve", "value"), *pending_commands()}

    def place(c: Container) -> str:  # docker-compose.yml, or one rendered overlay
        return c.where.split(" service ")[0] if c.where.startswith("docker") else " ".join(c.where.split()[:3])

    for where in {place(c) for c in containers}:
        here = {tuple(c.argv) for c in containers if c.ours and c.argv and place(c) == where}
        assert expected <= here, f"{where} does not run {expected - here}"
    assert runs <= expected | set(ROLES)
