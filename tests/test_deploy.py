"""The deployment artefacts: Dockerfile, .dockerignore and the k8s/ manifests.

Linters: hadolint (Dockerfile), kubernetes-validate (every manifest, strict: unknown fields fail)
and checkov (Dockerfile and k8s/, run once per module). They live in .venv-tools/
(`bash scripts/install-deploy-tools.sh`), or on PATH; a missing one skips its tests and says how
to install it. The structural checks below need only PyYAML: probes, Services, security context,
the shutdown budget, and the ConfigMap's gateway.yaml loaded by the gateway's own config loader
with the environment the Deployment gives it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway import config as config_mod

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
TOOLS_BIN = ROOT / ".venv-tools" / "bin"
INSTALL_HINT = (
    "install it with `bash scripts/install-deploy-tools.sh` (hadolint, kubernetes-validate, checkov in .venv-tools/)"
)

CONFIG_PATH = "/etc/gateway/gateway.yaml"  # the image's default `serve --config`
GATEWAY_UID = 10001
# Kubernetes versions the manifests must validate against: an older one still common on managed
# clusters, and kubernetes-validate's newest (its default).
K8S_VERSIONS = ["1.28", None]

# checkov checks allowed to fail without an annotation in the manifest, with the reason for each.
# Empty: every accepted finding is a `checkov.io/skipN: CHECK=reason` annotation on its resource.
CHECKOV_SKIP: dict[str, str] = {}
# The annotated skips docs/deployment.md lists ("Checkov checks skipped"); a new one must be added there too.
DOCUMENTED_ANNOTATED_SKIPS = {
    ("CKV_K8S_43", "Deployment.gateway.gateway"),  # image digest: pinned in kustomization.yaml per registry
    ("CKV_K8S_43", "StatefulSet.gateway.redis"),  # same, for the Redis image
}


# helpers -----------------------------------------------------------------


def find_tool(name: str) -> str:
    candidate = TOOLS_BIN / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: {INSTALL_HINT}")
    return found


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every resource in k8s/, by (kind, name)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in manifest_files():
        for doc in load_docs(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{path.name}: {key} defined twice"
            found[key] = doc
    return found


def workloads(objects: dict[tuple[str, str], dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for (kind, name), doc in objects.items():
        if kind in ("Deployment", "StatefulSet", "DaemonSet"):
            yield f"{kind}/{name}", doc


def gateway_container(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    pod = objects["Deployment", "gateway"]["spec"]["template"]["spec"]
    (container,) = (c for c in pod["containers"] if c["name"] == "gateway")
    return container


def secret_values(objects: dict[tuple[str, str], dict[str, Any]], name: str) -> dict[str, str]:
    secret = objects["Secret", name]
    values = dict(secret.get("stringData") or {})
    assert not secret.get("data"), "keep the placeholders readable: use stringData"
    return values


def secret_files(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """Each file the gateway container gets from a Secret volume: path -> (Secret name, key)."""
    container, pod = gateway_container(objects), objects["Deployment", "gateway"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v["secret"] for v in pod.get("volumes", []) if "secret" in v}
    files: dict[str, tuple[str, str]] = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes.get(mount["name"])
        if secret is not None:
            for item in secret["items"]:
                files[f"{mount['mountPath']}/{item['path']}"] = (secret["secretName"], item["key"])
    return files


def deployment_env(objects: dict[tuple[str, str], dict[str, Any]], workdir: Path) -> dict[str, str]:
    """The gateway container's environment: a GATEWAY_X_FILE that names a file of a mounted Secret
    points to a copy of that Secret's value written under `workdir`, as the kubelet would mount it."""
    env: dict[str, str] = {}
    files = secret_files(objects)
    for var in gateway_container(objects).get("env", []):
        assert "valueFrom" not in var, f"{var['name']}: secrets come as files (a Secret volume), not env"
        value = str(var["value"])
        if var["name"].endswith("_FILE"):
            assert value in files, f"{var['name']}: {value} is not a file of a mounted Secret"
            name, key = files[value]
            values = secret_values(objects, name)
            assert key in values, f"{var['name']}: Secret {name} has no key {key}"
            copy = workdir / "secrets" / key
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(values[key], encoding="utf-8")
            value = str(copy)
        env[var["name"]] = value
    return env


