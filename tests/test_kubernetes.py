"""Kubernetes: every manifest under server/deploy/kubernetes validated offline against the real schemas, and the
facts that tie the files together checked against the code they describe.

Built-in kinds go through `kubernetes-validate --strict` (the Kubernetes OpenAPI schemas, unknown fields rejected);
custom resources (ScaledObject, InferenceService, ServingRuntime, ServiceMonitor) through their CRDs' schemas,
vendored in server/deploy/kubernetes/schemas (README there), with unknown fields rejected too, as the API server's
strict field validation does. Nothing here needs a cluster or the network.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
import shutil
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import yaml

from server.config import ServeConfig, build_parser
from server.ops.metrics import ServiceMetrics
from server.transport.rest import RestApi

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "server" / "deploy" / "kubernetes"
SCHEMAS = KUBE / "schemas"
MANIFESTS = sorted(KUBE.glob("*.yaml"))
# apiVersion, kind -> the vendored openAPIV3Schema of that CRD version
CUSTOM = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda/scaledobject.v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "kserve/inferenceservice.v1beta1.json.gz",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "kserve/servingruntime.v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus-operator/servicemonitor.v1.json",
}


def tool(name: str) -> str:
    """A binary the test command installs (kubernetes-validate from the dev extra, Debian's promtool), found as
    tests/test_operations.py finds it: on PATH or beside this Python."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"{name} is not installed: run the README's test command, which installs it")
    return found


def documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((KUBE / name).read_text()) if doc]


def one(name: str, kind: str, object_name: str | None = None) -> dict:
    (doc,) = [d for d in documents(name) if d["kind"] == kind and object_name in (None, d["metadata"]["name"])]
    return doc


def is_built_in(doc: dict) -> bool:
    """v1, apps/v1, autoscaling/v2, policy/v1: groups without a dot are Kubernetes' own."""
    return "." not in doc["apiVersion"].split("/")[0]


def strict(schema: Any) -> Any:
    """The schema with unknown fields rejected wherever the CRD lists an object's fields and does not keep unknown
    ones (x-kubernetes-preserve-unknown-fields): what `kubectl apply` (server-side strict field validation) does."""
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema = {**schema, "additionalProperties": False}
        return {key: strict(value) for key, value in schema.items()}
    if isinstance(schema, list):
        return [strict(value) for value in schema]
    return schema


def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    path = SCHEMAS / CUSTOM[(api_version, kind)]
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return jsonschema.Draft4Validator(strict(json.loads(raw)))  # OpenAPI 3.0's schema dialect is Draft 4's


