"""No drift between the code and the deployment files.

- Every `CPL_*` variable that docker-compose.yml or a rendered overlay sets is a setting some pydantic-settings
  class under services/ reads (found generically: every BaseSettings subclass with an env_prefix).
- Every container running one of our images sets the settings its service requires (no default) plus the ones a
  deployment needs to work (ROLES), which must themselves be real settings.
- Every setting of every class is documented in docs/.
- Every command our containers and images run is accepted by the real `cpl` parser (services.cli:main).

Pending: what the deployment files already carry for code not yet on main. PENDING_COMMANDS (e.g. the search
service's `cpl serve search` / `cpl worker`, issue 11; the train worker's `cpl worker --queues train`, issue 12)
are exempt from the entry-point check while the `cpl` parser rejects them, and PENDING_SETTINGS (by prefix) from
the "is it a real setting" check while no settings class has that prefix. test_pending_commands_do_not_exist_yet
and test_pending_settings_have_no_class_yet fail as soon as the code lands, so the exemption is removed and the
real commands and names are checked from then on.
"""

from __future__ import annotations

import pytest

from tests.deploy import deployfiles
from tests.deploy.deployfiles import Container

PENDING_COMMANDS: dict[tuple[str, ...], str] = {}
PENDING_SETTINGS: dict[str, list[str]] = {}

# What a container of each role reads, and what a deployment must set beyond the settings without a default:
# the model, the hot-swap root and the admin token file (hot-swap is off without them), the port the probes use.
# The train worker: where checkpoints go, the models `base` means, every replica to swap, the token, its Redis.
ROLES: dict[tuple[str, ...], tuple[str, list[str]]] = {
    ("cpl", "serve", "policy"): ("CPL_POLICY_", ["MODEL", "PORT", "CHECKPOINT_ROOT", "ADMIN_TOKEN_FILE"]),
    ("cpl", "serve", "value"): ("CPL_VALUE_", ["MODEL", "PORT", "CHECKPOINT_ROOT", "ADMIN_TOKEN_FILE"]),
    ("cpl", "worker", "--queues", "train"): (
        "CPL_TRAINER_",
        [
            "CHECKPOINT_ROOT",
            "BASE_POLICY",
            "BASE_VALUE",
            "ADMIN_TOKEN_FILE",
            "POLICY_REPLICAS",
            "VALUE_REPLICAS",
            "REDIS_URL",
        ],
    ),
    # Checked once CPL_SEARCH_ leaves PENDING_SETTINGS.
    ("cpl", "serve", "search"): ("CPL_SEARCH_", ["REDIS_URL", "POLICY_URL", "VALUE_URL", "API_KEYS_FILE", "PORT"]),
    ("cpl", "worker"): ("CPL_SEARCH_", ["REDIS_URL", "POLICY_URL", "VALUE_URL", "SLICE_SECONDS"]),
}


def pending_commands() -> set[tuple[str, ...]]:
    return set(PENDING_COMMANDS)


def pending_settings() -> set[str]:
    return {name for names in PENDING_SETTINGS.values() for name in names}


@pytest.fixture(scope="module")
def real_settings() -> dict[str, deployfiles.Setting]:
    return {s.env: s for s in deployfiles.settings()}


def test_settings_are_discovered(real_settings: dict[str, deployfiles.Setting]) -> None:
    owners = {s.owner for s in real_settings.values()}
    assert {"services.policy.settings.PolicySettings", "services.value.settings.ValueSettings"} <= owners
    assert real_settings["CPL_POLICY_MODEL"].required


def test_pending_commands_do_not_exist_yet(entry_points: dict[tuple[str, ...], str]) -> None:
    landed = [f"{' '.join(c)} ({what})" for c, what in PENDING_COMMANDS.items() if entry_points.get(c) == "ok"]
    assert not landed, (
        "these commands exist now: remove them from PENDING_COMMANDS in tests/deploy/test_drift.py (the "
        "entry-point check then covers them):\n" + "\n".join(landed)
    )


def test_pending_settings_have_no_class_yet(real_settings: dict[str, deployfiles.Setting]) -> None:
    landed = sorted({s.prefix for s in real_settings.values() if s.prefix in PENDING_SETTINGS})
    assert not landed, (
        f"settings classes with the prefixes {landed} exist now: remove them from PENDING_SETTINGS in "
        "tests/deploy/test_drift.py and make docker-compose.yml and k8s/ use their real names (for the search "
        "service also the Celery queue's Redis list that KEDA watches, listName in "
        "k8s/components/keda/scaled-object.yaml)"
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
        if not c.ours or c.argv is None or tuple(c.argv) not in ROLES:
            continue
        prefix, needs = ROLES[tuple(c.argv)]
        if prefix in PENDING_SETTINGS:
            continue
        for name in needs:
            assert f"{prefix}{name}" in real_settings, f"ROLES names {prefix}{name}, not a setting"
        required = [s.name for s in real_settings.values() if s.prefix == prefix and s.required]
        for name in sorted({*required, *needs}):
            if f"{prefix}{name}" not in c.env and f"--{name.lower().replace('_', '-')}" not in c.argv:
                missing.append(f"{c.where}: {prefix}{name}")
        checked += 1
    assert checked >= 6, "no gateway or train worker container found"
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
