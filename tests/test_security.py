"""TLS, mutual TLS and bearer tokens (server/security.py), on gRPC and /metrics, with certificates made here.

A CA signs a server certificate for localhost/127.0.0.1 and a client certificate; a second, unknown CA
signs a client certificate the server must refuse. Servers run in-process on the null backend.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import logging
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from proto.mnist.v1 import classifier_pb2 as pb
from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc
from server import client as classify_cli
from server import livez_probe, security
from server.app import MnistServer
from server.config import load_config
from server.errors import PermissionDenied, Unauthenticated
from server.security import TokenChecker, grpc_authorization, http_refusal, http_ssl_context, read_tokens
from tests.support import free_port, test_config

RAW_DIGIT = bytes(range(256)) * 3 + bytes(16)  # any 28x28 with contrast: the null backend does not look
SAMPLES = Path(__file__).resolve().parents[1] / "server" / "samples"
TOKEN = "s3cr3t-token-for-the-tests-0123456789"
OTHER_TOKEN = "another-accepted-token-abcdefghijkl"


# --- certificates ----------------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: x509.Name, issuer_key, *, ca: bool = False, sans=(), usage=None):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, stem: str, cert: x509.Certificate, key) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate signed by a CA the server does not trust
    rogue_key: Path
    tokens: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _certificate("test CA", ca_key, _name("test CA"), ca_key, ca=True)
    ca_path, _ = _write(folder, "ca", ca, ca_key)
    server_key = _key()
    sans = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    server = _certificate("localhost", server_key, ca.subject, ca_key, sans=sans, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client_key, rogue_key = _key(), _key()
    client = _certificate("client", client_key, ca.subject, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = _certificate("rogue", rogue_key, _name("rogue CA"), rogue_ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    tokens = folder / "tokens"
    tokens.write_text(f"# accepted tokens\n\n{TOKEN}\n  {OTHER_TOKEN}  \n")
    tokens.chmod(0o600)
    return Pki(
        ca_path,
        *_write(folder, "server", server, server_key),
        *_write(folder, "client", client, client_key),
        *_write(folder, "rogue", rogue, rogue_key),
        tokens,
    )


def _start(**overrides) -> MnistServer:
    return MnistServer(test_config(backend="null", digit_detector="none", **overrides)).start()


def _credentials(pki: Pki, *, client: str | None = None) -> grpc.ChannelCredentials:
    cert, key = {
        None: (None, None),
        "client": (pki.client_cert, pki.client_key),
        "rogue": (pki.rogue_cert, pki.rogue_key),
    }[client]
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def _classify(channel: grpc.Channel, token: str | None = None) -> pb.ClassifyResponse:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    return pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(raw=RAW_DIGIT), timeout=5, metadata=metadata)


def _scrape(port: int, *, context: ssl.SSLContext | None = None, token: str | None = None) -> tuple[int, str, dict]:
    url = f"{'https' if context else 'http'}://127.0.0.1:{port}/metrics"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), dict(err.headers)


def _samples(text: str) -> dict[str, float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


# --- TokenChecker ----------------------------------------------------------------------------------


def test_the_tokens_file_skips_comments_blank_lines_and_surrounding_spaces(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(
        "# ops team\n\n   \nfirst-token-aaaaaaaaaaaa\n\t second-token-bbbbbbbbbbb=  \n#retired-token-cccccccc\n"
    )
    assert read_tokens(path) == ["first-token-aaaaaaaaaaaa", "second-token-bbbbbbbbbbb="]
    checker = TokenChecker.from_file(path)
    assert len(checker) == 2
    checker.check("Bearer first-token-aaaaaaaaaaaa")
    checker.check("bearer   second-token-bbbbbbbbbbb=")  # the scheme is case-insensitive
    with pytest.raises(PermissionDenied):
        checker.check("Bearer #retired-token-cccccccc")
    with pytest.raises(PermissionDenied):
        checker.check("Bearer retired-token-cccccccc")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n  # another\n"])
def test_a_tokens_file_without_a_token_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ValueError, match="holds no token"):
        TokenChecker.from_file(path)


def test_a_token_line_with_spaces_is_refused_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# header\ngood-token-aaaaaaaaaaaaaa\nalice: her-token\n")
    with pytest.raises(ValueError, match="line 3"):
        read_tokens(path)


def test_a_world_readable_tokens_file_is_loaded_with_a_warning(tmp_path: Path, caplog) -> None:
    path = tmp_path / "tokens"
    path.write_text("short\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="mnist.security"):
        TokenChecker.from_file(path)
    assert "readable by every user" in caplog.text and "shorter than" in caplog.text


@pytest.mark.parametrize(
    ("header", "reason"),
    [(None, "missing"), ("", "missing"), ("Basic dXNlcjpwdw==", "malformed"), ("Bearer", "malformed"),
     ("Bearer a b", "malformed"), (f"{TOKEN}", "malformed")],
)  # fmt: skip
def test_a_missing_or_malformed_header_is_unauthenticated(header: str | None, reason: str) -> None:
    with pytest.raises(Unauthenticated) as refused:
        TokenChecker([TOKEN]).check(header)
    assert refused.value.reason == reason
    status, headers = http_refusal(refused.value)
    assert status == HTTPStatus.UNAUTHORIZED and headers["WWW-Authenticate"].startswith("Bearer ")


@pytest.mark.parametrize("sent", ["wrong", TOKEN[:-1], TOKEN + "x", TOKEN.upper()])
def test_an_unknown_token_is_permission_denied(sent: str) -> None:
    with pytest.raises(PermissionDenied) as refused:
        TokenChecker([TOKEN]).check(f"Bearer {sent}")
    assert refused.value.reason == "invalid"
    assert http_refusal(refused.value) == (HTTPStatus.FORBIDDEN, {})


def test_every_token_is_compared_in_constant_time_even_after_a_match(monkeypatch: pytest.MonkeyPatch) -> None:
    compared = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    checker = TokenChecker([TOKEN, "x" * 40, "short-one"])
    checker.check(f"Bearer {TOKEN}")  # matches the first: the other two are compared all the same
    assert len(compared) == 3
    assert all(lengths == (32, 32) for lengths in compared)  # digests: lengths do not leak either
    compared.clear()
    with pytest.raises(PermissionDenied):
        checker.check("Bearer nope")
    assert len(compared) == 3


def test_repeated_authorization_metadata_reads_as_malformed() -> None:
    assert grpc_authorization([("user-agent", "x")]) is None
    assert grpc_authorization([("authorization", f"Bearer {TOKEN}")]) == f"Bearer {TOKEN}"
    both = grpc_authorization([("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer other")])
    with pytest.raises(Unauthenticated, match="malformed"):
        TokenChecker([TOKEN]).check(both)


# --- configuration ---------------------------------------------------------------------------------


def _config_error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        load_config(argv, environ={})
    return str(exit_.value)


def test_the_security_settings_are_validated_naming_what_is_wrong(pki: Pki, tmp_path: Path) -> None:
    assert "tls_cert needs tls_key" in _config_error(["--tls-cert", str(pki.server_cert)])
    assert "tls_key needs tls_cert" in _config_error(["--tls-key", str(pki.server_key)])
    assert "tls_client_ca (client certificates) needs tls_cert" in _config_error(["--tls-client-ca", str(pki.ca)])
    assert "metrics_auth on needs auth_tokens_file" in _config_error(["--metrics-auth", "on"])
    missing = str(tmp_path / "absent.pem")
    message = _config_error(["--tls-cert", missing, "--tls-key", str(pki.server_key)])
    assert f"tls_cert {missing} does not exist" in message
    mismatched = _config_error(["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)])
    assert "cannot load" in mismatched and str(pki.server_cert) in mismatched
    empty = tmp_path / "empty-tokens"
    empty.write_text("# nothing\n")
    assert "holds no token" in _config_error(["--auth-tokens-file", str(empty)])


def test_valid_security_settings_load_from_flags_and_environment(pki: Pki) -> None:
    config = load_config(
        ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--metrics-auth", "ON"],
        environ={"MNIST_SERVE_TLS_CLIENT_CA": str(pki.ca), "MNIST_SERVE_AUTH_TOKENS_FILE": str(pki.tokens)},
    )
    assert (config.tls_client_ca, config.auth_tokens_file, config.metrics_auth) == (str(pki.ca), str(pki.tokens), "on")
    context = http_ssl_context(config)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert http_ssl_context(load_config([], environ={})) is None


# --- bearer tokens on gRPC and /metrics --------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server(pki: Pki) -> Iterator[MnistServer]:
    server = _start(auth_tokens_file=str(pki.tokens), metrics_auth="on")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def token_channel(token_server: MnistServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{token_server.port}") as channel:
        yield channel


def _token_metrics(server: MnistServer) -> dict[str, float]:
    status, body, _ = _scrape(server.metrics_port, token=TOKEN)
    assert status == 200
    return _samples(body)


def _refused(server: MnistServer, protocol: str, reason: str) -> float:
    return _token_metrics(server)[f'mnist_auth_refused_total{{protocol="{protocol}",reason="{reason}"}}']


def test_a_call_without_a_token_is_unauthenticated_and_counted(
    token_server: MnistServer, token_channel: grpc.Channel
) -> None:
    before = _token_metrics(token_server)
    with pytest.raises(grpc.RpcError) as err:
        _classify(token_channel)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in err.value.details()
    after = _token_metrics(token_server)
    refused = 'mnist_auth_refused_total{protocol="grpc",reason="missing"}'
    answered = 'mnist_requests_total{code="UNAUTHENTICATED",method="Classify"}'
    assert after[refused] == before[refused] + 1
    assert after[answered] == before.get(answered, 0) + 1


def test_a_wrong_token_is_permission_denied_and_counted(token_server: MnistServer, token_channel: grpc.Channel) -> None:
    before = _refused(token_server, "grpc", "invalid")
    with pytest.raises(grpc.RpcError) as err:
        _classify(token_channel, token="not-a-token-we-know")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _refused(token_server, "grpc", "invalid") == before + 1


def test_an_accepted_token_is_answered(token_channel: grpc.Channel) -> None:
    assert len(_classify(token_channel, token=TOKEN).probabilities) == 10
    assert len(_classify(token_channel, token=OTHER_TOKEN).probabilities) == 10
    info = pb_grpc.ClassifierStub(token_channel).GetModelInfo(
        pb.GetModelInfoRequest(), timeout=5, metadata=(("authorization", f"Bearer {TOKEN}"),)
    )
    assert info.backend == "null"


def test_health_needs_no_token(token_channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(token_channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="mnist.v1.Classifier"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=5)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_reflection_needs_a_token(token_channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(token_channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    replies = stub.ServerReflectionInfo(iter([request]), timeout=5, metadata=(("authorization", f"Bearer {TOKEN}"),))
    names = {service.name for service in next(replies).list_services_response.service}
    assert "mnist.v1.Classifier" in names


def test_metrics_with_metrics_auth_on_need_a_token(token_server: MnistServer) -> None:
    before = _refused(token_server, "metrics", "missing")
    status, _, headers = _scrape(token_server.metrics_port)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert _scrape(token_server.metrics_port, token="nope")[0] == 403
    assert _refused(token_server, "metrics", "missing") == before + 1
    assert _refused(token_server, "metrics", "invalid") >= 1


def test_the_classify_command_sends_the_token_from_the_environment(
    token_server: MnistServer, capsys: pytest.CaptureFixture[str]
) -> None:
    image = str(next(SAMPLES.glob("*.png")))
    argv = ["--server", f"127.0.0.1:{token_server.port}", image]
    assert classify_cli.main(argv, environ={"MNIST_TOKEN": TOKEN}) == 0
    assert "certainty" in capsys.readouterr().out
    assert classify_cli.main(argv, environ={}) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


# --- TLS and mTLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[MnistServer]:
    server = _start(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[MnistServer]:
    server = _start(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca))
    yield server
    server.stop()


def _client_context(pki: Pki, client: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


# What a refusal looks like on the wire, told apart from a port nobody listens on (gRPC answers both UNAVAILABLE).
H2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # preface, empty SETTINGS
HTTP_HELLO = b"GET /livez HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
H2_SETTINGS = 0x04  # the frame type a gRPC server's first frame has
HANG_UPS = ("", "ConnectionResetError", "SSLEOFError", "SSLZeroReturnError", "SSLError")


@dataclass(frozen=True)
class Exchange:
    """One connection to a port: what a client saw at each step."""

    connected: bool  # the TCP connection was accepted
    handshake: bool = False  # the TLS handshake completed, the server's certificate verified against the test CA
    server_name: str = ""  # the common name of the certificate the server presented
    reply: bytes = b""  # the first bytes the server answered the hello with; b"" when it closed without a word
    error: str = ""  # the exception that ended the exchange, by type ("" when the server answered or closed)

    @property
    def closed_silently(self) -> bool:
        """Hung up on without an answer: EOF, a reset, or a TLS alert (SSLError), never a byte of the protocol."""
        return self.reply == b"" and self.error in HANG_UPS


def _exchange(port: int, hello: bytes, context: ssl.SSLContext | None = None) -> Exchange:
    """Connect to 127.0.0.1:`port`, with TLS over `context` when given, send `hello` and read the first answer."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    except ConnectionRefusedError:
        return Exchange(connected=False, error="ConnectionRefusedError")
    with sock:
        handshake, name = False, ""
        try:
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname="localhost")
                handshake = True
                name = dict(field[0] for field in sock.getpeercert()["subject"])["commonName"]
            sock.sendall(hello)
            return Exchange(True, handshake, name, sock.recv(64))
        except (ssl.SSLError, ConnectionError) as err:
            return Exchange(True, handshake, name, error=type(err).__name__)


