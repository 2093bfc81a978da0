"""`python -m loadtest.feedback_loop`: the feedback loop end to end, recorded.

A server serves the bundled model as version 1 of a model repository whose config.pbtxt asks for canaries, and
stores labels in SQLite. Then, as a client and an operator would:

1. clean:    MNIST training digits with their labels: live accuracy near the reference.
2. shifted:  digits from a shifted distribution (a corruption of the held-out suite, which training never applied,
             on other training digits) with their labels: live accuracy drops, drift rises, and a
             real Prometheus, scraping the server with the project's alert rules (their `for:` cut to seconds),
             sees the alerts fire.
3. learn:    mnist-train --from-feedback on the stored labels (MNIST replayed beside them); mnist-export --publish
             puts the result in the repository as version 2 (with its reference).
4. canary:   version 2 answers a share of the traffic, more shifted digits come with labels, and the repository
             promotes it (or rolls it back) on their evidence.
5. after:    both versions judged on the same shifted digits neither ever saw (a disjoint corruption of MNIST test
             digits), and on the clean MNIST test set: how much the shifted accuracy rose, and what clean lost.

Everything goes to --out: report.json, feedback-loop.png (live accuracy and drift over the run), the server and
Prometheus logs. The numbers in docs/feedback.md come from here.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.servers import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = "googlenet-fast"


def canary_config(share: float, min_labels: int) -> str:
    return (
        f'name: "{MODEL}"\n'
        f'parameters {{ key: "canary_share" value {{ string_value: "{share}" }} }}\n'
        f'parameters {{ key: "canary_min_labels" value {{ string_value: "{min_labels}" }} }}\n'
    )


class Prometheus:
    """Debian's Prometheus on a free port, scraping one server every second with the alert rules, `for:` cut."""

    def __init__(self, out: Path, metrics_port: int) -> None:
        rules = re.sub(r"for: \d+m", "for: 5s", (ROOT / "server/deploy/alerts.yml").read_text())
        (out / "alerts-fast.yml").write_text(rules)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(out / "alerts-fast.yml")],
            "scrape_configs": [
                {"job_name": "mnist-serve", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
            ],
        }
        (out / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (out / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={out / 'prometheus.yml'}",
                f"--storage.tsdb.path={out / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"{self.url}/-/ready", timeout=1).status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise SystemExit("feedback_loop: Prometheus did not become ready (see prometheus.log)")

    def firing(self) -> list[str]:
        query = urllib.parse.urlencode({"query": 'ALERTS{alertstate="firing"}'})
        reply = json.loads(urllib.request.urlopen(f"{self.url}/api/v1/query?{query}", timeout=5).read())
        return sorted({r["metric"]["alertname"] for r in reply["data"]["result"]})

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


class Client:
    """mnist.v1 over gRPC: classify, label, list models, read /metrics; every labelled answer is kept for the plot."""

    def __init__(self, server: ServerProcess, metrics_port: int) -> None:
        import grpc

        from proto.mnist.v1 import classifier_pb2 as pb
        from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc

        self.pb = pb
        self.channel = grpc.insecure_channel(server.target)
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.timeline: list[dict[str, Any]] = []
        self.started = time.monotonic()

    def label(self, images: np.ndarray, labels: np.ndarray, phase: str, stop=None) -> dict[str, Any]:
        """Each digit classified (naming no version) and labelled; per version: answers and right ones."""
        per_version: dict[str, list[int]] = {}
        for n, (image, label) in enumerate(zip(images, labels, strict=True)):
            answer = self.stub.Classify(self.pb.ClassifyRequest(raw=image.tobytes()), timeout=30)
            reply = self.stub.Feedback(self.pb.FeedbackRequest(request_id=answer.request_id, label=int(label)))
            counts = per_version.setdefault(answer.model_version, [0, 0])
            counts[0] += 1
            counts[1] += reply.correct
            self.timeline.append(
                {
                    "t": time.monotonic() - self.started,
                    "phase": phase,
                    "version": answer.model_version,
                    "correct": reply.correct,
                    "live_accuracy": reply.live_accuracy,
                    "confidence": answer.confidence,
                }
            )
            if stop is not None and n % 10 == 9 and stop():
                break
        return {v: {"answers": c[0], "accuracy": c[1] / c[0]} for v, c in per_version.items()}

    def accuracy(self, images: np.ndarray, labels: np.ndarray, version: str) -> float:
        """The named version's accuracy on these digits, without labelling them (ClassifyBatch, 256 at a time)."""
        right = 0
        for start in range(0, len(images), 256):
            requests = [self.pb.ClassifyRequest(raw=i.tobytes()) for i in images[start : start + 256]]
            batch = self.pb.ClassifyBatchRequest(requests=requests, model_version=version)
            answers = self.stub.ClassifyBatch(batch, timeout=60).responses
            right += sum(a.digit == y for a, y in zip(answers, labels[start : start + 256], strict=True))
        return float(right / len(images))

    def models(self) -> dict[str, Any]:
        listed = self.stub.ListModels(self.pb.ListModelsRequest(), timeout=10).models
        return {m.version: {"state": m.state, "default": m.is_default, "reason": m.reason} for m in listed}

    def gauges(self, name: str) -> dict[str, float]:
        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        found = {}
        for line in text.splitlines():
            if line.startswith(name + "{"):
                version = re.search(r'version="([^"]*)"', line)
                found[version.group(1) if version else ""] = float(line.rsplit(" ", 1)[1])
        return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    from training.corruptions import corrupt
    from training.data import load_split, train_validation_split
    from training.train import TrainConfig

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    (out / "repository" / MODEL / "1").mkdir(parents=True)
    shutil.copyfile(ROOT / "server/bundled/googlenet-fast.onnx", out / "repository" / MODEL / "1" / "model.onnx")
    shutil.copyfile(
        ROOT / "server/bundled/googlenet-fast.reference.json", out / "repository" / MODEL / "1" / "model.reference.json"
    )
    (out / "repository" / MODEL / "config.pbtxt").write_text(canary_config(args.canary_share, args.canary_labels))

    # --- the digits: clean test digits; shifted training digits the model never trained on (they become feedback);
    # shifted test digits, disjoint from everything, to judge both versions on at the end ---
    train, test = load_split("train", args.data_dir), load_split("test", args.data_dir)
    config = TrainConfig()
    # Training digits (the model saw them clean, never shifted): the validation split stays for the fine-tune's own
    # check that MNIST is kept, and the test set for judging.
    trained_on, _ = train_validation_split(len(train.images), config.validation_size, config.seed)
    rng = np.random.default_rng(args.seed)
    rows = rng.permutation(trained_on)
    feedback_rows = rows[: args.shifted]
    canary_rows = rows[args.shifted : args.shifted + 4 * args.canary_labels]
    clean_rows = rows[-args.clean :]
    shifted = corrupt(train.images[feedback_rows], args.corruption, seed=args.seed)
    canary_digits = corrupt(train.images[canary_rows], args.corruption, seed=args.seed + 1)
    judge = corrupt(test.images[5000 : 5000 + args.judge], args.corruption, seed=args.seed + 2)
    judge_labels = test.labels[5000 : 5000 + args.judge]

    metrics_port = free_port()
    flags = [
        "--model-repository", str(out / "repository"), "--repository-poll-seconds", "1",
        "--feedback-db", str(out / "feedback.db"), "--live-accuracy-window", str(args.window),
        "--drift-window-seconds", str(args.drift_window), "--http-port", "0", "--drain-seconds", "0",
        "--workers", "1", "--log-level", "INFO",
    ]  # fmt: skip
    server = ServerProcess(flags, metrics_port=metrics_port, defaults=(), log=out / "server.log").start()
    prometheus = Prometheus(out, metrics_port) if args.prometheus else None
    client = Client(server, metrics_port)
    report: dict[str, Any] = {"corruption": args.corruption, "settings": {k: str(v) for k, v in vars(args).items()}}
    try:
        # 1. clean
        report["clean"] = client.label(train.images[clean_rows], train.labels[clean_rows], "clean")
        # 2. shifted: labels stored, accuracy drops, drift rises, alerts fire
        before_judge = client.accuracy(judge, judge_labels, "1")
        report["shifted"] = client.label(shifted, train.labels[feedback_rows], "shifted")
        time.sleep(args.drift_window / 5)  # a drift sample or two after the last answer
        report["after_shift"] = {
            "live_accuracy": client.gauges("mnist_live_accuracy"),
            "reference_accuracy": client.gauges("mnist_reference_accuracy"),
            "prediction_drift_psi": client.gauges("mnist_prediction_drift_psi"),
            "confidence_drift_psi": client.gauges("mnist_confidence_drift_psi"),
        }
        if prometheus is not None:
            deadline = time.monotonic() + 60
            firing: list[str] = []
            while time.monotonic() < deadline and not {"MnistLiveAccuracyDrop"} <= set(firing):
                time.sleep(1)
                firing = prometheus.firing()
            time.sleep(3)
            report["alerts_firing_after_shift"] = prometheus.firing()
        # 3. learn from the stored labels and publish version 2
        started = time.monotonic()
        tune = [
            sys.executable, "-m", "training.train", "--from-feedback", str(out / "feedback.db"),
            "--init", str(out / "repository" / MODEL / "1" / "model.onnx"), "--steps", str(args.steps),
            "--out-dir", str(out / "fine-tune"), "--seed", str(args.seed), "--test-limit", str(args.test_limit),
        ]  # fmt: skip
        if args.data_dir:
            tune += ["--data-dir", args.data_dir]
        _run(tune, out / "fine-tune.log")
        export = [
            sys.executable, "-m", "export.onnx_export", str(out / "fine-tune" / "model.pt"),
            "-o", str(out / "fine-tune" / f"{MODEL}.onnx"), "--publish", str(out / "repository"),
            "--parity-images", "200",
        ]  # fmt: skip
        if args.test_limit:  # a smoke run: the export's accuracy on as many test digits as the fine-tune's
            export += ["--accuracy-images", str(args.test_limit)]
        if args.data_dir:
            export += ["--data-dir", args.data_dir]
        _run(export, out / "export.log")
        report["fine_tune"] = json.loads((out / "fine-tune" / "report.json").read_text())
        report["learn_and_publish_seconds"] = time.monotonic() - started
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and client.models().get("2", {}).get("state") != "READY":
            time.sleep(0.5)
        report["canary_started"] = client.models()
        judged_2 = client.accuracy(judge, judge_labels, "2")  # while both are loaded, on the same unseen digits

        # 4. canary: shifted digits with labels until the repository decides
        def decided() -> bool:
            listed = client.models()
            return bool(listed.get("2", {}).get("default")) or listed.get("2", {}).get("state") == "ROLLED_BACK"

        report["canary"] = client.label(canary_digits, train.labels[canary_rows], "canary", stop=decided)
        report["decision"] = client.models()
        # 5. after: the same unseen shifted digits, and the clean test set, for both versions
        report["judged"] = {
            "shifted_unseen_digits": len(judge),
            "version_1_shifted": before_judge,
            "version_2_shifted": judged_2,
            "version_1_mnist_test": report["fine_tune"]["before"]["mnist_test"],
            "version_2_mnist_test": report["fine_tune"]["after"]["mnist_test"],
        }
        report["after"] = client.label(judge[: args.after], judge_labels[: args.after], "after")
        report["final_live_accuracy"] = client.gauges("mnist_live_accuracy")
    finally:
        client.channel.close()
        if prometheus is not None:
            prometheus.stop()
        server.stop()
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    report["timeline"] = client.timeline  # the picture's data, kept apart: thousands of rows
    (out / "timeline.json").write_text(json.dumps(client.timeline) + "\n")
    draw(report, out / "feedback-loop.png")
    return report


def _run(command: list[str], log: Path) -> None:
    with log.open("w") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"feedback_loop: {command[2]} failed (exit {done.returncode}); see {log}")


def draw(report: dict[str, Any], path: Path) -> None:
    """Live accuracy over the run, by phase, with each answer's version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = report["timeline"]
    figure, axis = plt.subplots(figsize=(11, 4.5))
    colors = {"clean": "tab:green", "shifted": "tab:red", "canary": "tab:orange", "after": "tab:blue"}
    window = 100
    correct = np.array([t["correct"] for t in timeline], float)
    rolling = np.convolve(correct, np.ones(window) / window, mode="valid")
    x = np.arange(window - 1, len(correct))
    axis.plot(x, rolling, color="black", linewidth=1.2, label=f"right over the last {window} labelled answers")
    start = 0
    for n in range(1, len(timeline) + 1):
        if n == len(timeline) or timeline[n]["phase"] != timeline[start]["phase"]:
            phase = timeline[start]["phase"]
            axis.axvspan(start, n, color=colors.get(phase, "grey"), alpha=0.12)
            axis.text((start + n) / 2, 0.03, phase, ha="center", fontsize=9, transform=axis.get_xaxis_transform())
            start = n
    two = [n for n, t in enumerate(timeline) if t["version"] == "2"]
    if two:
        axis.scatter(two, [1.01] * len(two), s=2, color="tab:purple", label="answered by version 2")
    judged = report.get("judged", {})
    title = f"feedback loop on '{report['corruption']}' digits"
    if judged:
        title += (
            f": unseen shifted digits {judged['version_1_shifted']:.1%} (v1) -> {judged['version_2_shifted']:.1%} (v2)"
        )
    axis.set(xlabel="labelled answers, in order", ylabel="accuracy", ylim=(0.75, 1.03), title=title)
    axis.legend(loc="lower left", bbox_to_anchor=(0.0, 0.1), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.feedback_loop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("reports/feedback-loop"), help="folder for everything")
    parser.add_argument("--corruption", default="occlusion", help="the shift: a kind of training/corruptions.py")
    parser.add_argument("--clean", type=int, default=300, help="clean test digits labelled first")
    parser.add_argument("--shifted", type=int, default=2000, help="shifted digits labelled (the fine-tune's data)")
    parser.add_argument("--steps", type=int, default=300, help="fine-tune steps (mnist-train --from-feedback)")
    parser.add_argument("--canary-share", type=float, default=0.5, help="share of traffic the new version takes")
    parser.add_argument("--canary-labels", type=int, default=150, help="labelled answers each version needs")
    parser.add_argument(
        "--judge", type=int, default=2000, help="unseen shifted test digits both versions are judged on"
    )
    parser.add_argument("--after", type=int, default=300, help="unseen shifted digits labelled after the decision")
    parser.add_argument("--window", type=int, default=300, help="the server's --live-accuracy-window")
    parser.add_argument("--drift-window", type=float, default=30.0, help="the server's --drift-window-seconds")
    parser.add_argument(
        "--prometheus",
        action=argparse.BooleanOptionalAction,
        default=shutil.which("prometheus") is not None,
        help="run a real Prometheus with the alert rules (Debian's prometheus)",
    )
    parser.add_argument(
        "--test-limit", type=int, default=0, help="the fine-tune judges on this many MNIST test digits (0 = all)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", help="MNIST directory (default: $MNIST_DIR, else ../shared/data/mnist)")
    args = parser.parse_args(argv)
    report = run(args)
    shift = report["after_shift"]
    judged = report["judged"]
    print(f"clean: {report['clean']}")
    print(f"shifted ({args.corruption}): {report['shifted']}; live accuracy {shift['live_accuracy']}")
    print(f"drift PSI: prediction {shift['prediction_drift_psi']}, confidence {shift['confidence_drift_psi']}")
    print(f"alerts firing: {report.get('alerts_firing_after_shift', 'not checked (no Prometheus)')}")
    print(f"fine-tune: before {report['fine_tune']['before']}, after {report['fine_tune']['after']}")
    print(f"canary: {report['canary']}; decision: {report['decision']}")
    print(f"judged on {judged['shifted_unseen_digits']} unseen shifted digits and the MNIST test set: {judged}")
    print(f"wrote {args.out}/report.json and feedback-loop.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