def gateway_yaml(objects: dict[tuple[str, str], dict[str, Any]]) -> str:
    text = objects["ConfigMap", "gateway-config"]["data"]["gateway.yaml"]
    assert isinstance(text, str)
    return text


def load_gateway_config(objects: dict[tuple[str, str], dict[str, Any]], tmp_path: Path) -> config_mod.Config:
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_yaml(objects), encoding="utf-8")
    return config_mod.load(path, deployment_env(objects, tmp_path))


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# hadolint ----------------------------------------------------------------


def test_hadolint_reports_nothing() -> None:
    hadolint = find_tool("hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


# kubernetes-validate -----------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "newest")
def test_manifests_validate_strictly(version: str | None) -> None:
    validate = find_tool("kubernetes-validate")
    files = [str(p.relative_to(ROOT)) for p in manifest_files()]
    assert files, "no manifests in k8s/"
    argv = [validate, "--strict", "--quiet", *(["--kubernetes-version", version] if version else []), *files]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)
    output = result.stdout + result.stderr
    # A WARN is a resource it could not check (an unknown kind or apiVersion): not good enough here.
    assert result.returncode == 0 and "ERROR" not in output and "WARN" not in output, output


# checkov -----------------------------------------------------------------


@pytest.fixture(scope="module")
def checkov_report() -> dict[str, dict[str, Any]]:
    """One checkov run over the Dockerfile and every manifest, by framework: summary, failed, skipped."""
    checkov = find_tool("checkov")
    files = [str(DOCKERFILE.relative_to(ROOT)), *(str(p.relative_to(ROOT)) for p in manifest_files())]
    argv = [checkov, "--framework", "dockerfile", "kubernetes", "--skip-download", "--output", "json"]
    for f in files:
        argv += ["--file", f]
    # No failure exit code: the failures are read from the report (the skip list is CHECKOV_SKIP).
    argv.append("--soft-fail")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout)

    def brief(check: dict[str, Any]) -> dict[str, str]:
        return {
            "id": check["check_id"],
            "name": check["check_name"],
            "resource": check["resource"],
            "file": check["file_path"],
            "reason": (check.get("check_result") or {}).get("suppress_comment") or "",
        }

    return {
        r["check_type"]: {
            "summary": r["summary"],
            "failed": [brief(c) for c in r["results"]["failed_checks"]],
            "skipped": [brief(c) for c in r["results"]["skipped_checks"]],
        }
        for r in (report if isinstance(report, list) else [report])
    }


def test_checkov_scanned_the_dockerfile_and_the_manifests(checkov_report: dict[str, dict[str, Any]]) -> None:
    assert set(checkov_report) == {"dockerfile", "kubernetes"}
    for framework, report in checkov_report.items():
        summary = report["summary"]
        assert summary["parsing_errors"] == 0, (framework, summary)
        assert summary["resource_count"] > 0 and summary["passed"] > 0, (framework, summary)


def test_checkov_finds_nothing_unaccepted(checkov_report: dict[str, dict[str, Any]]) -> None:
    failed = [
        f"{c['id']} {c['name']!r} on {c['resource']} ({c['file']})"
        for report in checkov_report.values()
        for c in report["failed"]
        if c["id"] not in CHECKOV_SKIP
    ]
    assert not failed, "checkov failed checks (fix, or annotate with a reason):\n" + "\n".join(failed)