def _tls(pki: Pki, client: str | None = None, *, tls12: bool = False, h2: bool = True) -> ssl.SSLContext:
    """A client context trusting the test CA, presenting `client`'s certificate ("client", "rogue") or none."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client is not None:
        cert, key = {"client": (pki.client_cert, pki.client_key), "rogue": (pki.rogue_cert, pki.rogue_key)}[client]
        context.load_cert_chain(str(cert), str(key))
    if tls12:  # the server checks a client certificate inside the handshake, not after it as in TLS 1.3
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if h2:
        context.set_alpn_protocols(["h2"])
    return context


def _refused_for_its_certificate(port: int, pki: Pki, client: str | None, hello: bytes = H2_HELLO) -> None:
    """The server on `port` speaks TLS with the test certificate, and hangs up on `client` (no or a rogue certificate)
    where the same client with the right certificate gets an answer: a refusal no closed port can give."""
    h2 = hello is H2_HELLO
    refused = _exchange(port, hello, _tls(pki, client, h2=h2))
    assert refused.handshake and refused.server_name == "localhost", refused  # TLS 1.3: the client finishes first
    assert refused.closed_silently, refused  # ... then the server, checking the certificate, closes unanswered
    accepted = _exchange(port, hello, _tls(pki, "client", h2=h2))
    assert accepted.handshake and accepted.reply, accepted
    if h2:
        assert accepted.reply[3] == H2_SETTINGS, accepted
    else:
        assert accepted.reply.startswith(b"HTTP/1.1 "), accepted
    cut = _exchange(port, hello, _tls(pki, client, tls12=True, h2=h2))  # TLS 1.2: the handshake itself is cut short
    assert cut.connected and not cut.handshake and cut.error in HANG_UPS[1:], cut
    assert _exchange(port, hello, _tls(pki, "client", tls12=True, h2=h2)).handshake


def _closed_port() -> int:
    port = free_port()
    assert not _exchange(port, H2_HELLO).connected  # nobody listens there
    return port


def _unavailable(target: str, credentials: grpc.ChannelCredentials | None) -> str:
    """The details of the UNAVAILABLE a Classify call to `target` gets."""
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel, pytest.raises(grpc.RpcError) as err:
        _classify(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    return err.value.details()


def test_a_closed_port_is_unavailable_with_connection_refused_which_no_refusal_gives(pki: Pki) -> None:
    """The control for the refusals below: gRPC says UNAVAILABLE for a port nobody listens on too, but names the
    refused connection; a raw connection is refused before any TLS."""
    port = _closed_port()
    assert "Connection refused" in _unavailable(f"127.0.0.1:{port}", None)
    assert "Connection refused" in _unavailable(f"localhost:{port}", _credentials(pki, client="client"))
    assert _exchange(port, H2_HELLO, _tls(pki, "client")) == Exchange(False, error="ConnectionRefusedError")


def test_a_tls_server_answers_a_tls_client(pki: Pki, tls_server: MnistServer) -> None:
    for host in ("localhost", "127.0.0.1"):  # both names the certificate carries
        with grpc.secure_channel(f"{host}:{tls_server.port}", _credentials(pki)) as channel:
            assert len(_classify(channel).probabilities) == 10


def test_a_tls_server_refuses_a_plaintext_client(pki: Pki, tls_server: MnistServer) -> None:
    details = _unavailable(f"127.0.0.1:{tls_server.port}", None)
    assert "Connection refused" not in details  # the connection was taken, then dropped: not a closed port
    plain = _exchange(tls_server.port, H2_HELLO)
    assert plain.connected and not plain.handshake and plain.closed_silently, plain  # HTTP/2 in clear: hung up on
    tls = _exchange(tls_server.port, H2_HELLO, _tls(pki))
    assert tls.server_name == "localhost" and tls.reply[3] == H2_SETTINGS, tls  # the same hello over TLS: answered


def test_a_client_that_does_not_trust_the_servers_ca_fails(pki: Pki, tls_server: MnistServer) -> None:
    untrusting = grpc.ssl_channel_credentials(root_certificates=pki.rogue_cert.read_bytes())
    details = _unavailable(f"localhost:{tls_server.port}", untrusting)
    assert "handshake failed" in details.lower() and "CERTIFICATE_VERIFY_FAILED" in details  # it saw a certificate
    assert "Connection refused" not in details


def test_metrics_are_served_over_tls_too(pki: Pki, tls_server: MnistServer) -> None:
    status, body, _ = _scrape(tls_server.metrics_port, context=_client_context(pki))
    assert status == 200 and "mnist_auth_refused_total" in body
    # plain HTTP: the connection is taken, then closed unanswered (a closed port raises URLError, refused)
    with pytest.raises(ConnectionError):
        urllib.request.urlopen(f"http://127.0.0.1:{tls_server.metrics_port}/metrics", timeout=5).read()
    plain = _exchange(tls_server.metrics_port, HTTP_HELLO)
    assert plain.connected and plain.closed_silently, plain
    tls = _exchange(tls_server.metrics_port, HTTP_HELLO, _tls(pki, h2=False))
    assert tls.server_name == "localhost" and tls.reply.startswith(b"HTTP/1.1 200"), tls


def test_the_health_command_connects_with_tls_ca(pki: Pki, tls_server: MnistServer, capsys) -> None:
    argv = ["--health", "--timeout", "2", "--server", f"localhost:{tls_server.port}"]
    assert classify_cli.main([*argv, "--tls-ca", str(pki.ca)], environ={}) == 0
    assert classify_cli.main(argv, environ={"MNIST_TLS_CA": str(pki.ca)}) == 0
    assert classify_cli.main(argv, environ={}) == 1  # plaintext against TLS
    assert "SERVING" in capsys.readouterr().out


def test_mtls_refuses_a_client_without_a_certificate(pki: Pki, mtls_server: MnistServer) -> None:
    assert "Connection refused" not in _unavailable(f"localhost:{mtls_server.port}", _credentials(pki))
    _refused_for_its_certificate(mtls_server.port, pki, client=None)


def test_mtls_refuses_a_certificate_from_an_unknown_ca(pki: Pki, mtls_server: MnistServer) -> None:
    assert "Connection refused" not in _unavailable(f"localhost:{mtls_server.port}", _credentials(pki, client="rogue"))
    _refused_for_its_certificate(mtls_server.port, pki, client="rogue")


def test_mtls_answers_a_client_with_a_certificate(pki: Pki, mtls_server: MnistServer) -> None:
    with grpc.secure_channel(f"localhost:{mtls_server.port}", _credentials(pki, client="client")) as channel:
        assert len(_classify(channel).probabilities) == 10
    argv = ["--health", "--timeout", "2", "--server", f"localhost:{mtls_server.port}", "--tls-ca", str(pki.ca)]
    assert classify_cli.main([*argv, "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)], {}) == 0


def test_mtls_applies_to_metrics(pki: Pki, mtls_server: MnistServer) -> None:
    assert _scrape(mtls_server.metrics_port, context=_client_context(pki, client=True))[0] == 200
    with pytest.raises((ssl.SSLError, ConnectionError)):  # after the handshake: not URLError, as a closed port
        _scrape(mtls_server.metrics_port, context=_client_context(pki))
    _refused_for_its_certificate(mtls_server.metrics_port, pki, client=None, hello=HTTP_HELLO)
    _refused_for_its_certificate(mtls_server.metrics_port, pki, client="rogue", hello=HTTP_HELLO)


def _livez_environ(server: MnistServer, pki: Pki) -> dict[str, str]:
    """The variables the image's HEALTHCHECK (server/livez_probe.py) sees beside a server with TLS on."""
    tls = {"MNIST_SERVE_TLS_CERT": str(pki.server_cert)}
    return {"MNIST_SERVE_HOST": "127.0.0.1", "MNIST_SERVE_METRICS_PORT": str(server.metrics_port), **tls}


