"""The Kubernetes manifests in k8s/: valid against the API's schemas, and holding what a reviewer
checks by hand (non-root pods with limits, settings from one ConfigMap, ports that agree, network
policies that let each pod reach what it calls and nothing else)."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from shared.settings import Env

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# A KEDA custom resource: no schema in the validator, checked on its own below.
KEDA_SCALED_OBJECT = K8S / "keda" / "scaledobject.yaml"
EXAMPLE_SECRET = K8S / "secret.example.yaml"
# Applied apart, by choice, and outside the namespace: checked on their own below.
EXAMPLES = K8S / "examples"
CLOUDNATIVEPG_EXAMPLE = EXAMPLES / "cloudnativepg.yaml"
# Prometheus rule files and their promtool tests live there beside Kubernetes objects: files that
# hold no object are not manifests (anywhere else, such a file fails validation).
MONITORING = K8S / "monitoring"
# The API groups of the custom resources in k8s/: the validator has no schema for them, so each is
# checked by a test of its own here (or, for the Prometheus Operator's, by the rule tests).
CUSTOM_RESOURCE_GROUPS = ("keda.sh", "postgresql.cnpg.io", "monitoring.coreos.com")
# Kustomize components applied on top of k8s/ by choice: built and checked below, not part of the
# default objects.
OPTIONS = K8S / "options"
SHARED_VOLUME = OPTIONS / "shared-volume"
PROVIDER_EGRESS = OPTIONS / "provider-egress"
# The oldest Kubernetes these manifests are meant for, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.30", "1.37")

NAMESPACE = "renderflow"
CONFIGMAP = "renderflow-config"
# Each Renderflow Deployment and the module its container runs (`python -m ...`).
ENTRY_POINTS = {
    "metadata": "services.metadata",
    "imagefetch": "services.imagefetch",
    "generation": "services.generation",
    "worker": "services.generation.worker",
    "gateway": "gateway",
}
# The settings each of those processes builds from its environment.
SETTINGS_CLASSES = {
    "metadata": "services.metadata.config:Settings",
    "imagefetch": "services.imagefetch.config:Settings",
    "generation": "services.generation.config:Settings",
    "worker": "services.generation.config:WorkerSettings",
    "gateway": "gateway.config:Settings",
}
GRPC_SERVICES = ("metadata", "imagefetch", "generation")
WITH_DATABASE = ("metadata", "generation", "worker")
WITH_ARTIFACTS = ("generation", "worker")
SERVICE_TOKEN = "RENDERFLOW_SERVICE_TOKEN"
OBJECT_STORE_SECRET = "renderflow-object-store"
OBJECT_STORE_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
ARTIFACT_CLAIM = "renderflow-artifacts"

Manifest = dict[str, Any]


def _documents(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _example_secrets() -> dict[str, Manifest]:
    """The Secrets made out of band, as the example shows them, by name."""
    return {secret["metadata"]["name"]: secret for secret in _documents(EXAMPLE_SECRET)}


def _secret_value(reference: Manifest) -> str:
    """The example's value of a `secretKeyRef` (which must name a Secret and key it has)."""
    value: str = _example_secrets()[reference["name"]]["stringData"][reference["key"]]
    return value


def _holds_objects(path: Path) -> bool:
    # By the text, not the parsed YAML: these files are others' business, checked by their tests.
    if MONITORING not in path.parents:
        return True
    return re.search(r"^apiVersion:", path.read_text(), re.MULTILINE) is not None


def _object_files() -> list[Path]:
    """Every file of Kubernetes objects under k8s/ (kustomizations are not objects, nor are the
    options' patches)."""
    return sorted(
        path
        for path in K8S.rglob("*.yaml")
        if path.name != "kustomization.yaml" and OPTIONS not in path.parents and _holds_objects(path)
    )


def _group(doc: Manifest) -> str:
    """The API group of an object (empty for the core group)."""
    group, _, _ = str(doc.get("apiVersion", "")).rpartition("/")
    return group


def _is_custom_resource(doc: Manifest) -> bool:
    return _group(doc) in CUSTOM_RESOURCE_GROUPS


