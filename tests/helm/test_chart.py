"""The Helm chart, offline: rendered by Helm's own engine (helm-python-sdk bundles Helm v4's
Go library), linted strictly, every manifest validated against Kubernetes' schemas, and what
an operator relies on asserted, for the default values and a GPU-heavy example."""

import json
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "gpuhost"
GPU_EXAMPLE = yaml.safe_load((CHART / "examples" / "gpu-cluster.yaml").read_text())
SECRET_VALUES = {
    "databaseUrl": "postgresql+psycopg://gpuhost:s3cret-db@db.internal:5432/gpuhost",
    "redisUrl": "rediss://:s3cret-redis@cache.internal:6380/0",
    "stripeApiKey": "sk_live_s3cret",
    "stripeWebhookSecret": "whsec_s3cret",
    "adminToken": "adm_s3cret",
}
DEFAULTS = {"secrets": {"values": SECRET_VALUES}}
KUBERNETES = ["1.30.0", kubernetes_validate.latest_version()]
CUSTOM_RESOURCES = {"ServiceMonitor", "ScaledObject", "TriggerAuthentication"}


def render_files(values: dict) -> dict[str, list[dict]]:
    """Each template's rendered manifests, by the template's file name."""
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        files = chart.render(values, name="gpuhost", namespace="gpuhost", is_install=True)
    return {
        Path(path).name: [doc for doc in yaml.safe_load_all(text) if doc]
        for path, text in files.items()
        if path.endswith(".yaml")
    }


def render(values: dict) -> list[dict]:
    return [doc for docs in render_files(values).values() for doc in docs]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict], kind: str, name: str) -> dict:
    [found] = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return found


def pod_specs(docs: list[dict]) -> list[dict]:
    return [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")]


@pytest.fixture(scope="module", params=["defaults", "gpu-cluster"])
def case(request) -> tuple[str, dict, list[dict]]:
    values = DEFAULTS if request.param == "defaults" else GPU_EXAMPLE
    return request.param, values, render(values)


def test_lint_strict_is_clean(case):
    _, values, _ = case
    report = helm.lint(CHART, values, strict=True, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert problems == []


@pytest.mark.parametrize("version", KUBERNETES)
def test_every_manifest_is_valid_kubernetes(case, version):
    _, _, docs = case
    checked = 0
    for doc in docs:
        if doc["kind"] in CUSTOM_RESOURCES:
            continue  # CRDs: no schema in Kubernetes; asserted on below
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 12


@pytest.mark.parametrize("values", [DEFAULTS, GPU_EXAMPLE], ids=["defaults", "gpu-cluster"])
def test_one_kind_of_resource_per_template_named_kind_component(values):
    """STYLE.md: one resource per template, `<kind>-<component>.yaml` (a template that ranges
    over the workers renders one of its kind per worker)."""
    rendered = render_files(values)
    assert len(rendered) >= 15
    for name, docs in rendered.items():
        kinds = {doc["kind"] for doc in docs}
        assert len(kinds) <= 1, f"{name} renders {sorted(kinds)}"
        if kinds:
            kind = kinds.pop().lower()
            assert name.startswith(f"{kind}-"), f"{name} holds a {kind}"


def test_workers_get_their_gpus_and_time_to_load(case):
    _, values, docs = case
    resource = values.get("gpuResourceName", "nvidia.com/gpu")
    workers = (
        values.get("workers") or yaml.safe_load((CHART / "values.yaml").read_text())["workers"]
    )
    for worker in workers:
        deployment = named(docs, "Deployment", f"gpuhost-worker-{worker['name']}")
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"][resource] == worker["gpus"] >= 1
        assert container["resources"]["requests"][resource] == worker["gpus"]
        assert container["args"] == ["worker", "--queue", worker["queue"]]
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= worker["startupSeconds"]
        assert container["livenessProbe"]["httpGet"]["port"] == "metrics"
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        tolerations = deployment["spec"]["template"]["spec"].get("tolerations", [])
        assert {"key": resource, "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_gateway_probes_autoscaling_and_disruption_budget(case):
    _, _, docs = case
    [container] = named(docs, "Deployment", "gpuhost-gateway")["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert named(docs, "HorizontalPodAutoscaler", "gpuhost-gateway")["spec"]["minReplicas"] >= 2
    assert named(docs, "PodDisruptionBudget", "gpuhost-gateway")["spec"]["minAvailable"] == 1


def test_gateway_metrics_are_scraped_off_the_published_port():
    docs = render(GPU_EXAMPLE)
    gateway = named(docs, "Deployment", "gpuhost-gateway")["spec"]["template"]
    [container] = gateway["spec"]["containers"]
    env = {v["name"]: v.get("value") for v in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert env["GPUHOST_METRICS_PORT"] == str(ports["metrics"]) != str(ports["http"])
    assert "10.0.0.0/8" in json.loads(env["GPUHOST_TRUSTED_PROXIES"])
    assert gateway["metadata"]["labels"]["gpuhost.dev/metrics"] == "true"  # its NetworkPolicy
    monitor = named(docs, "ServiceMonitor", "gpuhost-gateway")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    service = named(docs, "Service", "gpuhost-gateway")
    assert {p["name"] for p in service["spec"]["ports"]} == {"http", "metrics"}


def test_migrations_run_as_a_hook_after_their_secret(case):
    _, values, docs = case
    job = named(docs, "Job", "gpuhost-migrate")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]
    secrets = of_kind(docs, "Secret")
    if values["secrets"].get("existingSecret"):
        assert secrets == []  # brought by the operator
    else:
        [secret] = secrets
        weight = int(secret["metadata"]["annotations"]["helm.sh/hook-weight"])
        assert weight < int(annotations["helm.sh/hook-weight"])


def test_everything_runs_as_non_root_and_locked_down(case):
    _, _, docs = case
    specs = pod_specs(docs)
    assert len(specs) >= 5
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] > 0
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]


def test_secrets_are_referenced_never_inlined(case):
    _, _, docs = case
    sensitive = ("URL", "KEY", "SECRET", "TOKEN")
    for spec in pod_specs(docs):
        for container in spec["containers"]:
            for variable in container.get("env", []):
                name = variable["name"]
                # the storage URL names a place (s3://bucket/prefix); its credentials come
                # from the cloud's own variables, set through a Secret of the operator's
                if name == "GPUHOST_STORAGE_URL":
                    continue
                if any(word in name for word in sensitive) and name.startswith("GPUHOST_"):
                    assert "secretKeyRef" in variable.get("valueFrom", {}), variable
    outside = yaml.safe_dump([d for d in docs if d["kind"] != "Secret"])
    for value in SECRET_VALUES.values():
        assert value not in outside


def test_the_gpu_example_scales_on_queues_and_is_scraped():
    docs = render(GPU_EXAMPLE)
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in of_kind(docs, "ScaledObject")}
    assert set(scaled) == {"gpuhost-worker-llava", "gpuhost-worker-sd", "gpuhost-worker-train"}
    trigger = scaled["gpuhost-worker-sd"]["spec"]["triggers"][0]
    assert trigger["metadata"]["listName"] == "sd" and trigger["authenticationRef"]
    assert scaled["gpuhost-worker-train"]["spec"]["triggers"][0]["metadata"]["listName"] == "train"
    assert named(docs, "TriggerAuthentication", "gpuhost-redis")
    assert len(of_kind(docs, "ServiceMonitor")) == 2
    ingress = named(docs, "Ingress", "gpuhost")
    assert ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == "letsencrypt"
    assert ingress["spec"]["tls"][0]["secretName"] == "gpuhost-api-tls"
    sd = named(docs, "Deployment", "gpuhost-worker-sd")["spec"]["template"]["spec"]
    assert sd["volumes"][0]["persistentVolumeClaim"]["claimName"] == "gpuhost-models"
    gateway = named(docs, "Deployment", "gpuhost-gateway")["spec"]["template"]["spec"]
    plans = [v for v in gateway["containers"][0]["env"] if v["name"] == "GPUHOST_PLANS"]
    assert plans[0]["valueFrom"]["configMapKeyRef"]["key"] == "plans.json"


def test_the_gpu_resource_name_is_configurable():
    docs = render(DEFAULTS | {"gpuResourceName": "amd.com/gpu"})
    spec = named(docs, "Deployment", "gpuhost-worker-sd")["spec"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["amd.com/gpu"] == 1


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"workers": [{**GPU_EXAMPLE["workers"][0], "gpus": 0}]}, "gpus"),
        ({"workers": [{**GPU_EXAMPLE["workers"][0], "queue": "video"}]}, "queue"),
        ({"gateway": {"replicas": "two"}}, "replicas"),
        ({"secrets": {"values": {"databaseUrl": "postgresql://x"}}}, "redisUrl"),
    ],
    ids=["no-gpu", "unknown-queue", "wrong-type", "missing-redis-url"],
)
def test_bad_values_are_refused_by_name(values, message):
    merged = DEFAULTS | values
    with pytest.raises(helm.HelmError, match=message):
        render(merged)


