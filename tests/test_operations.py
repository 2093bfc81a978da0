"""Operations: Docker image, a real Prometheus, alert rules, Grafana dashboard, Kubernetes, Triton export."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from export.triton import write_triton_repository
from proto.contract import ModelMetadata
from proto.mnist.v1 import classifier_pb2 as pb
from server.app import MnistServer
from server.config import BUNDLED_MODEL, ServeConfig
from tests.support import Harness, free_port, test_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "server" / "deploy"


def tool(name: str) -> str:
    """A binary the test command installs (Debian's prometheus, the dev extra's hadolint)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"{name} is not installed: run the README's test command, which installs it")
    return found


@pytest.fixture(scope="module")
def served() -> Harness:
    harness = Harness(MnistServer(test_config()).start())
    yield harness
    harness.close()


# --- Docker ----------------------------------------------------------------------------------------


def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_installs_only_the_serve_extra() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    runtime = dockerfile.split("AS runtime", 1)[1]
    installs = re.findall(r"pip install [^;\n]*", runtime)
    assert len(installs) == 1 and '[$extra]"' in installs[0]
    assert "extra=serve-cpu" in runtime and "extra=serve;" in runtime
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    serve_names = {re.split(r"[<>=\[;]", d)[0] for d in extras["serve"]}
    named = set(re.findall(r'nvidia="([\w-]+)\[', runtime))
    assert named == {"onnxruntime-gpu"} and named <= serve_names  # only adds the NVIDIA libraries' extras
    assert not any("torch" in d for d in extras["serve"] + extras["serve-cpu"])