class Cluster:
    """Every object of k8s/, looked up by kind and name."""

    def __init__(self, objects: list[Manifest]) -> None:
        self.objects = objects

    def get(self, kind: str, name: str) -> Manifest:
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
        return found[0]

    def all(self, kind: str) -> list[Manifest]:
        return [o for o in self.objects if o["kind"] == kind]

    def deployments_selected_by(self, selector: dict[str, str]) -> list[Manifest]:
        return [
            d
            for d in self.all("Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]

    @property
    def settings(self) -> dict[str, str]:
        data: dict[str, str] = self.get("ConfigMap", CONFIGMAP)["data"]
        return data


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    """What `kubectl apply -k k8s` makes, and the objects made out of band in the namespace (the
    example Secrets, the dashboards): no custom resource, nothing of examples/."""
    return Cluster(
        [
            doc
            for path in _object_files()
            if EXAMPLES not in path.parents
            for doc in _documents(path)
            if not _is_custom_resource(doc)
        ]
    )


# The merge key of each list the options' strategic-merge patches reach, as Kubernetes declares it
# (patchMergeKey); any other list a patch holds replaces the original, as in kustomize.
MERGE_KEYS = {"containers": "name", "env": "name", "volumes": "name", "volumeMounts": "mountPath"}


def _merge(original: Manifest, patch: Manifest) -> Manifest:
    """`original` with a strategic-merge `patch` applied (a null removes the key)."""
    merged = dict(original)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(original.get(key), dict):
            merged[key] = _merge(original[key], value)
        elif key in MERGE_KEYS and isinstance(original.get(key), list):
            items = {item[MERGE_KEYS[key]]: item for item in original[key]}
            for item in value:
                name = item[MERGE_KEYS[key]]
                items[name] = _merge(items[name], item) if name in items else item
            merged[key] = list(items.values())
        else:
            merged[key] = value
    return merged


def _with_component(cluster: Cluster, directory: Path) -> Cluster:
    """The objects of k8s/ with the kustomize component in `directory` applied, as kustomize
    builds them (the tests run no process, hence no kustomize)."""
    (component,) = _documents(directory / "kustomization.yaml")
    assert (component["apiVersion"], component["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")
    objects = list(cluster.objects)
    objects += [doc for name in component.get("resources", []) for doc in _documents(directory / name)]
    for patch in component.get("patches", []):
        assert set(patch) == {"path"}, "only strategic-merge patches in files are built here"
        for doc in _documents(directory / patch["path"]):
            target = Cluster(objects).get(doc["kind"], doc["metadata"]["name"])
            objects[objects.index(target)] = _merge(target, doc)
    return Cluster(objects)


@pytest.fixture(scope="module")
def shared_volume(cluster: Cluster) -> Cluster:
    return _with_component(cluster, SHARED_VOLUME)


def _pod(deployment: Manifest) -> Manifest:
    pod: Manifest = deployment["spec"]["template"]["spec"]
    return pod


def _container(deployment: Manifest) -> Manifest:
    """The one container of a Renderflow Deployment (no sidecars here)."""
    containers = _pod(deployment)["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    container: Manifest = containers[0]
    return container


def _containers(deployment: Manifest) -> Iterator[Manifest]:
    pod = _pod(deployment)
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def _container_port(deployment: Manifest, port: int | str) -> int:
    """The container port a Service targetPort or a probe port (number or name) reaches."""
    for container in _containers(deployment):
        for declared in container.get("ports", []):
            if port in (declared["containerPort"], declared.get("name")):
                number: int = declared["containerPort"]
                return number
    raise AssertionError(f"{deployment['metadata']['name']} declares no container port {port!r}")


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _service_target(cluster: Cluster, name: str, port: int) -> int:
    """The container port that the Service `name` sends its `port` to."""
    service = cluster.get("Service", name)
    matching = [p for p in service["spec"]["ports"] if p["port"] == port]
    assert matching, f"Service {name} has no port {port}"
    (deployment,) = cluster.deployments_selected_by(service["spec"]["selector"])
    return _container_port(deployment, matching[0].get("targetPort", port))


def _invalid(objects: list[Manifest], version: str) -> list[str]:
    """What the API's schemas of `version` reject in `objects`, strictly (custom resources aside:
    the validator knows none)."""
    problems: list[str] = []
    for doc in objects:
        if _is_custom_resource(doc):
            continue
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            problems.append(f"{name}: {where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(f"{name}: {error.message}")
    return problems


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", _object_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid_for_kubernetes(path: Path, version: str) -> None:
    """Strict: an unknown or misspelt field fails, as it would be dropped silently by kubectl."""
    assert _invalid(_documents(path), version) == []


def test_kustomization_applies_every_manifest_but_the_example_secret() -> None:
    """Every file of k8s/ itself; the subfolders (KEDA, examples, options, monitoring) are applied
    apart, by choice."""
    (kustomization,) = _documents(K8S / "kustomization.yaml")
    expected = sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml" and p != EXAMPLE_SECRET
    )
    assert sorted(kustomization["resources"]) == expected


def test_every_object_lives_in_the_renderflow_namespace(cluster: Cluster) -> None:
    cluster.get("Namespace", NAMESPACE)
    elsewhere = [
        f"{o['kind']}/{o['metadata']['name']}"
        for o in cluster.objects
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != NAMESPACE
    ]
    assert elsewhere == []


def test_every_container_runs_as_non_root_read_only_with_limits(cluster: Cluster) -> None:
    problems: list[str] = []
    for deployment in cluster.all("Deployment"):
        pod = _pod(deployment)
        pod_context = pod.get("securityContext", {})
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{deployment['metadata']['name']}: mounts a service account token")
        if pod_context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{deployment['metadata']['name']}: no RuntimeDefault seccomp profile")
        for container in _containers(deployment):
            where = f"{deployment['metadata']['name']}/{container['name']}"
            context = {**pod_context, **container.get("securityContext", {})}
            if context.get("runAsNonRoot") is not True or context.get("runAsUser") == 0:
                problems.append(f"{where}: may run as root")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allows privilege escalation")
            if context.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{where}: keeps capabilities")
            if context.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: writable root filesystem")
            for bound in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(container.get("resources", {}).get(bound, {}))
                if missing:
                    problems.append(f"{where}: no {bound} for {sorted(missing)}")
            resources = container.get("resources", {})
            for resource in ("cpu", "memory"):
                request = _quantity(resources.get("requests", {}).get(resource, "0"))
                if request > _quantity(resources.get("limits", {}).get(resource, "0")):
                    problems.append(f"{where}: {resource} requested above its limit")
    assert problems == []


QUANTITY_SUFFIXES = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def _quantity(value: str | int) -> float:
    """A Kubernetes resource quantity (`250m`, `"1"`, `512Mi`) as a number."""
    parsed = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(value))
    assert parsed is not None, f"not a quantity: {value!r}"
    return float(parsed.group(1)) * QUANTITY_SUFFIXES[parsed.group(2)]


def test_renderflow_pods_run_as_the_image_user_with_a_writable_tmp(cluster: Cluster) -> None:
    """The read-only root leaves /tmp (RENDERFLOW_RUN_DIR) as the only scratch space."""
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert user is not None, "the Dockerfile must name a numeric USER uid:gid"
    assert cluster.settings["RENDERFLOW_RUN_DIR"].startswith("/tmp/")
    for name in ENTRY_POINTS:
        deployment = cluster.get("Deployment", name)
        context = _pod(deployment)["securityContext"]
        assert (str(context["runAsUser"]), str(context["runAsGroup"])) == user.groups(), name
        volumes = {v["name"]: v for v in _pod(deployment)["volumes"]}
        (tmp,) = [m for m in _container(deployment)["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert "emptyDir" in volumes[tmp["name"]], name


def test_renderflow_deployments_take_their_settings_from_the_configmap(cluster: Cluster) -> None:
    # The real Secrets are made out of band; the example names their names and keys.
    for name, module in ENTRY_POINTS.items():
        container = _container(cluster.get("Deployment", name))
        assert container["image"].split(":")[0] == "renderflow", name
        assert container["command"] == ["python", "-m", module], name
        assert {"configMapRef": {"name": CONFIGMAP}} in container["envFrom"], name
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["OTEL_SERVICE_NAME"]["value"] == name
        if name in WITH_DATABASE:
            reference = env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
            assert reference["name"] == "renderflow-database", name
            _secret_value(reference)
        else:
            assert "DATABASE_URL" not in env, f"{name} has no database and must not get its URL"
        # A setting lives in the ConfigMap or in one pod, never both: no override to hunt for.
        assert not set(env) & set(cluster.settings), name


@pytest.mark.parametrize("module", ENTRY_POINTS.values())
def test_every_command_names_a_runnable_module(module: str) -> None:
    """`python -m` runs a package's __main__, or the module itself (which then has a __main__ guard)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None, module
    if spec.submodule_search_locations is not None:
        assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{module} has no __main__"
    else:
        assert spec.origin is not None
        assert 'if __name__ == "__main__":' in Path(spec.origin).read_text(), module


def _environment(cluster: Cluster, name: str) -> dict[str, str]:
    """What the container of Deployment `name` finds in its environment: ConfigMap, literal env
    and the example Secrets' keys."""
    environ = dict(cluster.settings)
    for variable in _container(cluster.get("Deployment", name)).get("env", []):
        if "value" in variable:
            environ[variable["name"]] = variable["value"]
        else:
            environ[variable["name"]] = _secret_value(variable["valueFrom"]["secretKeyRef"])
    return environ


def _settings(cluster: Cluster, name: str) -> Any:
    """The settings the component of Deployment `name` reads from its environment."""
    module, _, class_name = SETTINGS_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), class_name).from_env(Env(_environment(cluster, name)))


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_each_component_accepts_the_environment_of_its_pod(cluster: Cluster, name: str) -> None:
    """ConfigMap, literal env and the Secrets' keys, read by the component's own settings loader."""
    environ = _environment(cluster, name)
    settings = _settings(cluster, name)
    if name in GRPC_SERVICES:
        assert settings.listen == environ[f"RENDERFLOW_{name.upper()}_LISTEN"]
    if name in WITH_ARTIFACTS:
        assert settings.artifact_s3.bucket == environ["RENDERFLOW_ARTIFACT_S3_BUCKET"]
    assert settings.service_token == environ[SERVICE_TOKEN]


def test_every_container_gets_the_service_token_from_its_secret(cluster: Cluster) -> None:
    """The services refuse calls without it, and a process without it does not start."""
    assert SERVICE_TOKEN not in cluster.settings, "a secret does not belong in the ConfigMap"
    for name in ENTRY_POINTS:
        for container in _containers(cluster.get("Deployment", name)):
            env = {e["name"]: e for e in container.get("env", [])}
            reference = env[SERVICE_TOKEN]["valueFrom"]["secretKeyRef"]
            assert reference == {"name": "renderflow-service-token", "key": SERVICE_TOKEN}, name


def test_the_example_secrets_hold_placeholders_not_secrets() -> None:
    secrets = _example_secrets()
    assert sorted(secrets) == ["renderflow-database", OBJECT_STORE_SECRET, "renderflow-service-token"]
    url = urlsplit(secrets["renderflow-database"]["stringData"]["DATABASE_URL"])
    assert url.password is not None and "PLACEHOLDER" in url.password
    assert url.hostname is not None and url.hostname.endswith(".invalid")
    assert "PLACEHOLDER" in secrets["renderflow-service-token"]["stringData"][SERVICE_TOKEN]
    for key in OBJECT_STORE_KEYS:
        assert "PLACEHOLDER" in secrets[OBJECT_STORE_SECRET]["stringData"][key], key
    assert "EXAMPLE ONLY" in EXAMPLE_SECRET.read_text().splitlines()[0]


def test_services_target_declared_container_ports(cluster: Cluster) -> None:
    for service in cluster.all("Service"):
        name = service["metadata"]["name"]
        selected = cluster.deployments_selected_by(service["spec"]["selector"])
        assert [d["metadata"]["name"] for d in selected] == [name], f"Service {name} selects {selected}"
        for port in service["spec"]["ports"]:
            _container_port(selected[0], port.get("targetPort", port["port"]))


def test_configmap_addresses_reach_the_services_and_listeners(cluster: Cluster) -> None:
    settings = cluster.settings
    for name in GRPC_SERVICES:
        host, port = _host_port(settings[f"RENDERFLOW_{name.upper()}_ADDR"])
        listen_host, listen_port = _host_port(settings[f"RENDERFLOW_{name.upper()}_LISTEN"])
        assert host == name
        assert listen_host == "0.0.0.0"
        assert _service_target(cluster, name, port) == listen_port
        assert _container_port(cluster.get("Deployment", name), "grpc") == listen_port

    gateway_port = int(settings["RENDERFLOW_GATEWAY_PORT"])
    assert settings["RENDERFLOW_GATEWAY_HOST"] == "0.0.0.0"
    assert _container_port(cluster.get("Deployment", "gateway"), "http") == gateway_port
    assert _service_target(cluster, "gateway", gateway_port) == gateway_port

    cache = urlsplit(settings["RENDERFLOW_CACHE_URL"])
    assert cache.scheme == "redis" and cache.hostname and cache.port
    assert _service_target(cluster, cache.hostname, cache.port) == 6379

    otlp = urlsplit(settings["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert otlp.hostname and otlp.port
    collector = yaml.safe_load(cluster.get("ConfigMap", "otel-collector-config")["data"]["config.yaml"])
    _, receiver_port = _host_port(collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])
    assert _service_target(cluster, otlp.hostname, otlp.port) == receiver_port


def test_prometheus_scrapes_every_process_where_it_serves_metrics(cluster: Cluster) -> None:
    settings = cluster.settings
    assert settings["RENDERFLOW_METRICS_HOST"] == "0.0.0.0"
    for name in ENTRY_POINTS:
        deployment = cluster.get("Deployment", name)
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", name
        assert annotations["prometheus.io/path"] == "/metrics", name
        port = int(annotations["prometheus.io/port"])
        env = {e["name"]: e.get("value") for e in _container(deployment).get("env", [])}
        served = settings["RENDERFLOW_GATEWAY_PORT"] if name == "gateway" else env["RENDERFLOW_METRICS_PORT"]
        assert port == int(served), name
        assert _container_port(deployment, port) == port, name


def _collector_config(cluster: Cluster) -> Manifest:
    config: Manifest = yaml.safe_load(
        cluster.get("ConfigMap", "otel-collector-config")["data"]["config.yaml"]
    )
    return config


def test_traces_are_sampled_whole_in_the_collector(cluster: Cluster) -> None:
    """Every span leaves the services, and the collector keeps whole traces: every one with an
    error, every slow one, and a share of the rest."""
    settings = cluster.settings
    assert settings["OTEL_TRACES_SAMPLER"] == "parentbased_always_on"
    assert "OTEL_TRACES_SAMPLER_ARG" not in settings, "no ratio applies at the source"
    collector = _container(cluster.get("Deployment", "otel-collector"))
    # tail_sampling is in the contrib distribution only.
    assert collector["image"].startswith("otel/opentelemetry-collector-contrib:")
    config = _collector_config(cluster)
    pipelines = config["service"]["pipelines"]
    # After the memory limiter, which must see data first; before batching, which would split traces.
    assert pipelines["traces"]["processors"] == ["memory_limiter", "tail_sampling", "batch"]
    for signal in ("metrics", "logs"):
        assert "tail_sampling" not in pipelines[signal]["processors"], signal
    policies = {p["type"]: p for p in config["processors"]["tail_sampling"]["policies"]}
    assert sorted(policies) == ["latency", "probabilistic", "status_code"]
    assert policies["status_code"]["status_code"]["status_codes"] == ["ERROR"]
    assert 0 < policies["latency"]["latency"]["threshold_ms"] <= 1000
    assert 0 < policies["probabilistic"]["probabilistic"]["sampling_percentage"] < 100


def test_collector_pipelines_use_only_configured_components(cluster: Cluster) -> None:
    config = _collector_config(cluster)
    for pipeline, stages in config["service"]["pipelines"].items():
        for section in ("receivers", "processors", "exporters"):
            unknown = set(stages.get(section, [])) - set(config.get(section, {}))
            assert not unknown, f"{pipeline} uses undefined {section} {unknown}"
    _, health_port = _host_port(config["extensions"]["health_check"]["endpoint"])
    collector = cluster.get("Deployment", "otel-collector")
    for probe in ("readinessProbe", "livenessProbe"):
        assert _container_port(collector, _container(collector)[probe]["httpGet"]["port"]) == health_port


def test_grpc_services_use_native_grpc_probes(cluster: Cluster) -> None:
    for name in GRPC_SERVICES:
        deployment = cluster.get("Deployment", name)
        container = _container(deployment)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == _container_port(deployment, "grpc"), (name, probe)


def test_gateway_probes_liveness_on_healthz_and_readiness_on_readyz(cluster: Cluster) -> None:
    deployment = cluster.get("Deployment", "gateway")
    container = _container(deployment)
    http_port = _container_port(deployment, "http")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"]["path"] == path
        assert _container_port(deployment, container[probe]["httpGet"]["port"]) == http_port


def test_gateway_scales_on_cpu_and_keeps_one_pod_through_disruptions(cluster: Cluster) -> None:
    gateway = cluster.get("Deployment", "gateway")
    hpa = cluster.get("HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in gateway["spec"], "the HPA owns the gateway's replica count"
    pdb = cluster.get("PodDisruptionBudget", "gateway")
    assert pdb["spec"]["selector"]["matchLabels"] == gateway["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["minAvailable"] >= 1


def test_workers_have_time_to_drain_and_leave_one_at_a_time(cluster: Cluster) -> None:
    worker = cluster.get("Deployment", "worker")
    period = _pod(worker)["terminationGracePeriodSeconds"]
    assert period >= 60
    # Renders get most of the period; what is left hands back jobs, closes the pool, flushes traces.
    env = {e["name"]: e for e in _container(worker)["env"]}
    assert 0 < float(env["RENDERFLOW_WORKER_DRAIN_GRACE_S"]["value"]) <= period - 10
    assert "replicas" not in worker["spec"], "KEDA (or kubectl scale) owns the worker count"
    assert [port["name"] for port in _container(worker)["ports"]] == ["metrics"], "it serves nothing else"
    pdb = cluster.get("PodDisruptionBudget", "worker")
    assert pdb["spec"]["selector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1


def test_workers_and_generation_store_outputs_in_one_bucket(cluster: Cluster) -> None:
    """Workers write what generation serves: both read the bucket from the ConfigMap, and its keys
    from one Secret, optional for pods that get a role instead. Nothing else gets the keys."""
    assert cluster.settings["RENDERFLOW_ARTIFACT_S3_BUCKET"]
    assert "RENDERFLOW_ARTIFACT_DIR" not in cluster.settings, "outputs are not files by default"
    assert not set(OBJECT_STORE_KEYS) & set(cluster.settings), "a secret does not belong in the ConfigMap"
    assert cluster.all("PersistentVolumeClaim") == [], "no volume is shared by default"
    stores = []
    for name in ENTRY_POINTS:
        deployment = cluster.get("Deployment", name)
        env = {e["name"]: e for e in _container(deployment).get("env", [])}
        if name not in WITH_ARTIFACTS:
            assert not set(OBJECT_STORE_KEYS) & set(env), f"{name} stores no output and needs no keys"
            continue
        assert not [e for e in env if e.startswith("RENDERFLOW_ARTIFACT_")], f"{name} overrides the bucket"
        for key in OBJECT_STORE_KEYS:
            reference = env[key]["valueFrom"]["secretKeyRef"]
            assert reference == {"name": OBJECT_STORE_SECRET, "key": key, "optional": True}, name
        assert [v for v in _pod(deployment)["volumes"] if "persistentVolumeClaim" in v] == [], name
        store = _settings(cluster, name).artifact_s3
        assert store is not None, name
        assert store.access_key_id == _secret_value(
            {"name": OBJECT_STORE_SECRET, "key": OBJECT_STORE_KEYS[0]}
        )
        stores.append(store)
    assert stores[0] == stores[1], "generation and the workers see different buckets"


@pytest.mark.parametrize("option", [SHARED_VOLUME, PROVIDER_EGRESS], ids=lambda p: p.name)
def test_each_option_lists_its_files(option: Path) -> None:
    (component,) = _documents(option / "kustomization.yaml")
    listed = component.get("resources", []) + [patch["path"] for patch in component.get("patches", [])]
    assert sorted(listed) == sorted(p.name for p in option.glob("*.yaml") if p.name != "kustomization.yaml")


def test_no_option_is_applied_by_default() -> None:
    """The bucket is the default, and workers reach no provider."""
    (kustomization,) = _documents(K8S / "kustomization.yaml")
    assert "components" not in kustomization
    assert sorted(p.name for p in OPTIONS.iterdir()) == sorted([SHARED_VOLUME.name, PROVIDER_EGRESS.name])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_shared_volume_option_builds_valid_objects(shared_volume: Cluster, version: str) -> None:
    assert _invalid(shared_volume.objects, version) == []


def test_the_shared_volume_option_keeps_outputs_on_one_readwritemany_claim(shared_volume: Cluster) -> None:
    """Workers and generation, possibly on different nodes, mount one claim where outputs are
    stored, and no bucket is left set: it would take precedence over the directory."""
    claim = shared_volume.get("PersistentVolumeClaim", ARTIFACT_CLAIM)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    settings = shared_volume.settings
    assert not [key for key in settings if key.startswith("RENDERFLOW_ARTIFACT_S3_")]
    artifact_dir = settings["RENDERFLOW_ARTIFACT_DIR"]
    for name in WITH_ARTIFACTS:
        deployment = shared_volume.get("Deployment", name)
        volumes = {v["name"]: v for v in _pod(deployment)["volumes"]}
        (mount,) = [m for m in _container(deployment)["volumeMounts"] if m["mountPath"] == artifact_dir]
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == ARTIFACT_CLAIM, name
        assert not mount.get("readOnly"), name
        assert "emptyDir" in volumes["tmp"], f"{name} keeps its scratch space"
        loaded = _settings(shared_volume, name)
        assert loaded.artifact_s3 is None, name
        assert str(loaded.artifact_dir) == artifact_dir, name


def test_keda_scales_workers_on_queue_depth_per_worker_slot(cluster: Cluster) -> None:
    (scaled,) = _documents(KEDA_SCALED_OBJECT)
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    assert scaled["metadata"]["namespace"] == NAMESPACE
    worker = cluster.get("Deployment", "worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    env = {e["name"] for e in _container(worker)["env"]}
    assert trigger["metadata"]["connectionFromEnv"] in env
    # One pod per RENDERFLOW_WORKER_CONCURRENCY jobs: the query's divisor is that setting.
    divisor = re.fullmatch(
        r"SELECT ceil\(count\(\*\)::numeric / (\d+)\) FROM generation\.jobs WHERE state <> 'waiting'",
        trigger["metadata"]["query"],
    )
    assert divisor is not None, trigger["metadata"]["query"]
    assert divisor.group(1) == cluster.settings["RENDERFLOW_WORKER_CONCURRENCY"]
    assert trigger["metadata"]["targetQueryValue"] == "1"


# --- Network policies -------------------------------------------------------------------------
# A small model of NetworkPolicy semantics (matchLabels selectors, ipBlocks, ports by number or
# name): a connection is allowed when the policies of its source's namespace let it out and those
# of its destination's let it in; a pod no policy selects for a direction is not isolated.

NETWORK_POLICIES = K8S / "network-policies.yaml"
# The address the policies hold for the object store until it is set (a documentation range).
OBJECT_STORE_PLACEHOLDER = "192.0.2.10"
PROMETHEUS_NAMESPACE = "monitoring"
POSTGRES_PORT = 5432
HTTPS, HTTP = 443, 80
PUBLIC_ADDRESSES = ("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c")
PRIVATE_ADDRESSES = ("10.12.0.7", "172.20.1.1", "192.168.1.10", "100.64.0.1", "169.254.169.254", "fd00::1")


@dataclass(frozen=True)
class Endpoint:
    """One end of a connection: a pod (its namespace and labels) or an address outside the cluster."""

    name: str
    namespace: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)
    address: str = ""


def _outside(address: str) -> Endpoint:
    return Endpoint(address, address=address)


def _pod_of(cluster: Cluster, name: str) -> Endpoint:
    """The pods of Deployment `name`, with the labels of their namespace."""
    deployment = cluster.get("Deployment", name)
    namespace = cluster.get("Namespace", NAMESPACE)
    ports = {p["name"]: p["containerPort"] for c in _containers(deployment) for p in c.get("ports", [])}
    return Endpoint(
        name,
        NAMESPACE,
        deployment["spec"]["template"]["metadata"]["labels"],
        {**namespace["metadata"].get("labels", {}), "kubernetes.io/metadata.name": NAMESPACE},
        ports,
    )


def _pod_elsewhere(name: str, namespace: str, labels: Mapping[str, str] | None = None) -> Endpoint:
    return Endpoint(name, namespace, labels or {}, {"kubernetes.io/metadata.name": namespace})


KUBE_DNS = _pod_elsewhere("kube-dns", "kube-system", {"k8s-app": "kube-dns"})
PROMETHEUS = _pod_elsewhere("prometheus", PROMETHEUS_NAMESPACE, {"app.kubernetes.io/name": "prometheus"})


def _selects(selector: Manifest, labels: Mapping[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"the model knows matchLabels only: {selector}"
    matched: bool = selector.get("matchLabels", {}).items() <= labels.items()
    return matched


def _policy_types(policy: Manifest) -> list[str]:
    spec = policy["spec"]
    return list(spec.get("policyTypes", ["Ingress", *(["Egress"] if "egress" in spec else [])]))


def _peer_matches(peer: Manifest, other: Endpoint, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        if not other.address:
            return False  # pod addresses in an ipBlock are the network plugin's business: not relied on
        address = ipaddress.ip_address(other.address)
        block = peer["ipBlock"]
        excepted = any(address in ipaddress.ip_network(cidr) for cidr in block.get("except", []))
        return address in ipaddress.ip_network(block["cidr"]) and not excepted
    if other.address:
        return False
    if "namespaceSelector" in peer:
        in_namespace = _selects(peer["namespaceSelector"], other.namespace_labels)
    else:
        in_namespace = other.namespace == policy_namespace
    return in_namespace and _selects(peer.get("podSelector", {}), other.labels)


def _port_matches(entry: Manifest, protocol: str, port: int, named: Mapping[str, int]) -> bool:
    if entry.get("protocol", "TCP") != protocol:
        return False
    if "port" not in entry:
        return True
    first: int = named.get(entry["port"], -1) if isinstance(entry["port"], str) else entry["port"]
    last: int = entry.get("endPort", first)
    return first <= port <= last


def _lets(
    policies: list[Manifest], pod: Endpoint, other: Endpoint, direction: str, protocol: str, port: int
) -> bool:
    """Whether the policies selecting `pod` let traffic through in `direction` (Ingress: from
    `other` to `pod`'s `port`; Egress: from `pod` to `other`'s)."""
    if pod.address:
        return True  # outside the cluster: no policy of ours
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == pod.namespace
        and direction in _policy_types(p)
        and _selects(p["spec"]["podSelector"], pod.labels)
    ]
    if not selecting:
        return True
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    destination = pod if direction == "Ingress" else other
    for policy in selecting:
        for rule in policy["spec"].get(rules_key, []):
            namespace = policy["metadata"]["namespace"]
            peers = rule.get(peers_key)
            if peers and not any(_peer_matches(peer, other, namespace) for peer in peers):
                continue
            ports = rule.get("ports")
            if ports and not any(_port_matches(e, protocol, port, destination.ports) for e in ports):
                continue
            return True
    return False


def _allowed(
    policies: list[Manifest], source: Endpoint, destination: Endpoint, port: int, protocol: str = "TCP"
) -> bool:
    return _lets(policies, source, destination, "Egress", protocol, port) and _lets(
        policies, destination, source, "Ingress", protocol, port
    )


def _policies(cluster: Cluster) -> list[Manifest]:
    return cluster.all("NetworkPolicy")


def _deployments(cluster: Cluster) -> list[Endpoint]:
    return [_pod_of(cluster, d["metadata"]["name"]) for d in cluster.all("Deployment")]


def _postgres() -> Endpoint:
    """PostgreSQL's pods, in the namespace of the CloudNativePG example."""
    (db,) = [d for d in _documents(CLOUDNATIVEPG_EXAMPLE) if d["kind"] == "Cluster"]
    labels = {"cnpg.io/cluster": db["metadata"]["name"]}
    return _pod_elsewhere("postgres", db["metadata"]["namespace"], labels)


def _strings(value: Any) -> Iterator[str]:
    """Every string in a settings object, nested settings included."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            yield from _strings(getattr(value, item.name))
    elif isinstance(value, str):
        yield value


def _callees(cluster: Cluster, name: str) -> set[tuple[str, str]]:
    """What the process of Deployment `name` connects to in the namespace, from its own settings:
    (Deployment, port name) for every gRPC service and cache address it holds, plus the collector."""
    settings = cluster.settings
    held = set(_strings(_settings(cluster, name)))
    callees = {("otel-collector", "otlp-grpc")}
    callees |= {(s, "grpc") for s in GRPC_SERVICES if settings[f"RENDERFLOW_{s.upper()}_ADDR"] in held}
    if settings["RENDERFLOW_CACHE_URL"] in held:
        callees.add(("redis", "redis"))
    return callees


def test_network_policies_deny_everything_by_default(cluster: Cluster) -> None:
    (kustomization,) = _documents(K8S / "kustomization.yaml")
    assert NETWORK_POLICIES.name in kustomization["resources"]
    deny = cluster.get("NetworkPolicy", "default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    # No policy opens a whole namespace's pods to everything.
    for policy in _policies(cluster):
        for rule in policy["spec"].get("ingress", []) + policy["spec"].get("egress", []):
            assert rule.get("ports"), f"{policy['metadata']['name']}: a rule without ports"


def test_every_pod_is_selected_by_a_policy_of_its_own(cluster: Cluster) -> None:
    for pod in _deployments(cluster):
        named = [
            p["metadata"]["name"]
            for p in _policies(cluster)
            if p["spec"]["podSelector"] and _selects(p["spec"]["podSelector"], pod.labels)
        ]
        assert pod.name in named, pod.name


def test_every_pod_resolves_names(cluster: Cluster) -> None:
    for pod in _deployments(cluster):
        for protocol in ("UDP", "TCP"):
            assert _allowed(_policies(cluster), pod, KUBE_DNS, 53, protocol), (pod.name, protocol)


def test_pods_reach_exactly_what_they_call_in_the_namespace(cluster: Cluster) -> None:
    """Each Renderflow process reaches the services and cache its settings name, and the collector;
    every other pod-to-pod connection (metrics ports, Redis from a service that has no cache, a
    worker calling generation...) is refused."""
    policies = _policies(cluster)
    pods = _deployments(cluster)
    allowed = {
        (source.name, destination.name, port_name)
        for source in pods
        for destination in pods
        for port_name, port in destination.ports.items()
        if _allowed(policies, source, destination, port)
    }
    expected = {(name, *callee) for name in ENTRY_POINTS for callee in _callees(cluster, name)}
    assert allowed == expected
    # What the policies' header says, derived above from the settings.
    assert ("gateway", "generation", "grpc") in allowed
    assert ("generation", "imagefetch", "grpc") in allowed
    assert ("worker", "imagefetch", "grpc") in allowed
    assert ("worker", "generation", "grpc") not in allowed


def test_only_the_gateway_is_open_to_clients(cluster: Cluster) -> None:
    policies = _policies(cluster)
    client = _outside(PUBLIC_ADDRESSES[0])
    for pod in _deployments(cluster):
        for port_name, port in pod.ports.items():
            reachable = _allowed(policies, client, pod, port)
            assert reachable == (pod.name == "gateway" and port_name == "http"), (pod.name, port_name)


def test_prometheus_scrapes_the_metrics_ports_and_nothing_else(cluster: Cluster) -> None:
    policies = _policies(cluster)
    for pod in _deployments(cluster):
        template = cluster.get("Deployment", pod.name)["spec"]["template"]
        scraped = int(template["metadata"].get("annotations", {}).get("prometheus.io/port", -1))
        for port_name, port in pod.ports.items():
            # The gateway's /metrics is on its public port, open to all.
            assert _allowed(policies, PROMETHEUS, pod, port) == (port == scraped), (pod.name, port_name)


def test_the_database_is_reached_by_its_users_only(cluster: Cluster) -> None:
    postgres = _postgres()
    for pod in _deployments(cluster):
        reachable = _allowed(_policies(cluster), pod, postgres, POSTGRES_PORT)
        assert reachable == (pod.name in WITH_DATABASE), pod.name


def test_the_object_store_is_reached_by_generation_and_workers_only(cluster: Cluster) -> None:
    store = _outside(OBJECT_STORE_PLACEHOLDER)
    for pod in _deployments(cluster):
        reachable = _allowed(_policies(cluster), pod, store, HTTPS)
        # imagefetch reaches every public address, this one among them.
        assert reachable == (pod.name in (*WITH_ARTIFACTS, "imagefetch")), pod.name


def test_only_imagefetch_reaches_the_internet_and_never_private_addresses(cluster: Cluster) -> None:
    policies = _policies(cluster)
    for pod in _deployments(cluster):
        for address in PUBLIC_ADDRESSES:
            for port in (HTTP, HTTPS):
                reachable = _allowed(policies, pod, _outside(address), port)
                assert reachable == (pod.name == "imagefetch"), (pod.name, address, port)
            assert not _allowed(policies, pod, _outside(address), 22), (pod.name, address)
        for address in PRIVATE_ADDRESSES:
            assert not _allowed(policies, pod, _outside(address), HTTPS), (pod.name, address)


@pytest.fixture(scope="module")
def provider_egress(cluster: Cluster) -> Cluster:
    return _with_component(cluster, PROVIDER_EGRESS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_provider_egress_option_builds_valid_objects(provider_egress: Cluster, version: str) -> None:
    assert _invalid(provider_egress.objects, version) == []


def test_the_provider_egress_option_opens_https_to_the_internet_for_workers_only(
    cluster: Cluster, provider_egress: Cluster
) -> None:
    policies = _policies(provider_egress)
    worker = _pod_of(provider_egress, "worker")
    for address in PUBLIC_ADDRESSES:
        assert _allowed(policies, worker, _outside(address), HTTPS), address
        assert not _allowed(policies, worker, _outside(address), HTTP), address
    for address in PRIVATE_ADDRESSES:
        assert not _allowed(policies, worker, _outside(address), HTTPS), address
    for pod in _deployments(provider_egress):
        if pod.name != "worker":
            before = _allowed(_policies(cluster), pod, _outside(PUBLIC_ADDRESSES[0]), HTTPS)
            assert _allowed(policies, pod, _outside(PUBLIC_ADDRESSES[0]), HTTPS) == before, pod.name
    # Without the option, a worker reaches no provider.
    assert not _allowed(_policies(cluster), worker, _outside(PUBLIC_ADDRESSES[0]), HTTPS)


# --- The CloudNativePG example ------------------------------------------------------------------


def test_the_cloudnativepg_example_makes_the_database_renderflow_expects() -> None:
    """Its database and owner are those of DATABASE_URL; its namespace is the one the network
    policies let Renderflow reach on 5432; a pooler, if any, keeps LISTEN working."""
    text = CLOUDNATIVEPG_EXAMPLE.read_text()
    assert "EXAMPLE ONLY" in text.splitlines()[0]
    docs = {doc["kind"]: doc for doc in _documents(CLOUDNATIVEPG_EXAMPLE)}
    assert sorted(docs) == ["Cluster", "Namespace", "Pooler"]
    db = docs["Cluster"]
    assert db["apiVersion"] == "postgresql.cnpg.io/v1"
    assert db["metadata"]["namespace"] == docs["Namespace"]["metadata"]["name"] != NAMESPACE
    assert db["spec"]["instances"] >= 3, "a primary and two replicas"
    assert re.fullmatch(r"\d+(Gi|Ti)", db["spec"]["storage"]["size"])
    url = urlsplit(_example_secrets()["renderflow-database"]["stringData"]["DATABASE_URL"])
    initdb = db["spec"]["bootstrap"]["initdb"]
    assert (initdb["database"], initdb["owner"]) == (url.path.lstrip("/"), url.username)
    # Enough connections for every pool at the autoscaler's maximum (docs/operations.md, "Connections").
    (scaled,) = _documents(KEDA_SCALED_OBJECT)
    assert scaled["spec"]["maxReplicaCount"] == 20
    assert int(db["spec"]["postgresql"]["parameters"]["max_connections"]) >= 224
    pooler = docs["Pooler"]
    assert pooler["metadata"]["namespace"] == db["metadata"]["namespace"]
    assert pooler["metadata"]["name"] != db["metadata"]["name"]
    assert pooler["spec"]["cluster"]["name"] == db["metadata"]["name"]
    assert pooler["spec"]["type"] == "rw"
    assert pooler["spec"]["pgbouncer"]["poolMode"] == "session", "LISTEN needs a session of its own"


def test_the_cloudnativepg_example_holds_only_known_custom_resources() -> None:
    """Its Namespace is checked against the API's schemas with every other file; its Cluster and
    Pooler, which the validator knows nothing of, only here and above."""
    for doc in _documents(CLOUDNATIVEPG_EXAMPLE):
        if doc["kind"] != "Namespace":
            assert _group(doc) == "postgresql.cnpg.io", doc["kind"]
        assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, doc["kind"]
