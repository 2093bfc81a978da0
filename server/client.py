"""A small Python client for mnist.v1.Classifier, and the `mnist-classify` command.

Against a server started with TLS (docs/security.md): `--tls` trusts the system's root CAs,
`--tls-ca FILE` a CA of your own; `--tls-cert/--tls-key` present a client certificate (mTLS);
`--token` (better: the environment variable MNIST_TOKEN, which `ps` does not show) sends
`authorization: Bearer <token>` with every call. Each flag has an environment variable (see --help),
so the image's HEALTHCHECK follows the container's settings.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.mnist.v1 import classifier_pb2 as pb
from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc
from server.balancing import channel_options, channel_target
from server.pipeline.table_csv import table_csv

STOPPING_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class ClassifierClient:
    """`with ClassifierClient("localhost:50051") as c: c.classify_file("digit.png").digit`"""

    def __init__(
        self,
        target: str,
        timeout: float = 10.0,
        *,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        model_name: str = "",
        model_version: str = "",
    ) -> None:
        """TLS when `tls` or any of the `tls_*` files is given (else plaintext): `tls_ca` replaces the system's
        root CAs, `tls_cert`+`tls_key` are the client's certificate for mTLS, `tls_server_name` the name the
        server's certificate is checked against (default: the host of `target`). `token`: sent as a bearer token.
        `model_name` / `model_version`: which model and version answer (empty: the server's defaults)."""
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("a client certificate needs both tls_cert and tls_key")
        if tls or tls_ca or tls_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
                private_key=Path(tls_key).read_bytes() if tls_key else None,
                certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
            )
            options = channel_options(target)
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self.channel = grpc.secure_channel(channel_target(target), credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(channel_target(target), options=channel_options(target))
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.timeout = timeout
        self.model = {"model_name": model_name, "model_version": model_version}

    def __enter__(self) -> ClassifierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def classify_encoded(self, data: bytes, request_id: str = "") -> pb.ClassifyResponse:
        return self.stub.Classify(
            pb.ClassifyRequest(encoded=data, request_id=request_id, **self.model),
            timeout=self.timeout,
            metadata=self.metadata,
        )

    def classify_raw(self, pixels: bytes, request_id: str = "") -> pb.ClassifyResponse:
        """`pixels`: 784 bytes, 28x28 uint8 row-major, light digit on dark (MNIST layout)."""
        return self.stub.Classify(
            pb.ClassifyRequest(raw=pixels, request_id=request_id, **self.model),
            timeout=self.timeout,
            metadata=self.metadata,
        )

    def classify_file(self, path: str | Path) -> pb.ClassifyResponse:
        return self.classify_encoded(Path(path).read_bytes(), request_id=str(path))

    def classify_batch(self, requests: list[pb.ClassifyRequest]) -> list[pb.ClassifyResponse]:
        reply = self.stub.ClassifyBatch(
            pb.ClassifyBatchRequest(requests=requests, **self.model), timeout=self.timeout, metadata=self.metadata
        )
        return list(reply.responses)

    def model_info(self) -> pb.ModelInfo:
        request = pb.GetModelInfoRequest(**self.model)
        return self.stub.GetModelInfo(request, timeout=self.timeout, metadata=self.metadata)

    def read_digits(self, data: bytes, expected_digits: int = 0, request_id: str = "") -> pb.ReadDigitsResponse:
        """Every digit in an image of a number (or several lines of them): the text, boxes and confidences."""
        request = pb.ReadDigitsRequest(image=data, expected_digits=expected_digits, request_id=request_id, **self.model)
        return self.stub.ReadDigits(request, timeout=self.timeout, metadata=self.metadata)

    def read_table(self, data: bytes, request_id: str = "") -> pb.ReadTableResponse:
        """The rows and cells of a table of numbers in an image, ruled or not."""
        request = pb.ReadTableRequest(image=data, request_id=request_id, **self.model)
        return self.stub.ReadTable(request, timeout=self.timeout, metadata=self.metadata)

    def read_expression(self, data: bytes, request_id: str = "") -> pb.ReadExpressionResponse:
        """A line of handwritten arithmetic, read and evaluated exactly."""
        request = pb.ReadExpressionRequest(image=data, request_id=request_id, **self.model)
        return self.stub.ReadExpression(request, timeout=self.timeout, metadata=self.metadata)

    def feedback(self, request_id: str, truth: str) -> pb.FeedbackResponse:
        """The true label of an earlier answer: one digit (Classify) or a number's digits (ReadDigits)."""
        request = pb.FeedbackRequest(request_id=request_id, model_name=self.model.get("model_name", ""))
        if len(truth) == 1 and truth.isdigit():
            request.label = int(truth)
        else:
            request.text = truth
        return self.stub.Feedback(request, timeout=self.timeout, metadata=self.metadata)

    def list_models(self) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self.metadata)

    def wait_until_serving(self, seconds: float) -> bool:
        """Poll grpc.health.v1 until the server reports SERVING (True) or `seconds` pass (False)."""
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + seconds
        while True:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def certainty(confidence: float) -> str:
    """0.985 -> '.985', as the reference system printed it; 1.0 stays '1.000'."""
    text = f"{confidence:.3f}"
    return text[1:] if text.startswith("0") else text