def test_livez_is_served_over_tls_and_the_healthcheck_speaks_it(pki: Pki, tls_server: MnistServer) -> None:
    url = f"https://127.0.0.1:{tls_server.metrics_port}/livez"
    with urllib.request.urlopen(url, timeout=5, context=_client_context(pki)) as response:
        assert (response.status, response.read()) == (200, b"ok\n")
    environ = _livez_environ(tls_server, pki)
    assert livez_probe.main([], environ) == 0
    environ.pop("MNIST_SERVE_TLS_CERT")
    assert livez_probe.main([], environ) == 1  # plain HTTP to the TLS port


def test_livez_under_mtls_needs_the_client_certificate(pki: Pki, mtls_server: MnistServer) -> None:
    environ = _livez_environ(mtls_server, pki)
    assert livez_probe.main([], environ) == 1  # like the kubelet's httpGet probe: no certificate, no answer
    client = {"MNIST_TLS_CERT": str(pki.client_cert), "MNIST_TLS_KEY": str(pki.client_key)}
    assert livez_probe.main([], {**environ, **client}) == 0


# --- the HTTP API (server/transport/rest.py) takes the same TLS and tokens ------------------------------------


@pytest.fixture(scope="module")
def rest_server(pki: Pki) -> Iterator[MnistServer]:
    server = _start(
        http_port=free_port(),
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        auth_tokens_file=str(pki.tokens),
    )
    yield server
    server.stop()