def test_checkov_skips_are_annotated_with_reasons_and_documented(checkov_report: dict[str, dict[str, Any]]) -> None:
    skipped = [c for report in checkov_report.values() for c in report["skipped"]]
    for check in skipped:
        assert len(check["reason"]) >= 20, f"{check['id']} on {check['resource']}: the skip needs a real reason"
    found = {(c["id"], c["resource"]) for c in skipped}
    assert found == DOCUMENTED_ANNOTATED_SKIPS, "update DOCUMENTED_ANNOTATED_SKIPS and the list in docs/deployment.md"


# kustomization -----------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = kustomization["resources"]
    assert sorted(listed) == sorted(p.name for p in manifest_files())
    images = {i["name"] for i in kustomization.get("images", [])}
    for path in manifest_files():
        for doc in load_docs(path):
            for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                name = container["image"].rsplit(":", 1)[0]
                assert name in images, f"{container['image']}: set its tag/digest in kustomization.yaml images:"


def test_kustomize_build_validates(tmp_path: Path) -> None:
    """What `kubectl apply -k k8s/` would send: it builds, and every object in it validates strictly."""
    validate = find_tool("kubernetes-validate")
    kustomize = shutil.which("kustomize")
    kubectl = shutil.which("kubectl")
    if kustomize:
        argv = [kustomize, "build", str(K8S)]
    elif kubectl:
        argv = [kubectl, "kustomize", str(K8S)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed (kubectl >= 1.14 has `kubectl kustomize`)")
    built = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert built.returncode == 0, built.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(built.stdout) if d]
    assert len(kinds) == sum(len(load_docs(p)) for p in manifest_files())
    out = tmp_path / "built.yaml"
    out.write_text(built.stdout, encoding="utf-8")
    result = subprocess.run(
        [validate, "--strict", "--quiet", str(out)], capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "ERROR" not in output and "WARN" not in output, output


def test_every_resource_is_namespaced_alike(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    namespace = kustomization["namespace"]
    assert ("Namespace", namespace) in objects
    for (kind, name), doc in objects.items():
        if kind != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, f"{kind}/{name}"


# the gateway Deployment --------------------------------------------------


def test_deployment_runs_several_replicas_spread_over_nodes(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = objects["Deployment", "gateway"]
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]
    anti = pod["spec"]["affinity"]["podAntiAffinity"]
    terms = [t["podAffinityTerm"] for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
    terms += anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
    assert any(
        t["topologyKey"] == "kubernetes.io/hostname"
        and labels_match(t["labelSelector"]["matchLabels"], pod["metadata"]["labels"])
        for t in terms
    )
    hpa = objects["HorizontalPodAutoscaler", "gateway"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert 2 <= hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]


def test_probes_hit_the_admin_listener(objects: dict[tuple[str, str], dict[str, Any]], tmp_path: Path) -> None:
    cfg = load_gateway_config(objects, tmp_path)
    container = gateway_container(objects)
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["path"] == "/readyz"
    assert live["path"] == "/healthz"
    assert port_number(container, ready["port"]) == port_number(container, live["port"]) == cfg.admin.listen.port
    # Probes come from the kubelet, outside the pod: the admin listener must not be loopback-only.
    assert cfg.admin.listen.host == "0.0.0.0"
    assert port_number(container, "proxy") == cfg.listen.port != cfg.admin.listen.port


def test_image_command_reads_the_mounted_config(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    container = gateway_container(objects)
    assert container["args"] == ["serve", "--config", CONFIG_PATH]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in objects["Deployment", "gateway"]["spec"]["template"]["spec"]["volumes"]}
    (config_mount,) = (m for m in mounts.values() if m["mountPath"] == str(Path(CONFIG_PATH).parent))
    assert config_mount.get("readOnly") is True and "subPath" not in config_mount  # subPath never sees updates
    assert volumes[config_mount["name"]]["configMap"]["name"] == "gateway-config"


def test_services_proxy_public_admin_cluster_only(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    container = gateway_container(objects)
    pod_labels = objects["Deployment", "gateway"]["spec"]["template"]["metadata"]["labels"]
    proxy, admin = objects["Service", "gateway"], objects["Service", "gateway-admin"]
    assert admin["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not any("nodePort" in p for p in admin["spec"]["ports"])
    assert [port_number(container, p["targetPort"]) for p in admin["spec"]["ports"]] == [
        port_number(container, "admin")
    ]
    assert [port_number(container, p["targetPort"]) for p in proxy["spec"]["ports"]] == [
        port_number(container, "proxy")
    ]
    for service in (proxy, admin):
        assert labels_match(service["spec"]["selector"], pod_labels), service["metadata"]["name"]


def test_selectors_find_their_pods(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    gateway_labels = objects["Deployment", "gateway"]["spec"]["template"]["metadata"]["labels"]
    redis_labels = objects["StatefulSet", "redis"]["spec"]["template"]["metadata"]["labels"]
    for name, doc in workloads(objects):
        assert labels_match(doc["spec"]["selector"]["matchLabels"], doc["spec"]["template"]["metadata"]["labels"]), name
    assert labels_match(objects["PodDisruptionBudget", "gateway"]["spec"]["selector"]["matchLabels"], gateway_labels)
    assert labels_match(objects["NetworkPolicy", "gateway"]["spec"]["podSelector"]["matchLabels"], gateway_labels)
    redis_policy = objects["NetworkPolicy", "redis"]["spec"]
    assert labels_match(redis_policy["podSelector"]["matchLabels"], redis_labels)
    (allowed,) = [peer["podSelector"]["matchLabels"] for rule in redis_policy["ingress"] for peer in rule["from"]]
    assert labels_match(allowed, gateway_labels)
    assert labels_match(objects["Service", "redis"]["spec"]["selector"], redis_labels)


@pytest.mark.parametrize("workload", ["Deployment/gateway", "StatefulSet/redis"])
def test_workloads_are_locked_down(objects: dict[tuple[str, str], dict[str, Any]], workload: str) -> None:
    kind, name = workload.split("/")
    pod = objects[kind, name]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 10000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["runAsNonRoot"] is True, container["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert sc.get("privileged", False) is False, container["name"]
        resources = container["resources"]
        for kind_ in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[kind_]), f"{container['name']}: {kind_}"


def test_gateway_runs_as_the_image_user(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    pod = objects["Deployment", "gateway"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == GATEWAY_UID
    assert gateway_container(objects)["securityContext"]["runAsUser"] == GATEWAY_UID
    assert objects["ServiceAccount", pod["serviceAccountName"]]["automountServiceAccountToken"] is False


def test_shutdown_fits_the_grace_period(objects: dict[tuple[str, str], dict[str, Any]], tmp_path: Path) -> None:
    """preStop sleep (endpoints drop the pod) + SIGTERM drain must end before the kubelet's SIGKILL."""
    cfg = load_gateway_config(objects, tmp_path)
    pod = objects["Deployment", "gateway"]["spec"]["template"]["spec"]
    command = gateway_container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert 3 <= pre_stop <= 15
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + cfg.lifecycle.drain_seconds + 5


# the ConfigMap and the Secret --------------------------------------------


def test_configmap_loads_with_the_deployments_environment(
    objects: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    env = deployment_env(objects, tmp_path)
    known = set(config_mod.ENV_OVERRIDES) | {var + "_FILE" for var in config_mod.FILE_VARIANTS}
    assert set(env) <= known, f"unknown GATEWAY_* variables: {set(env) - known}"
    secrets_from = {"GATEWAY_REDIS_URL_FILE", "GATEWAY_REDIS_CHANNEL_SECRET_FILE", "GATEWAY_ADMIN_TOKENS_FILE"}
    assert secrets_from <= set(env)
    cfg = load_gateway_config(objects, tmp_path)
    assert not cfg.redis.embedded  # the image has no redis-server
    assert cfg.redis.channel_secret is not None
    assert cfg.admin.tokens and all(t.hash.startswith("$argon2id$") for t in cfg.admin.tokens)
    assert cfg.routes
    assert cfg.logging.format == "json"
    # The file alone (no Secret) must carry no secret and no Redis address.
    bare = yaml.safe_load(gateway_yaml(objects))
    assert "url" not in (bare.get("redis") or {}) and "channel_secret" not in (bare.get("redis") or {})
    assert not bare["admin"]["tokens"]


def test_check_config_command_accepts_it(objects: dict[tuple[str, str], dict[str, Any]], tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_yaml(objects), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(deployment_env(objects, tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": ok (" in result.stdout


def test_secret_placeholders_are_marked(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    for key, value in secret_values(objects, "gateway-secrets").items():
        assert "CHANGE-ME" in value, f"gateway-secrets {key}: placeholder must say CHANGE-ME"


# Redis -------------------------------------------------------------------


def test_bundled_redis_persists_every_write(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    conf = objects["ConfigMap", "redis-config"]["data"]["redis.conf"]
    settings = dict(line.split(None, 1) for line in conf.splitlines() if line.strip() and not line.startswith("#"))
    assert settings["appendonly"] == "yes"
    assert settings["appendfsync"] == "always"
    assert settings["maxmemory-policy"] == "noeviction"
    statefulset = objects["StatefulSet", "redis"]
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == settings["dir"]
    service = objects["Service", "redis"]
    assert service["spec"]["clusterIP"] == "None" and statefulset["spec"]["serviceName"] == "redis"
    # The password never reaches the process arguments or an environment variable.
    assert "--requirepass" not in " ".join(container["command"] + container.get("args", []))
    assert "env" not in container


def test_redis_url_points_at_the_bundled_redis(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    values = secret_values(objects, "gateway-secrets")
    url = urlsplit(values["redis-url"])
    assert url.scheme == "redis" and url.hostname == "redis" and url.port == 6379
    assert url.password == values["redis-password"]
    assert re.fullmatch(r"[A-Za-z0-9-]{32,}", values["redis-password"]), "URL-safe, long"


# Dockerfile --------------------------------------------------------------


def dockerfile_stages() -> list[list[str]]:
    """Instructions (continuation lines joined, comments dropped), grouped by FROM."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw.strip())
        pending = ""
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_dockerfile_final_stage() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build in one, run in another"
    final = stages[-1]
    assert final[0].split()[1] == "python:3.11-slim"
    assert any(line.startswith("COPY --from=") and "/opt/venv" in line for line in final)
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] == str(GATEWAY_UID), "numeric non-root USER"
    assert not any(re.search(r"\b(apt-get|apk|gcc|build-essential|pip install)\b", line) for line in final)
    instructions = {line.split()[0]: line for line in final}
    assert json.loads(instructions["ENTRYPOINT"].split(None, 1)[1]) == ["gateway"]
    assert json.loads(instructions["CMD"].split(None, 1)[1]) == ["serve", "--config", CONFIG_PATH]
    assert set(instructions["EXPOSE"].split()[1:]) == {"8080", "8081"}
    assert "/healthz" in instructions["HEALTHCHECK"] and "8081" in instructions["HEALTHCHECK"]
    env = " ".join(line for line in final if line.startswith("ENV "))
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env


def test_dockerignore_lets_in_only_what_the_build_copies() -> None:
    rules = [r.strip() for r in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()]
    rules = [r for r in rules if r and not r.startswith("#")]
    assert rules[0] == "*", "allow-list: everything out, then the package back in"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = set()
    for stage in dockerfile_stages():
        for line in stage:
            if line.startswith("COPY ") and "--from=" not in line:
                copied.update(line.split()[1:-1])
    assert copied == allowed, (copied, allowed)