def _add_security_arguments(parser: argparse.ArgumentParser, environ: dict[str, str]) -> None:
    def env(name: str) -> str | None:
        return environ.get(name) or None

    group = parser.add_argument_group("TLS and tokens (each also read from the environment variable shown)")
    group.add_argument(
        "--tls",
        action="store_true",
        default=(env("MNIST_TLS") or "").lower() in ("1", "true", "yes", "on"),
        help="connect over TLS, trusting the system's root CAs [env MNIST_TLS=1]",
    )
    group.add_argument(
        "--tls-ca",
        default=env("MNIST_TLS_CA"),
        metavar="PEM",
        help="connect over TLS, trusting this CA instead of the system's [env MNIST_TLS_CA]",
    )
    group.add_argument(
        "--tls-cert",
        default=env("MNIST_TLS_CERT"),
        metavar="PEM",
        help="client certificate for servers that require one (mTLS; with --tls-key) [env MNIST_TLS_CERT]",
    )
    group.add_argument(
        "--tls-key", default=env("MNIST_TLS_KEY"), metavar="PEM", help="its private key [env MNIST_TLS_KEY]"
    )
    group.add_argument(
        "--tls-server-name",
        default=env("MNIST_TLS_SERVER_NAME"),
        metavar="NAME",
        help="check the server's certificate against this name instead of --server's host [env MNIST_TLS_SERVER_NAME]",
    )
    group.add_argument(
        "--token",
        default=env("MNIST_TOKEN"),
        help="bearer token sent with every call; prefer the environment variable, which ps does not show "
        "[env MNIST_TOKEN]",
    )