def _get(url: str, context: ssl.SSLContext | None, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers)


def test_the_http_api_serves_tls_and_checks_tokens_like_grpc(pki: Pki, rest_server: MnistServer) -> None:
    base, context = f"https://localhost:{rest_server.http_port}", _client_context(pki)
    assert _get(f"{base}/v2/health/ready", context)[0] == 200  # health: no token
    status, headers = _get(f"{base}/v2", context)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert _get(f"{base}/v2", context, token="not-a-token-we-know")[0] == 403
    assert _get(f"{base}/v2", context, token=TOKEN)[0] == 200
    status, body, _ = _scrape(rest_server.metrics_port, context=context)
    samples = _samples(body)
    assert samples['mnist_auth_refused_total{protocol="http",reason="missing"}'] >= 1
    assert samples['mnist_auth_refused_total{protocol="http",reason="invalid"}'] >= 1
    with pytest.raises(ConnectionError):  # plain HTTP to the TLS port: taken, then closed unanswered
        urllib.request.urlopen(f"http://127.0.0.1:{rest_server.http_port}/v2/health/ready", timeout=5).read()
    assert _exchange(rest_server.http_port, HTTP_HELLO).closed_silently
    tls = _exchange(rest_server.http_port, HTTP_HELLO.replace(b"/livez", b"/v2/health/live"), _tls(pki, h2=False))
    assert tls.server_name == "localhost" and tls.reply.startswith(b"HTTP/1.1 200"), tls


def test_a_closed_http_port_raises_url_error_not_the_tls_refusal(pki: Pki) -> None:
    """The control for the plain-HTTP refusals above: a port nobody listens on fails at connect, as URLError."""
    with pytest.raises(urllib.error.URLError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{_closed_port()}/livez", timeout=5).read()
    assert isinstance(err.value.reason, ConnectionRefusedError) and not isinstance(err.value, ConnectionError)