def storage_of(spec: dict) -> tuple[str, list, list]:
    container = spec["containers"][0]
    [url] = [v["value"] for v in container["env"] if v["name"] == "GPUHOST_STORAGE_URL"]
    mounts = [m for m in container.get("volumeMounts", []) if m["name"] == "storage"]
    volumes = [v for v in spec.get("volumes", []) if v["name"] == "storage"]
    return url, mounts, volumes


def test_every_gateway_and_worker_sees_the_same_storage():
    claimed = render(
        DEFAULTS | {"storage": {"url": "", "existingClaim": "shared", "mountPath": "/data/storage"}}
    )
    for spec in pod_specs(claimed):
        if spec["containers"][0]["args"][0] not in ("serve", "worker"):
            continue
        url, [mount], [volume] = storage_of(spec)
        assert url == mount["mountPath"] == "/data/storage"
        assert volume["persistentVolumeClaim"]["claimName"] == "shared"
    bucket = render(GPU_EXAMPLE)
    train = named(bucket, "Deployment", "gpuhost-worker-train")["spec"]["template"]["spec"]
    assert train["containers"][0]["args"] == ["worker", "--queue", "train"]
    assert storage_of(train) == ("s3://gpuhost-objects/prod", [], [])


def test_every_process_logs_json_lines_unless_told_otherwise():
    for values, expected in ((DEFAULTS, "json"), (DEFAULTS | {"logFormat": "text"}, "text")):
        for spec in pod_specs(render(values)):
            container = spec["containers"][0]
            if container["args"][0] not in ("serve", "worker", "billing"):
                continue
            env = container["env"]
            [chosen] = [v["value"] for v in env if v["name"] == "GPUHOST_LOG_FORMAT"]
            assert chosen == expected, container["args"]
    with pytest.raises(helm.HelmError, match="logFormat"):
        render(DEFAULTS | {"logFormat": "xml"})


def test_traces_go_where_the_operator_says_and_nowhere_by_default():
    def endpoints(values: dict) -> set:
        found = set()
        for spec in pod_specs(render(values)):
            env = spec["containers"][0].get("env", [])
            found |= {v["value"] for v in env if v["name"] == "GPUHOST_OTEL_EXPORTER_OTLP_ENDPOINT"}
        return found

    assert endpoints(DEFAULTS) == set()
    assert endpoints(DEFAULTS | {"otlpEndpoint": "http://collector:4318"}) == {
        "http://collector:4318"
    }
