"""The deployment files pass their linters and say what the design needs.

Dockerfile: hadolint with no finding at all; compose: the compose specification schema;
Kubernetes: kubernetes-validate --strict (unknown fields fail). All offline. Each tool is
also shown a broken file, so a tool that silently checks nothing cannot make these pass.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ctjoint.contracts import repo_root
from ctjoint.gateway.metrics import GatewayMetrics

ROOT = repo_root()
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"
K8S = ROOT / "deploy" / "k8s"
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
GATEWAY_PORT = 50051
TRITON_IMAGE = re.compile(r"nvcr\.io/nvidia/tritonserver:(\d{2}\.\d{2})-py3")


def _tool(name: str) -> str:
    """The tool from this environment's bin/ (where the test extra installs it), else PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return found


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    except OSError as err:  # e.g. a hadolint binary built for another architecture
        pytest.skip(f"{args[0]} cannot run here: {err}")


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _documents() -> list[dict[str, Any]]:
    return [d for p in _manifests() for d in yaml.safe_load_all(p.read_text()) if d]


def _find(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name)


# --- Dockerfile ---------------------------------------------------------------------------------


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = _run(_tool("hadolint"), str(DOCKERFILE))
    print(f"hadolint Dockerfile: exit {result.returncode} {result.stdout.strip() or '(clean)'}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_report_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    result = _run(_tool("hadolint"), str(bad))
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_the_image_is_multi_stage_on_a_pinned_triton_base_and_runs_unprivileged() -> None:
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^ARG TRITON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert TRITON_IMAGE.fullmatch(base), base
    assert len(re.findall(r"^FROM \$\{TRITON_IMAGE\} AS \w+$", text, re.MULTILINE)) >= 2
    (user,) = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0
    assert re.search(r"^HEALTHCHECK ", text, re.MULTILINE)
    # Every package from the pinned file; the project itself without dependencies; no torch.
    assert "pip install --only-binary=:all: -r requirements-image.txt" in text
    assert text.count("pip install --no-deps") == 2
    assert "torch" not in text.lower().replace("no torch", "")


def test_python_backend_stubs_do_not_see_the_image_venv() -> None:
    text = DOCKERFILE.read_text()
    assert "PYTHONPATH=" not in text
    entry = ENTRYPOINT.read_text()
    # Both ways tritonserver is started get the stub folder (ctjoint alone) as PYTHONPATH.
    assert 'exec env PYTHONPATH="${CTJOINT_STUB_SITE}" tritonserver' in entry
    assert 'run_triton tritonserver "${triton_args[@]}"' in entry
    assert "--target /opt/ctjoint/stub-site ./" in text


def test_the_entrypoint_is_executable_valid_bash() -> None:
    assert ENTRYPOINT.stat().st_mode & 0o111
    result = _run("bash", "-n", str(ENTRYPOINT))
    assert result.returncode == 0, result.stderr


# --- compose -------------------------------------------------------------------------------------


def test_the_compose_file_follows_the_compose_specification() -> None:
    result = _run(
        _tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)
    )
    print(f"check-jsonschema compose.yaml: {result.stdout.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_check_catches_a_misspelt_key(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("healthcheck:", "healthchek:", 1))
    result = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken))
    assert result.returncode != 0 and "healthchek" in result.stdout


def test_compose_has_the_three_services_with_health_checks_and_a_gpu_for_triton() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert set(services) == {"triton", "gateway", "orthanc"}
    assert all("healthcheck" in s for s in services.values())
    (device,) = services["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert services["gateway"]["depends_on"]["triton"]["condition"] == "service_healthy"
    assert "engines:/var/cache/ctjoint" in services["triton"]["volumes"]


def _published(service: dict[str, Any]) -> list[str]:
    return [str(p) for p in service.get("ports", [])]


def test_compose_publishes_nothing_unauthenticated_beyond_loopback() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    open_ports = {
        name: [p for p in _published(s) if not p.startswith("127.0.0.1:")]
        for name, s in services.items()
    }
    assert {n: p for n, p in open_ports.items() if p} == {"gateway": [f"{GATEWAY_PORT}:50051"]}
    # The one port on every interface demands bearer tokens: `${VAR:?...}` makes compose refuse
    # to start without them.
    tokens = services["gateway"]["environment"]["CTJOINT_GATEWAY_TOKENS"]
    assert tokens.startswith("${CTJOINT_GATEWAY_TOKENS:?")


def test_compose_wires_the_gateway_push_to_its_orthanc() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    command = services["gateway"]["command"]
    options = dict(zip(command[1::2], command[2::2], strict=False))
    assert options["--pacs-host"] == "orthanc"
    assert options["--pacs-ae"] == services["orthanc"]["environment"]["ORTHANC__DICOM_AET"]
    orthanc_dicom = {p.rsplit(":", 1)[-1] for p in _published(services["orthanc"])}
    assert options["--pacs-port"] == "4242" and "4242" in orthanc_dicom
    assert services["gateway"]["depends_on"]["orthanc"]["condition"] == "service_healthy"


# --- Kubernetes ----------------------------------------------------------------------------------


def test_kubernetes_manifests_validate_strictly() -> None:
    result = _run(_tool("kubernetes-validate"), "--strict", *map(str, _manifests()))
    print(result.stdout.strip())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout


def test_the_strict_kubernetes_check_catches_an_unknown_field(tmp_path: Path) -> None:
    broken = tmp_path / "service.yaml"
    broken.write_text((K8S / "gateway-service.yaml").read_text().replace("selector:", "selectr:"))
    result = _run(_tool("kubernetes-validate"), "--strict", str(broken))
    assert result.returncode != 0


def test_the_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == [p.name for p in _manifests()]


def test_triton_pods_get_a_gpu_and_are_ready_only_on_tritons_readiness() -> None:
    pod = _find("Deployment", "triton")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_the_triton_service_is_headless_so_gateways_see_every_replica() -> None:
    service = _find("Service", "triton")
    assert service["spec"]["clusterIP"] == "None"
    gateway = _find("Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    url = next(e["value"] for e in gateway["env"] if e["name"] == "CTJOINT_TRITON_URL")
    assert url.startswith(f"{service['metadata']['name']}.")


def test_gateway_pods_are_probed_with_grpc_health() -> None:
    (container,) = _find("Deployment", "gateway")["spec"]["template"]["spec"]["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == GATEWAY_PORT


def test_the_autoscaler_uses_a_metric_the_gateway_exports() -> None:
    hpa = _find("HorizontalPodAutoscaler", "gateway")
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    exported = {
        sample.name for family in GatewayMetrics().registry.collect() for sample in family.samples
    }
    assert names and names <= exported
    assert hpa["spec"]["scaleTargetRef"]["name"] == "gateway"


def test_disruption_budgets_keep_one_triton_and_one_gateway() -> None:
    budgets = {d["metadata"]["name"]: d for d in _documents() if d["kind"] == "PodDisruptionBudget"}
    assert {n: b["spec"]["minAvailable"] for n, b in budgets.items()} == {
        "triton": 1,
        "gateway": 1,
    }