def _security_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together (a client certificate and its key)")
    for flag in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            parser.error(f"--{flag.replace('_', '-')} {path}: no such file")
    return {
        "tls": args.tls,
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_server_name": args.tls_server_name,
        "token": args.token,
    }


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mnist-classify",
        description="Classify image files of handwritten digits with a running mnist-serve; prints one line per file.",
    )
    parser.add_argument("images", nargs="*", type=Path, help="PNG, JPEG, BMP, GIF or WebP files, any size")
    parser.add_argument(
        "--server",
        default="localhost:50051",
        help="HOST:PORT of mnist-serve; or several, comma-separated, or dns:///NAME:PORT (every address of a headless "
        "Service): calls then go round-robin over the replicas and are retried on another when one is unavailable",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer")
    parser.add_argument("--probabilities", action="store_true", help="also print all ten probabilities")
    parser.add_argument(
        "--wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to this long for the server to report SERVING (e.g. right after start)",
    )
    parser.add_argument(
        "--health",
        action="store_true",
        help="only check grpc.health.v1: exit 0 if the server is SERVING, else 1 (for HEALTHCHECK)",
    )
    parser.add_argument("--model-name", default="", help="which model answers (default: the server's default model)")
    parser.add_argument("--model-version", default="", help="which version of it (default: its default version)")
    parser.add_argument(
        "--list-models", action="store_true", help="list the server's models and versions with their state, and exit"
    )
    parser.add_argument(
        "--read",
        action="store_true",
        help="read each image as a number (ReadDigits): several digits, in one or more lines; prints the text read, "
        "its confidence and each digit's box",
    )
    parser.add_argument(
        "--expected-digits", type=int, default=0, help="with --read: how many digits each image holds, if known"
    )
    parser.add_argument(
        "--table",
        action="store_true",
        help="read each image as a table of numbers (ReadTable), ruled or not: prints its rows, cells separated by "
        "tabs, empty cells empty. The server refuses a table of more than --max-table-cells cells (256 unless its "
        "operator set another limit), naming its rows and columns",
    )
    parser.add_argument(
        "--csv",
        type=Path,
        metavar="OUT.csv",
        help="with --table: also write the cells as CSV (several images: OUT-<image name>.csv)",
    )
    parser.add_argument(
        "--expression",
        action="store_true",
        help="read each image as one line of handwritten arithmetic (ReadExpression): digits and + - × ÷ = "
        "(minus as a dash; division as ÷ or :); prints the expression, its exact value (19, -3, 3/4) and, after an "
        "=, whether the written answer is right; what cannot be evaluated (division by zero) is printed as an error",
    )
    parser.add_argument(
        "--annotate",
        type=Path,
        metavar="OUT.png",
        help="with --read, --table or --expression: write the image with what was read drawn on it (several images: "
        "OUT-<image name>.png)",
    )
    parser.add_argument(
        "--feedback",
        nargs=2,
        metavar=("REQUEST_ID", "TRUTH"),
        help="tell the server the true label of an earlier answer and exit: REQUEST_ID is the answer's (this client "
        "sends each image's path as its id, so `--feedback digit.png 7` labels the last answer for digit.png), "
        "TRUTH the true digit, or the true number of a --read answer. Prints whether the answer was right and the "
        "version's live accuracy. Needs a token with the feedback scope when the server checks tokens",
    )
    _add_security_arguments(parser, dict(os.environ if environ is None else environ))
    args = parser.parse_args(argv)
    try:
        channel_target(args.server)
    except ValueError as problem:
        parser.error(f"--server: {problem}")
    if sum((args.read, args.table, args.expression)) > 1:
        parser.error("--read, --table and --expression each read images their own way: give one of them")
    if args.csv and not args.table:
        parser.error("--csv goes with --table")
    if args.annotate and not (args.read or args.table or args.expression):
        parser.error("--annotate goes with --read, --table or --expression")
    security = _security_options(parser, args)
    security.update(model_name=args.model_name, model_version=args.model_version)
    if args.list_models:
        with ClassifierClient(args.server, args.timeout, **security) as client:
            try:
                listed = client.list_models()
            except grpc.RpcError as exc:
                print(f"mnist-classify: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
        for m in listed.models:
            flags = " (default)" if m.is_default else ""
            detail = f": {m.reason}" if m.reason else ""
            if m.state == "READY":
                detail = f", loaded in {m.load_seconds:.2f} s"
            print(f"{m.name} {m.version} {m.state}{flags}{detail}")
        return 0
    if args.feedback:
        request_id, truth = args.feedback
        if not truth.strip() or not all(c.isdigit() or c.isspace() for c in truth):
            parser.error(f"--feedback: the truth is a digit or a number, not {truth!r}")
        with ClassifierClient(args.server, args.timeout, **security) as client:
            try:
                reply = client.feedback(request_id, truth.strip())
            except grpc.RpcError as exc:
                print(f"mnist-classify: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
        verdict = "right" if reply.correct else "wrong"
        live = f"{reply.live_accuracy:.1%} over its last {reply.live_answers} labelled answers"
        kept = "stored" if reply.stored else "not stored (the server keeps no feedback database)"
        print(
            f"{request_id}: {reply.model_name} {reply.model_version} answered {reply.prediction!r}, {verdict}; "
            f"live accuracy {live}; {kept}"
        )
        return 0
    if args.health:
        with ClassifierClient(args.server, args.timeout, **security) as client:
            serving = client.wait_until_serving(args.wait)
        print(f"{args.server}: {'SERVING' if serving else 'not serving'}")
        return 0 if serving else 1
    if not args.images:
        parser.error("give at least one image file (or --health, or --list-models)")
    failures = 0
    with ClassifierClient(args.server, args.timeout, **security) as client:
        if args.wait and not client.wait_until_serving(args.wait):
            print(f"mnist-classify: {args.server} did not report SERVING within {args.wait:g} s", file=sys.stderr)
            return 1
        for path in args.images:
            if args.read or args.table or args.expression:
                reader = _read_one if args.read else _read_table if args.table else _read_expression
                try:
                    failures += not reader(client, path, args)
                except grpc.RpcError as exc:
                    print(f"{path}: {exc.code().name}: {exc.details()}", file=sys.stderr)
                    failures += 1
                    if exc.code() in STOPPING_CODES:
                        break
                continue
            try:
                reply = client.classify_file(path)
            except OSError as exc:
                print(f"{path}: cannot read: {exc.strerror}", file=sys.stderr)
                failures += 1
                continue
            except grpc.RpcError as exc:
                print(f"{path}: {exc.code().name}: {exc.details()}", file=sys.stderr)
                failures += 1
                if exc.code() in STOPPING_CODES:  # every further call would fail the same way
                    break
                continue
            line = f"{path}: {reply.digit} with {certainty(reply.confidence)} certainty"
            if args.model_name or args.model_version:
                line += f" (version {reply.model_version})"
            if args.probabilities:
                line += "  [" + " ".join(f"{p:.3f}" for p in reply.probabilities) + "]"
            print(line)
    return 1 if failures else 0


def _read_one(client: ClassifierClient, path: Path, args: argparse.Namespace) -> bool:
    data = _image_bytes(path)
    if data is None:
        return False
    reply = client.read_digits(data, args.expected_digits, request_id=str(path))
    shown = reply.text.replace("\n", " / ")
    print(f"{path}: {shown!r} with {certainty(reply.confidence)} certainty ({len(reply.digits)} digits)")
    for d in reply.digits:
        others = ", ".join(f"{a.digit} {a.probability:.3f}" for a in d.alternatives[1:])
        print(f"  {d.digit} at x={d.x} y={d.y} {d.width}x{d.height}, line {d.line} group {d.group}: {d.confidence:.3f}"
              f" (then {others})")  # fmt: skip
    if args.annotate:
        out = _output_for(args.annotate, path, len(args.images))
        annotate(data, [(d.x, d.y, d.width, d.height, str(d.digit), d.confidence) for d in reply.digits], reply.text,
                 reply.confidence, out)  # fmt: skip
        print(f"  wrote {out}")
    return True


def _read_table(client: ClassifierClient, path: Path, args: argparse.Namespace) -> bool:
    data = _image_bytes(path)
    if data is None:
        return False
    reply = client.read_table(data, request_id=str(path))
    ruling = "ruled" if reply.ruled_rows or reply.ruled_columns else "unruled"
    print(
        f"{path}: {len(reply.rows)} rows x {reply.columns} columns ({ruling}, turned {reply.skew_degrees:+.1f}°) with "
        f"{certainty(reply.confidence)} certainty"
    )
    for row in reply.rows:
        print("  " + "\t".join(cell.text for cell in row.cells))
    if args.csv:
        out = _output_for(args.csv, path, len(args.images))
        out.write_text(table_csv([[cell.text for cell in row.cells] for row in reply.rows]))
        print(f"  wrote {out}")
    if args.annotate:
        out = _output_for(args.annotate, path, len(args.images))
        cells = [(c.x, c.y, c.width, c.height, c.text, c.confidence) for row in reply.rows for c in row.cells]
        annotate(data, cells, f"{len(reply.rows)} x {reply.columns} table", reply.confidence, out)
        print(f"  wrote {out}")
    return True


def _read_expression(client: ClassifierClient, path: Path, args: argparse.Namespace) -> bool:
    data = _image_bytes(path)
    if data is None:
        return False
    reply = client.read_expression(data, request_id=str(path))
    outcome = f"= {reply.value}" if reply.value else "no value"
    if reply.written_answer:
        outcome += f"; the written answer {reply.written_answer} is {'right' if reply.answer_correct else 'wrong'}"
    print(f"{path}: {reply.text!r} {outcome} (read with {certainty(reply.confidence)} certainty)")
    if reply.error:
        print(f"  error: {reply.error}")
    for s in reply.symbols:
        others = ", ".join(f"{a.symbol} {a.probability:.3f}" for a in s.alternatives[1:])
        print(f"  {s.symbol} at x={s.x} y={s.y} {s.width}x{s.height}: {s.confidence:.3f} (then {others})")
    if args.annotate:
        out = _output_for(args.annotate, path, len(args.images))
        symbols = [(s.x, s.y, s.width, s.height, s.symbol, s.confidence) for s in reply.symbols]
        annotate(data, symbols, f"{reply.text} {outcome}", reply.confidence, out)
        print(f"  wrote {out}")
    return True


def _image_bytes(path: Path) -> bytes | None:
    """The file's bytes, or None after saying on stderr why it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        print(f"{path}: cannot read: {exc.strerror}", file=sys.stderr)
        return None


def _output_for(out: Path, image: Path, images: int) -> Path:
    """`out` itself for one image; OUT-<image name>.<suffix> for each of several."""
    return out if images == 1 else out.with_name(f"{out.stem}-{image.stem}{out.suffix}")


def annotate(
    data: bytes, boxes: list[tuple[int, int, int, int, str, float]], caption: str, confidence: float, out: Path
) -> None:
    """The image with each box (x, y, width, height, what was read, confidence) drawn, and a caption under it:
    green where the server was sure, orange where less, red where it doubted."""
    from PIL import Image, ImageDraw, ImageOps

    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    band = max(18, image.height // 8)
    canvas = Image.new("RGB", (image.width, image.height + band), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for x, y, width, height, text, sure in boxes:
        colour = (0, 160, 0) if sure >= 0.9 else (230, 120, 0) if sure >= 0.5 else (220, 0, 0)
        draw.rectangle((x, y, x + width - 1, y + height - 1), outline=colour, width=2)
        draw.text((x + 2, max(0, y - 12)), text, fill=colour)
    draw.text((4, image.height + 4), f"{caption.replace(chr(10), ' / ')}  ({confidence:.1%})", fill=(0, 0, 0))
    canvas.save(out)


if __name__ == "__main__":
    sys.exit(main())