def schema_errors(doc: dict) -> list[str]:
    validator = crd_validator(doc["apiVersion"], doc["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def custom_resources() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in MANIFESTS for doc in documents(path.name) if not is_built_in(doc)]


def exported_names() -> set[str]:
    """Every series name the server's metrics registry exports: the samples it has now, and for families with no
    series yet (labelled ones), the names their type gives them."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
    names: set[str] = set()
    for family in ServiceMetrics().registry.collect():
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def metric_names(expression: str) -> set[str]:
    return set(re.findall(r"\bmnist_[a-z_]+\b", expression))


def adapter_rules() -> list[dict]:
    config_map = one("prometheus-adapter-rules.yaml", "ConfigMap")
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def queue_wait_rule() -> dict:
    hpa = one("mnist-serve.yaml", "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    (rule,) = [r for r in adapter_rules() if r["name"]["as"] == metric["pods"]["metric"]["name"]]
    return rule


def keda_query() -> str:
    (trigger,) = one("keda-scaledobject.yaml", "ScaledObject")["spec"]["triggers"]
    return trigger["metadata"]["query"]


def pod_labels() -> dict[str, str]:
    return one("mnist-serve.yaml", "Deployment")["spec"]["template"]["metadata"]["labels"]


def quantity(text: str) -> float:
    """A Kubernetes quantity as a number: 20m -> 0.02."""
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --- schemas: built-in kinds ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validated() -> dict[str, str]:
    """kubernetes-validate --strict's report on each manifest file (run once per file)."""
    reports = {}
    for path in MANIFESTS:
        result = subprocess.run([tool("kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        reports[path.name] = result.stdout + result.stderr
    return reports


def test_every_built_in_kind_in_every_manifest_passes_kubernetes_validate_strict(validated: dict[str, str]) -> None:
    checked = 0
    for path in MANIFESTS:
        for doc in documents(path.name):
            if is_built_in(doc):
                resource = f"{doc['kind'].lower()}/{doc['metadata']['name']}"
                assert f"passed for resource {resource}" in validated[path.name], (path.name, resource)
                checked += 1
    assert checked >= 6  # Deployment, two Services, HPA, PDB, the adapter's ConfigMap


def test_every_document_is_a_built_in_kind_or_a_custom_resource_with_a_vendored_schema() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for p in MANIFESTS for d in documents(p.name) if not is_built_in(d)}
    assert kinds == set(CUSTOM), kinds ^ set(CUSTOM)  # no custom resource left unchecked, no schema unused


def test_kubernetes_validate_strict_rejects_a_misspelled_field_and_a_wrong_type(tmp_path: Path) -> None:
    for mutate, problem in (
        (lambda spec: spec.update(minReplica=spec.pop("minReplicas")), "minReplica"),
        (lambda spec: spec.update(maxReplicas="ten"), "ten"),
    ):
        docs = documents("mnist-serve.yaml")
        mutate(next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")["spec"])
        broken = tmp_path / "broken.yaml"
        broken.write_text(yaml.safe_dump_all(docs))
        result = subprocess.run([tool("kubernetes-validate"), "--strict", str(broken)], capture_output=True, text=True)
        assert result.returncode != 0 and problem in result.stdout + result.stderr, result.stdout + result.stderr


# --- schemas: custom resources --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("manifest", "doc"), custom_resources(), ids=[f"{m}:{d['kind']}" for m, d in custom_resources()]
)
def test_every_custom_resource_matches_its_crds_schema(manifest: str, doc: dict) -> None:
    assert schema_errors(doc) == []


@pytest.mark.parametrize(
    ("manifest", "kind", "path", "wrong"),
    [
        ("keda-scaledobject.yaml", "ScaledObject", ["spec", "maxReplicaCont"], 10),  # misspelled
        ("keda-scaledobject.yaml", "ScaledObject", ["spec", "minReplicaCount"], "two"),  # not an integer
        ("kserve.yaml", "InferenceService", ["spec", "predictor", "model", "storageURI"], "gs://x/y"),
        ("kserve.yaml", "InferenceService", ["spec", "predictor", "minReplicas"], "1"),
        ("kserve.yaml", "ServingRuntime", ["spec", "protocolVersion"], ["v2"]),
        ("kserve.yaml", "ServingRuntime", ["spec", "multiModel"], "no"),
        ("mnist-serve.yaml", "ServiceMonitor", ["spec", "endpoints", 0, "interval"], "fifteen seconds"),
        ("mnist-serve.yaml", "ServiceMonitor", ["spec", "selektor"], {}),
    ],
)
def test_a_custom_resource_with_a_misspelled_field_or_a_wrong_type_is_rejected(
    manifest: str, kind: str, path: list, wrong: Any
) -> None:
    doc = copy.deepcopy(one(manifest, kind))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = wrong
    errors = schema_errors(doc)
    assert errors and all(str(path[-1]) in error for error in errors), errors  # that field, and only it


def test_a_scaled_object_without_triggers_is_rejected() -> None:
    doc = copy.deepcopy(one("keda-scaledobject.yaml", "ScaledObject"))
    del doc["spec"]["triggers"]
    assert any("'triggers' is a required property" in error for error in schema_errors(doc))


def test_each_vendored_schema_is_named_in_the_readme_with_its_source_and_licence() -> None:
    readme = (SCHEMAS / "README.md").read_text()
    for file in CUSTOM.values():
        assert f"`{file}`" in readme, file
        assert (SCHEMAS / file).parent.joinpath("LICENSE").read_text().lstrip().startswith("Apache License")
    assert len(set(re.findall(r"\b[0-9a-f]{40}\b", readme))) >= 3  # the commit of each project's release tag


# --- autoscaling on queue time ------------------------------------------------------------------------------------


def test_the_autoscaler_scales_on_the_per_pod_queue_wait_that_the_adapter_rule_produces() -> None:
    hpa = one("mnist-serve.yaml", "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]  # queue time only: not CPU
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    assert quantity(metric["pods"]["target"]["averageValue"]) == pytest.approx(0.020)
    rule = queue_wait_rule()  # exactly one rule produces the name the HPA asks for
    series = re.match(r"^(\w+)\{", rule["seriesQuery"]).group(1)
    assert re.search(rule["name"]["matches"], series) and rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)


def test_the_autoscaler_scales_up_at_once_and_down_slowly() -> None:
    behavior = one("mnist-serve.yaml", "HorizontalPodAutoscaler")["spec"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert max(p["value"] for p in behavior["scaleDown"]["policies"] if p["type"] == "Pods") == 1
    keda = one("keda-scaledobject.yaml", "ScaledObject")["spec"]
    assert keda["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == behavior  # the same when KEDA scales


def test_the_adapter_rules_and_the_keda_query_read_only_metrics_the_server_exports() -> None:
    exported = exported_names()
    for rule in adapter_rules():
        used = metric_names(rule["seriesQuery"] + rule["metricsQuery"])
        assert used and used <= exported, used - exported
    rule = queue_wait_rule()
    assert metric_names(rule["metricsQuery"]) == {"mnist_queue_wait_seconds_sum", "mnist_queue_wait_seconds_count"}
    assert metric_names(keda_query()) == {"mnist_queue_wait_seconds_sum", "mnist_queue_wait_seconds_count"}
    assert "mnist_requests_in_flight" in {r["name"]["as"] for r in adapter_rules()}


def test_keda_replaces_the_hpa_with_the_same_target_bounds_and_threshold() -> None:
    hpa = one("mnist-serve.yaml", "HorizontalPodAutoscaler")["spec"]
    keda = one("keda-scaledobject.yaml", "ScaledObject")["spec"]
    assert keda["scaleTargetRef"] == hpa["scaleTargetRef"]
    assert (keda["minReplicaCount"], keda["maxReplicaCount"]) == (hpa["minReplicas"], hpa["maxReplicas"])
    (trigger,) = keda["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "Value"  # an average: not divided by pods
    assert float(trigger["metadata"]["threshold"]) == quantity(hpa["metrics"][0]["pods"]["target"]["averageValue"])
    header = (KUBE / "keda-scaledobject.yaml").read_text().split("apiVersion:")[0]
    assert "REPLACES the HPA" in header and "never apply both" in header


def render(rule: dict, group_by: str, matchers: str) -> str:
    """The adapter's metricsQuery as it sends it to Prometheus (its Go template filled in)."""
    return rule["metricsQuery"].replace("<<.GroupBy>>", group_by).replace("<<.LabelMatchers>>", matchers)


def test_the_queue_wait_queries_compute_the_average_wait_per_pod_and_over_the_deployment(tmp_path: Path) -> None:
    """A real PromQL engine (promtool's rule tests) on made-up scrapes, 15 s apart as the ServiceMonitor's: pod a
    answers 2 requests/s waiting 20 ms each, pod b 2/s at 10 ms, pod c is idle. The adapter's rule gives each pod
    its own average (idle: 0, not NaN); KEDA's query the Deployment's, weighted by requests."""
    adapter = render(queue_wait_rule(), "pod", 'namespace="default",pod=~"a|b|c"')
    rules = {"groups": [{"name": "q", "rules": [{"record": "adapter", "expr": adapter}, {"record": "keda"}]}]}
    rules["groups"][0]["rules"][1]["expr"] = keda_query()
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    labels = 'namespace="default",job="mnist-serve",pod="{}"'
    series = []
    for pod, wait_per_scrape, count_per_scrape in (("a", 0.6, 30), ("b", 0.3, 30), ("c", 0, 0)):
        series.append(
            {"series": f"mnist_queue_wait_seconds_sum{{{labels.format(pod)}}}", "values": f"0+{wait_per_scrape}x40"}
        )
        series.append(
            {"series": f"mnist_queue_wait_seconds_count{{{labels.format(pod)}}}", "values": f"0+{count_per_scrape}x40"}
        )
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": "round(adapter * 1e6)",  # in microseconds: the float division's last bit aside
                        "eval_time": "5m",
                        "exp_samples": [
                            {"labels": '{pod="a"}', "value": 20000},
                            {"labels": '{pod="b"}', "value": 10000},
                            {"labels": '{pod="c"}', "value": 0},
                        ],
                    },
                    {"expr": "round(keda * 1e6)", "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 15000}]},
                ],
            }
        ],
    }
    (tmp_path / "rules_test.yml").write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        [tool("promtool"), "test", "rules", "rules_test.yml"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- selectors and balancing --------------------------------------------------------------------------------------


def test_every_selector_matches_the_deployments_pod_labels() -> None:
    labels = pod_labels()
    for service in (one("mnist-serve.yaml", "Service", name) for name in ("mnist-serve", "mnist-serve-headless")):
        assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]["name"]
    assert one("mnist-serve.yaml", "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    deployment = one("mnist-serve.yaml", "Deployment")
    target = {"apiVersion": deployment["apiVersion"], "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert one("mnist-serve.yaml", "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"] == target
    assert one("keda-scaledobject.yaml", "ScaledObject")["spec"]["scaleTargetRef"] == target


def test_the_headless_service_publishes_each_pods_grpc_port_and_is_not_scraped_twice() -> None:
    headless = one("mnist-serve.yaml", "Service", "mnist-serve-headless")
    assert headless["spec"]["clusterIP"] == "None"
    (port,) = headless["spec"]["ports"]
    (container,) = one("mnist-serve.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port["port"] == container_ports[port["targetPort"]] == ServeConfig().port
    monitor = one("mnist-serve.yaml", "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    selected = [s["metadata"]["name"] for s in documents("mnist-serve.yaml") if s["kind"] == "Service"]
    selected = [
        n for n in selected if monitor.items() <= one("mnist-serve.yaml", "Service", n)["metadata"]["labels"].items()
    ]
    assert selected == ["mnist-serve"]  # one scrape per pod, through the ClusterIP Service's endpoints


def test_the_documented_client_target_names_the_headless_service_on_the_grpc_port() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    name = one("mnist-serve.yaml", "Service", "mnist-serve-headless")["metadata"]["name"]
    assert f"dns:///{name}.NAMESPACE.svc.cluster.local:{ServeConfig().port}" in operations
    assert "client-service-config.json" in operations


# --- the client service config ------------------------------------------------------------------------------------

SERVICE_CONFIG = json.loads((KUBE / "client-service-config.json").read_text())
DURATION = re.compile(r"^\d+(\.\d{1,9})?s$")  # google.protobuf.Duration's JSON form


def test_the_client_service_config_balances_round_robin_and_retries_unavailable_on_the_classifier() -> None:
    assert SERVICE_CONFIG["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = SERVICE_CONFIG["methodConfig"]
    assert method["name"] == [{"service": "mnist.v1.Classifier"}]  # every method of the service
    policy = method["retryPolicy"]
    # gRPC's rules for a retryPolicy (service_config.proto): each field required, maxAttempts > 1, durations and
    # multiplier > 0, status codes non-empty and named as grpc.StatusCode names them.
    assert set(policy) == {"maxAttempts", "initialBackoff", "maxBackoff", "backoffMultiplier", "retryableStatusCodes"}
    assert isinstance(policy["maxAttempts"], int) and policy["maxAttempts"] > 1
    for key in ("initialBackoff", "maxBackoff"):
        assert DURATION.match(policy[key]) and float(policy[key][:-1]) > 0, policy[key]
    assert float(policy["initialBackoff"][:-1]) <= float(policy["maxBackoff"][:-1])
    assert policy["backoffMultiplier"] > 0
    assert "UNAVAILABLE" in policy["retryableStatusCodes"]
    assert set(policy["retryableStatusCodes"]) <= {code.name for code in grpc.StatusCode}
    assert "RESOURCE_EXHAUSTED" not in policy["retryableStatusCodes"]  # a refusal for load is backed off, not retried


class Replica:
    """A stand-in gRPC server for mnist.v1.Classifier/Classify that counts calls and fails the first `fail` of them
    with UNAVAILABLE (a replica draining)."""

    def __init__(self, fail: int = 0) -> None:
        self.calls, self.fail, self.lock = 0, fail, threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.unary_unary_rpc_method_handler(self.classify)
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("mnist.v1.Classifier", {"Classify": handler})]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def classify(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.calls += 1
            failing = self.calls <= self.fail
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        return request


def call_replicas(options: list[tuple[str, Any]], replicas: list[Replica], calls: int) -> list[grpc.StatusCode]:
    target = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)
    codes = []
    with grpc.insecure_channel(target, options=options) as channel:
        classify = channel.unary_unary("/mnist.v1.Classifier/Classify")
        grpc.channel_ready_future(channel).result(timeout=10)
        for _ in range(calls):
            try:
                classify(b"x", timeout=10, wait_for_ready=True)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
    return codes


def test_a_channel_with_the_service_config_spreads_calls_over_every_replica_and_retries_unavailable() -> None:
    replicas = [Replica(fail=1), Replica(fail=1)]
    try:
        codes = call_replicas([("grpc.service_config", json.dumps(SERVICE_CONFIG))], replicas, 20)
        assert codes == [grpc.StatusCode.OK] * 20  # each replica's UNAVAILABLE retried on the other
        assert sum(r.calls for r in replicas) == 22 and min(r.calls for r in replicas) >= 5
    finally:
        for replica in replicas:
            replica.server.stop(None)


def test_without_the_service_config_a_channel_sends_every_call_to_one_replica_and_fails_on_unavailable() -> None:
    replicas = [Replica(fail=1), Replica(fail=1)]
    try:
        codes = call_replicas([("grpc.service_config", json.dumps({}))], replicas, 20)
        assert codes[0] == grpc.StatusCode.UNAVAILABLE and codes[1:] == [grpc.StatusCode.OK] * 19
        assert sorted(r.calls for r in replicas) == [0, 20]  # pick_first: one connection, one replica
    finally:
        for replica in replicas:
            replica.server.stop(None)


# --- KServe -------------------------------------------------------------------------------------------------------


def test_the_kserve_runtime_serves_the_model_repository_on_kserves_http_port_with_v2_readiness() -> None:
    runtime = one("kserve.yaml", "ServingRuntime")
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    args = vars(build_parser().parse_args(container["args"]))  # flags the server really takes
    assert args["model_repository"] == "/mnt/models"  # where KServe's storage initializer puts the storageUri
    (port,) = container["ports"]
    assert port["containerPort"] == args["http_port"] == 8080 != ServeConfig().http_port  # KServe's, not the image's
    assert port["name"] == "http1"  # HTTP/1 (REST) for Knative
    for env in container.get("env", []):
        assert env["name"].startswith("MNIST_SERVE_") and hasattr(ServeConfig(), env["name"][12:].lower()), env
    probe = container["readinessProbe"]["httpGet"]
    routes = {route.resource.canonical for route in RestApi(None, ServiceMetrics()).app().router.routes()}
    assert probe["path"] == "/v2/health/ready" and probe["path"] in routes and probe["port"] == args["http_port"]
    assert set(runtime["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
    annotations = runtime["spec"]["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == ServeConfig().metrics_port
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    (deployed,) = one("mnist-serve.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == deployed["image"]
    assert container["securityContext"]["runAsNonRoot"]


def test_the_inference_service_uses_the_runtime_for_a_format_it_supports_with_a_placeholder_storage_uri() -> None:
    runtime = one("kserve.yaml", "ServingRuntime")
    model = one("kserve.yaml", "InferenceService")["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["storageUri"] == "gs://YOUR-BUCKET/mnist-repository"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == 1
