"""With `--feedback-peers`, a label reaches the replica of a fleet that gave the answer: a replica that does not
remember a request id asks the others with the same Feedback call, marked forwarded and carrying the caller's token
(server/transport/replicas.py); the replica that answered takes the label, or refuses it, as if it had been sent to
it, and a forwarded call is never forwarded again."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from proto.mnist.v1 import classifier_pb2 as pb
from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc
from server.app import MnistServer
from server.config import feedback_peer_targets, load_config
from server.transport.replicas import ReplicaPeers
from tests.support import free_port, test_config
from tests.test_security import Pki, pki  # noqa: F401  (the fixture: a CA and a server certificate for 127.0.0.1)

RAW = bytes(range(256)) * 3 + bytes(16)  # any 784 pixels with contrast
TOKEN = "fleet-token-with-feedback"


class Replica:
    def __init__(self, server: MnistServer, token: str = TOKEN) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.auth = [("authorization", f"Bearer {token}")]

    def classify(self, request_id: str) -> pb.ClassifyResponse:
        return self.stub.Classify(pb.ClassifyRequest(raw=RAW, request_id=request_id), metadata=self.auth, timeout=10)

    def feedback(self, request_id: str, label: int) -> pb.FeedbackResponse:
        request = pb.FeedbackRequest(request_id=request_id, label=label)
        return self.stub.Feedback(request, metadata=self.auth, timeout=10)

    def sample(self, name: str, labels: dict) -> float:
        return self.server.metrics.registry.get_sample_value(name, labels) or 0.0

    def labels_taken(self) -> float:
        return sum(
            sample.value
            for family in self.server.metrics.registry.collect()
            if family.name == "mnist_feedback"
            for sample in family.samples
            if sample.name == "mnist_feedback_total"
        )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    tokens = tmp_path_factory.mktemp("fleet") / "tokens"
    tokens.write_text(f"{TOKEN} infer,feedback\n")
    tokens.chmod(0o600)
    ports = [free_port(), free_port()]
    gone = free_port()  # a replica listed but not running: passed over
    peers = ",".join(f"127.0.0.1:{port}" for port in [*ports, gone])
    replicas = []
    for port in ports:
        config = test_config(
            backend="null", digit_detector="none", port=port, http_port=free_port(), feedback_peers=peers,
            auth_tokens_file=str(tokens),
        )  # fmt: skip
        replicas.append(Replica(MnistServer(config).start()))
    yield replicas
    for replica in replicas:
        replica.channel.close()
        replica.server.stop()


def test_a_label_sent_to_another_replica_is_taken_by_the_replica_that_answered(fleet: list[Replica]) -> None:
    first, second = fleet
    answer = second.classify("answered-by-the-second")
    taken_before = (first.labels_taken(), second.labels_taken())

    taken = first.feedback("answered-by-the-second", answer.digit)

    assert (taken.prediction, taken.correct) == (str(answer.digit), True)
    assert (first.labels_taken(), second.labels_taken()) == (taken_before[0], taken_before[1] + 1)
    for replica in fleet:  # the owner refuses a second label, wherever it arrives
        with pytest.raises(grpc.RpcError) as second_label:
            replica.feedback("answered-by-the-second", 1)
        assert second_label.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_an_unknown_id_is_not_found_and_counted_once_by_the_replica_asked(fleet: list[Replica]) -> None:
    first, second = fleet
    refused = {"reason": "unknown_request"}
    before = [replica.sample("mnist_feedback_refused_total", refused) for replica in fleet]
    with pytest.raises(grpc.RpcError) as unknown:
        first.feedback("nobody-answered-this", 3)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "nobody-answered-this" in unknown.value.details()
    after = [replica.sample("mnist_feedback_refused_total", refused) for replica in fleet]
    assert [b - a for a, b in zip(before, after, strict=True)] == [1.0, 0.0]


def test_a_label_sent_over_rest_is_forwarded_with_the_callers_token(fleet: list[Replica]) -> None:
    """Every replica here wants a token with the feedback scope: the one that answered takes the label only because
    the Authorization header the caller sent is forwarded with it."""
    first, second = fleet
    answer = second.classify("labelled-over-rest")
    name = second.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=second.auth, timeout=10).name
    request = urllib.request.Request(
        f"http://127.0.0.1:{first.server.http_port}/v2/models/{name}/feedback",
        json.dumps({"request_id": "labelled-over-rest", "label": answer.digit}).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        taken = json.loads(reply.read())
    assert (taken["label"], taken["prediction"], taken["correct"]) == (str(answer.digit), str(answer.digit), True)


def test_peer_lists_are_checked_where_they_are_written() -> None:
    assert feedback_peer_targets(" a:1, dns:///svc.ns:50051 ,[::1]:2") == ["a:1", "dns:///svc.ns:50051", "[::1]:2"]
    for bad in ("a", "a:b", "a:0", "dns:///svc", "http://a:1"):
        with pytest.raises(SystemExit, match="feedback_peers"):
            load_config(["--feedback-peers", bad])


def test_peers_of_a_tls_server_need_the_ca_that_signed_them(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    with pytest.raises(SystemExit, match="feedback_peers over TLS needs feedback_peers_ca"):
        load_config(["--feedback-peers", "a:1", "--tls-cert", str(cert), "--tls-key", str(key)])


def test_a_fleet_speaking_tls_forwards_labels_over_tls(pki: Pki) -> None:  # noqa: F811 (the fixture, imported)
    ports = [free_port(), free_port()]
    peers = ",".join(f"127.0.0.1:{port}" for port in ports)
    tls = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), "feedback_peers_ca": str(pki.ca)}
    servers = [
        MnistServer(test_config(backend="null", digit_detector="none", port=port, feedback_peers=peers, **tls)).start()
        for port in ports
    ]
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    channels = [grpc.secure_channel(f"127.0.0.1:{port}", credentials) for port in ports]
    try:
        first, second = (pb_grpc.ClassifierStub(channel) for channel in channels)
        answer = second.Classify(pb.ClassifyRequest(raw=RAW, request_id="over-tls"), timeout=10)
        taken = first.Feedback(pb.FeedbackRequest(request_id="over-tls", label=answer.digit), timeout=10)
        assert (taken.prediction, taken.correct) == (str(answer.digit), True)
    finally:
        for channel in channels:
            channel.close()
        for server in servers:
            server.stop()


def test_a_dns_name_is_every_address_it_resolves_to_and_this_replica_is_not_asked() -> None:
    async def addresses(own_port: int | None) -> list[str]:
        peers = ReplicaPeers(["dns:///localhost:50051", "10.0.0.7:50051", "127.0.0.1:50051"])
        peers.own_port = own_port
        return await peers.addresses()

    listed = asyncio.run(addresses(None))
    assert "127.0.0.1:50051" in listed and "10.0.0.7:50051" in listed and len(listed) == len(set(listed))
    assert asyncio.run(addresses(50051)) == ["10.0.0.7:50051"]  # its own port on its own addresses: not asked


class Draining(pb_grpc.ClassifierServicer):
    """A replica that is reached but answers UNAVAILABLE, as one that is draining does: it may hold the answer."""

    def Feedback(self, request, context):  # noqa: N802 (gRPC's method name)
        context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another replica")


def test_a_replica_that_answers_unavailable_makes_the_label_retryable_and_one_gone_does_not() -> None:
    from concurrent import futures

    draining = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_ClassifierServicer_to_server(Draining(), draining)
    draining_port = draining.add_insecure_port("127.0.0.1:0")
    draining.start()
    asked = [f"127.0.0.1:{draining_port}", f"127.0.0.1:{free_port()}"]  # the second: nobody listens there
    servers = [
        MnistServer(test_config(backend="null", digit_detector="none", feedback_peers=peers)).start()
        for peers in (",".join(asked), asked[1])
    ]
    try:
        codes = []
        for server in servers:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, pytest.raises(grpc.RpcError) as refused:
                pb_grpc.ClassifierStub(channel).Feedback(pb.FeedbackRequest(request_id="held-elsewhere?", label=1))
            codes.append(refused.value.code())
        assert codes == [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND]
    finally:
        for server in servers:
            server.stop()
        draining.stop(0)