def test_the_wheel_the_image_installs_holds_every_module_and_file_the_service_reads(tmp_path: Path) -> None:
    """The image installs the project as a wheel: a subpackage missing from it (server/backends once was) would
    only show as an ImportError in the container."""
    source = tmp_path / "source"  # a copy: a build/ folder left in the checkout could hide what is missing
    for name in ("server", "training", "export", "loadtest", "proto"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("results", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = tmp_path.glob("*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    sources = {
        str(path.relative_to(ROOT))
        for folder in ("server", "training", "export", "loadtest", "proto")
        for path in (ROOT / folder).rglob("*.py")
    }
    assert sources - packed == set()
    data = {"server/bundled/googlenet-fast.onnx", "server/bundled/digit-detector.npz", "server/web/index.html"}
    assert data | {"server/samples/seven.png"} <= packed


def test_the_image_runs_as_non_root_with_health_check_ports_and_env_that_exist() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001$", dockerfile, re.M)
    assert "HEALTHCHECK" in dockerfile and '"python", "-m", "server.livez_probe"' in dockerfile  # /livez
    defaults = ServeConfig()
    assert f"EXPOSE {defaults.port} {defaults.metrics_port} {defaults.http_port}" in dockerfile
    for name in re.findall(r"MNIST_SERVE_(\w+)=", dockerfile):
        assert hasattr(defaults, name.lower()), name


def test_the_health_check_command_tells_serving_from_not_serving(served: Harness) -> None:
    cli = [sys.executable, "-m", "server.client", "--health", "--timeout", "2"]
    up = subprocess.run([*cli, "--server", f"127.0.0.1:{served.server.port}"], capture_output=True, text=True)
    down = subprocess.run([*cli, "--server", f"127.0.0.1:{free_port()}"], capture_output=True, text=True)
    assert (up.returncode, down.returncode) == (0, 1), up.stdout + down.stdout


def test_the_images_healthcheck_tells_a_live_server_from_none(served: Harness) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    command = json.loads(re.search(r"HEALTHCHECK [^\n]*\\\n\s+CMD (\[.*\])", dockerfile).group(1))
    assert command[0] == "python"
    command[0] = sys.executable
    env = {key: value for key, value in os.environ.items() if not key.startswith("MNIST_")}
    env["MNIST_SERVE_HOST"] = "127.0.0.1"  # the image listens on [::]; this test server on loopback
    port = str(served.server.metrics_port)
    live = subprocess.run(command, env={**env, "MNIST_SERVE_METRICS_PORT": port}, capture_output=True, text=True)
    gone = subprocess.run(command, env={**env, "MNIST_SERVE_METRICS_PORT": str(free_port())}, capture_output=True)
    assert (live.returncode, gone.returncode) == (0, 1), live.stdout + live.stderr
    assert live.stdout.strip().endswith("/livez: 200 ok")


# --- Prometheus --------------------------------------------------------------------------------------


def test_prometheus_config_and_alert_rules_are_valid_and_behave_as_specified() -> None:
    promtool = tool("promtool")
    for command in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        result = subprocess.run([promtool, *command], capture_output=True, text=True, cwd=DEPLOY)
        assert result.returncode == 0, result.stdout + result.stderr
    names = {
        r["alert"]
        for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    assert names == {
        "MnistLatencyP99Over10ms",
        "MnistErrorRatioHigh",
        "MnistNotServing",
        "MnistQueueSaturated",
        "MnistModelLoadFailed",
        "MnistModelNotServing",
        "MnistNonDigitShareJumped",
        "MnistLiveAccuracyDrop",
        "MnistPredictionDrift",
        "MnistConfidenceDrift",
        "MnistFeedbackDropped",
    }


def query(prometheus: str, expr: str) -> list[dict]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    reply = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def test_a_real_prometheus_measures_the_p99_the_client_sees(served: Harness, tmp_path: Path, mnist_dir: Path) -> None:
    from training.data import load_split

    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{served.server.metrics_port}"]}]
    config["rule_files"] = [str(DEPLOY / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prometheus = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                if urllib.request.urlopen(f"{prometheus}/-/ready", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        digits = load_split("test", mnist_dir).images[:200]
        time.sleep(2)  # a scrape before the traffic, so increase() sees it all
        latencies = []
        started = time.monotonic()
        while time.monotonic() - started < 8:
            t0 = time.perf_counter()
            served.stub.Classify(pb.ClassifyRequest(raw=digits[len(latencies) % 200].tobytes()), timeout=5)
            latencies.append(time.perf_counter() - t0)
        time.sleep(3)  # the last scrape after the traffic
        client_p99 = float(np.percentile(latencies, 99))
        result = query(
            prometheus,
            "histogram_quantile(0.99, sum by (le) (increase("
            'mnist_request_latency_seconds_bucket{method="Classify",code="OK"}[1m])))',
        )
        server_p99 = float(result[0]["value"][1])
        # The server's view excludes the client's half of the call; buckets interpolate within their bounds.
        assert 0.25 * client_p99 <= server_p99 <= 1.5 * client_p99, (server_p99, client_p99)
        assert query(prometheus, 'up{job="mnist-serve"}')[0]["value"][1] == "1"
        assert query(prometheus, "mnist_health_serving")[0]["value"][1] == "1"
        rules = json.loads(urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=5).read())
        loaded = [r["name"] for g in rules["data"]["groups"] for r in g["rules"]]
        written = [r.get("alert") or r["record"] for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
                   for r in g["rules"]]  # fmt: skip
        assert "MnistLatencyP99Over10ms" in loaded and loaded == written  # every rule of the file, in its order
    finally:
        process.terminate()
        process.wait(10)


# --- Grafana -----------------------------------------------------------------------------------------


def test_every_dashboard_query_names_a_metric_the_server_exports(served: Harness) -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in expressions for name in re.findall(r"\bmnist_[a-z_]+\b", e)}
    served.stub.Classify(pb.ClassifyRequest(raw=bytes(range(256)) * 3 + bytes(16)), timeout=5)
    exported = {key.split("{")[0] for key in served.metrics()}
    # A labelled family with no series yet (mnist_model_load_failures_total: no version has failed) is declared.
    page = urllib.request.urlopen(f"http://127.0.0.1:{served.server.metrics_port}/metrics", timeout=5).read()
    exported |= set(re.findall(r"^# TYPE (\S+) counter$", page.decode(), re.M))
    assert used and used <= exported, used - exported
    assert "mnist_model_load_failures_total" in used and "mnist_model_request_latency_seconds_bucket" in exported
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    topics = ("p99", "code", "batch size", "queue", "provider", "prediction", "confidence", "refused", "streams")
    versions = ("by model version", "ready / loading / failed / unloading", "load failures", "flagged share")
    for topic in (*topics, *versions):
        assert topic in titles, topic
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    assert variables == ["datasource", "job", "model", "version"], variables
    for expr in expressions:
        if re.search(r"mnist_(predictions|prediction_confidence|model_request|non_digit)", expr):
            assert 'model=~"$model",version=~"$version"' in expr, expr
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), ids
    flagged = next(p for p in dashboard["panels"] if "flagged share" in p["title"].lower())
    share = flagged["targets"][0]["expr"]
    per_version = r"by \(model, version\) \(rate\(mnist_non_digit_images_total.*\) / sum by \(model, version\) \(rate\("
    assert re.search(per_version + "mnist_predictions_total", share), share
    assert flagged["fieldConfig"]["defaults"]["unit"] == "percentunit"
    latency = next(p for p in dashboard["panels"] if "p99" in p["title"] and "latency" in p["title"].lower())
    assert latency["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"] == 0.01


# --- Kubernetes --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    documents = yaml.safe_load_all((DEPLOY / "kubernetes" / "mnist-serve.yaml").read_text())
    return {doc["kind"]: doc for doc in documents if doc["metadata"]["name"] == "mnist-serve"}  # not the headless one


def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", str(DEPLOY / "kubernetes" / "mnist-serve.yaml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for kind in ("deployment", "service", "horizontalpodautoscaler", "poddisruptionbudget"):
        assert f"passed for resource {kind}/mnist-serve" in result.stdout + result.stderr


def test_the_deployment_asks_for_a_gpu_and_probes_health_and_liveness(manifests: dict[str, dict]) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": ServeConfig().port, "metrics": ServeConfig().metrics_port, "http": ServeConfig().http_port}
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"]
    assert container["readinessProbe"]["grpc"]["service"] == "mnist.v1.Classifier"
    # Liveness off the gRPC loop (a busy loop must not get the pod restarted): /livez on the metrics port.
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert "grpc" not in container["livenessProbe"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert (
        float(env["MNIST_SERVE_DRAIN_SECONDS"]) + float(env["MNIST_SERVE_GRACE_SECONDS"])
        < pod["terminationGracePeriodSeconds"]
    )
    assert pod["securityContext"]["runAsNonRoot"]


def test_service_monitor_hpa_and_pdb_point_at_the_deployment(manifests: dict[str, dict]) -> None:
    labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert manifests["Service"]["spec"]["selector"] == labels
    assert manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    assert manifests["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == "mnist-serve"
    monitor = manifests["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= manifests["Service"]["metadata"]["labels"].items()
    service_ports = {p["name"] for p in manifests["Service"]["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports


# --- Triton ----------------------------------------------------------------------------------------


def test_triton_repository_has_the_model_and_a_dynamic_batching_config(tmp_path: Path) -> None:
    session = ort.InferenceSession(str(BUNDLED_MODEL), providers=["CPUExecutionProvider"])
    metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    folder = write_triton_repository(BUNDLED_MODEL, tmp_path, metadata, max_batch_size=128)
    assert folder == tmp_path / "googlenet-fast"
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "googlenet-fast/1/model.onnx",
        "googlenet-fast/config.pbtxt",
        "googlenet-fast/labels.txt",
    ]
    assert (folder / "1" / "model.onnx").read_bytes() == BUNDLED_MODEL.read_bytes()
    config = (folder / "config.pbtxt").read_text()
    assert re.search(r'^name: "googlenet-fast"$', config, re.M) and 'platform: "onnxruntime_onnx"' in config
    assert "max_batch_size: 128" in config and "dynamic_batching {" in config
    assert "preferred_batch_size: [ 8, 16, 32, 64, 128 ]" in config
    # tensor names and per-item shapes agree with the ONNX graph Triton will load
    graph_inputs = {i.name: i.shape[1:] for i in session.get_inputs()}
    graph_outputs = {o.name: o.shape[1:] for o in session.get_outputs()}
    assert graph_inputs == {"image": [1, 28, 28]}
    assert graph_outputs == {"logits": [10], "probabilities": [10], "digit_score": []}
    assert re.search(r'name: "image"\s+data_type: TYPE_FP32\s+dims: \[ 1, 28, 28 \]', config)
    assert config.count("dims: [ 10 ]") == 2
    assert re.search(
        r'name: "digit_score"\s+data_type: TYPE_FP32\s+dims: \[ 1 \]\s+reshape: \{ shape: \[ \] \}', config
    )
    assert (folder / "labels.txt").read_text().split() == [str(d) for d in range(10)]


def test_the_export_cli_writes_a_triton_repository(tmp_path: Path, mnist_dir: Path) -> None:
    from export.onnx_export import main

    assert (
        main(
            [
                "--check",
                str(BUNDLED_MODEL),
                "--accuracy-images",
                "100",
                "--data-dir",
                str(mnist_dir),
                "--triton-repo",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert (tmp_path / "googlenet-fast" / "config.pbtxt").is_file()
