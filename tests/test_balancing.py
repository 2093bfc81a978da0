"""Reaching several replicas: target lists and DNS names, round-robin, and connections the server ends on purpose.

One gRPC connection per client is what a Kubernetes ClusterIP Service balances: a replica added later gets no call
from clients already connected. So the server ends connections after --max-connection-age (GOAWAY: calls in
flight finish), and `mnist-classify` / `mnist-loadtest` spread calls over every replica named.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import grpc
import pytest

from loadtest.fleet import served_calls
from loadtest.servers import ServerProcess, free_port
from proto.mnist.v1 import classifier_pb2 as pb
from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc
from server.balancing import SERVICE_CONFIG, channel_options, channel_target
from server.client import ClassifierClient
from server.client import main as classify_main
from tests.dns_responder import DnsResponder

ROOT = Path(__file__).resolve().parents[1]
RAW = bytes(range(200)) * 3 + bytes(184)  # 784 bytes with ink: any raw image will do for the null engine


def test_one_server_or_a_resolver_uri_is_used_as_given_and_a_list_becomes_an_address_list() -> None:
    assert channel_target("localhost:50051") == "localhost:50051" and channel_options("localhost:50051") == []
    assert channel_target("dns:///mnist-serve-headless:50051") == "dns:///mnist-serve-headless:50051"
    assert channel_target("127.0.0.2:50051, 127.0.0.3:50052") == "ipv4:127.0.0.2:50051,127.0.0.3:50052"
    assert channel_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    options = dict(channel_options("replica-a:50051,replica-b:50051"))
    assert json.loads(options["grpc.service_config"]) == SERVICE_CONFIG
    assert options["grpc.default_authority"] == "replica-a:50051"  # what TLS checks: a name, not an address


@pytest.mark.parametrize(
    ("servers", "problem"),
    [
        ("127.0.0.1:1,[::1]:2", "mixes IPv4 and IPv6"),
        ("127.0.0.1,127.0.0.2:2", "'127.0.0.1' is not HOST:PORT"),
    ],
)
def test_a_list_that_cannot_be_used_is_refused_naming_why(servers: str, problem: str, capsys) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        channel_target(servers)
    with pytest.raises(SystemExit):
        classify_main(["--server", servers, "--health"])
    assert problem in capsys.readouterr().err


def test_the_shipped_client_service_config_is_the_one_the_clients_use() -> None:
    shipped = json.loads((ROOT / "server" / "deploy" / "kubernetes" / "client-service-config.json").read_text())
    assert shipped == SERVICE_CONFIG
    (method,) = SERVICE_CONFIG["methodConfig"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]  # never a refusal for load: back off


def test_calls_to_a_list_of_replicas_go_round_robin_to_all_of_them() -> None:
    metrics_ports = [free_port(), free_port()]
    with (
        ServerProcess(["--backend", "null"], metrics_port=metrics_ports[0]) as first,
        ServerProcess(["--backend", "null"], metrics_port=metrics_ports[1]) as second,
    ):
        with ClassifierClient(f"{first.target},{second.target}", timeout=10) as client:
            for _ in range(40):
                client.stub.Classify(pb.ClassifyRequest(raw=RAW), timeout=10)
        served = [served_calls("127.0.0.1", port) for port in metrics_ports]
    assert sum(served) == 40 and min(served) >= 15, served  # round-robin: about half each


def test_a_connection_older_than_its_age_is_ended_without_failing_a_call() -> None:
    """With --max-connection-age 1, a client sending back to back for 4 s sees its connection ended (the channel
    leaves READY and connects again) and every call answered."""
    flags = ["--backend", "null", "--max-connection-age", "1", "--max-connection-age-grace", "1"]
    with ServerProcess(flags) as server, grpc.insecure_channel(server.target) as channel:
        states: list[grpc.ChannelConnectivity] = []
        lock = threading.Lock()

        def record(state: grpc.ChannelConnectivity) -> None:
            with lock:
                states.append(state)

        channel.subscribe(record, try_to_connect=True)
        stub = pb_grpc.ClassifierStub(channel)
        answered, failed, ends = 0, [], time.monotonic() + 4.0
        while time.monotonic() < ends:
            try:
                stub.Classify(pb.ClassifyRequest(raw=RAW), timeout=5)
                answered += 1
            except grpc.RpcError as error:
                failed.append(error.code())
        channel.unsubscribe(record)
    assert failed == [] and answered > 100
    ready = [i for i, state in enumerate(states) if state == grpc.ChannelConnectivity.READY]
    assert len(ready) >= 2, states  # connected, ended by the server, connected again


def test_mnist_classify_reads_digits_through_a_list_of_replicas(capsys) -> None:
    sample = sorted((ROOT / "server" / "samples").glob("*.png"))[0]
    with ServerProcess(["--backend", "null"]) as first, ServerProcess(["--backend", "null"]) as second:
        assert classify_main(["--server", f"{first.target},{second.target}", str(sample)]) == 0
    assert sample.name in capsys.readouterr().out


def test_a_dns_name_reaches_a_replica_added_to_it_after_the_client_connected() -> None:
    """A client of `dns:///NAME` (a headless Service), connected while NAME has one address, reaches a replica
    added to NAME later: the server ends connections after --max-connection-age, and the client re-resolves."""
    port = free_port()
    age = ["--max-connection-age", "1", "--max-connection-age-grace", "1"]
    metrics = [free_port(), free_port()]
    with (
        DnsResponder(["127.0.0.2"]) as dns,
        ServerProcess(["--backend", "null", *age], port=port, host="127.0.0.2", metrics_port=metrics[0]),
    ):
        target = f"dns://127.0.0.1:{dns.port}/mnist.test:{port}"
        with ClassifierClient(target, timeout=10) as client:
            for _ in range(20):
                client.stub.Classify(pb.ClassifyRequest(raw=RAW), timeout=10)
            with ServerProcess(["--backend", "null", *age], port=port, host="127.0.0.3", metrics_port=metrics[1]):
                dns.addresses = ["127.0.0.2", "127.0.0.3"]  # the new pod is in the Service's DNS answer
                before = served_calls("127.0.0.3", metrics[1]) or 0.0
                calls, ends = 0, time.monotonic() + 8.0  # max-connection-age + grace + re-resolution
                while time.monotonic() < ends:
                    client.stub.Classify(pb.ClassifyRequest(raw=RAW), timeout=10)
                    calls += 1
                added = (served_calls("127.0.0.3", metrics[1]) or 0.0) - before
    assert added >= 0.15 * calls, (added, calls, dns.queries)
