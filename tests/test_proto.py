"""The committed generated code matches proto/mnist/v1/classifier.proto (regenerate: see README)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from proto.mnist.v1 import classifier_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_matches_the_proto_file(tmp_path: Path) -> None:
    out = tmp_path / "descriptor.pb"
    assert (
        protoc.main(
            ["protoc", f"-I{ROOT}", f"--descriptor_set_out={out}", str(ROOT / "proto/mnist/v1/classifier.proto")]
        )
        == 0
    )
    (fresh,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    for message in fresh.message_type:  # generated Python code omits the derived JSON names
        for field in message.field:
            field.ClearField("json_name")
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert committed == fresh, (
        "regenerate: python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. "
        "--pyi_out=. proto/mnist/v1/classifier.proto"
    )


def test_the_contract_keeps_its_field_numbers() -> None:
    assert pb.ClassifyRequest.ENCODED_FIELD_NUMBER == 1 and pb.ClassifyRequest.RAW_FIELD_NUMBER == 2
    assert pb.ClassifyResponse.DESCRIPTOR.fields_by_name["request_id"].number == 5
    assert pb.ModelInfo.DESCRIPTOR.fields_by_name["test_accuracy"].number == 6
    assert [m.name for m in pb.DESCRIPTOR.services_by_name["Classifier"].methods] == [
        "Classify",
        "ClassifyBatch",
        "GetModelInfo",
        "ListModels",
        "ReadDigits",
        "ReadTable",
        "ReadExpression",
        "Feedback",
    ]
    assert pb.ClassifyRequest.DESCRIPTOR.fields_by_name["model_version"].number == 5  # added fields: old clients work


# --- the Open Inference Protocol's files, vendored ------------------------------------------------

INFERENCE_FILES = ("grpc_service.proto", "model_config.proto")


def _message_fields(file: descriptor_pb2.FileDescriptorProto) -> dict[str, list[tuple]]:
    """Every message, nested ones too, by full name -> its fields as (name, number, type, label, type name, oneof),
    and every enum -> its values: what a stale stub would get wrong on the wire."""
    table: dict[str, list[tuple]] = {}

    def walk(prefix: str, messages, enums) -> None:
        for enum in enums:
            table[f"{prefix}.{enum.name}"] = [(value.name, value.number) for value in enum.value]
        for message in messages:
            name = f"{prefix}.{message.name}"
            table[name] = [
                (f.name, f.number, f.type, f.label, f.type_name, f.oneof_index if f.HasField("oneof_index") else None)
                for f in message.field
            ]
            walk(name, message.nested_type, message.enum_type)

    walk(file.package, file.message_type, file.enum_type)
    return table


def _without_json_names(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """Generated Python code omits the derived JSON names; protoc's descriptor set has them."""

    def clear(messages) -> None:
        for message in messages:
            for field in message.field:
                field.ClearField("json_name")
            clear(message.nested_type)

    clear(file.message_type)
    return file


@pytest.mark.parametrize("name", INFERENCE_FILES)
def test_the_vendored_inference_protocol_matches_its_generated_code(tmp_path: Path, name: str) -> None:
    from proto.inference import grpc_service_pb2, model_config_pb2

    generated = {"grpc_service.proto": grpc_service_pb2, "model_config.proto": model_config_pb2}[name]
    folder = ROOT / "proto/inference"
    out = tmp_path / "descriptor.pb"
    assert protoc.main(["protoc", f"-I{folder}", f"--descriptor_set_out={out}", name]) == 0
    (fresh,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    fresh = _without_json_names(fresh)
    committed = _without_json_names(descriptor_pb2.FileDescriptorProto.FromString(generated.DESCRIPTOR.serialized_pb))
    assert committed.package == fresh.package == "inference"
    stale, current = _message_fields(committed), _message_fields(fresh)
    assert stale.keys() == current.keys(), "messages differ; regenerate: python -m proto.generate"
    for message, fields in current.items():
        assert stale[message] == fields, f"{message}: fields differ; regenerate: python -m proto.generate"
    assert committed.service == fresh.service, "regenerate: python -m proto.generate"
    assert committed == fresh, "regenerate: python -m proto.generate"  # options, oneof names, imports: the rest


def test_the_vendored_inference_protocol_keeps_its_license() -> None:
    folder = ROOT / "proto/inference"
    assert (folder / "LICENSE").read_text().startswith("Copyright"), "the BSD-3-Clause notice travels with the files"


# --- the stubs install where users are ------------------------------------------------------------

FLOOR_WHEELS = ROOT / ".floor-wheels"  # downloaded by the README's test command


def _stub_stamps() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The newest grpcio and protobuf versions any committed stub demands at import."""
    grpc_stamps, protobuf_stamps = [], []
    for path in (ROOT / "proto").rglob("*_pb2_grpc.py"):
        if match := re.search(r"^GRPC_GENERATED_VERSION = '([\d.]+)'", path.read_text(), re.MULTILINE):
            grpc_stamps.append(tuple(map(int, match.group(1).split("."))))
    for path in (ROOT / "proto").rglob("*_pb2.py"):
        match = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", path.read_text())
        assert match, f"{path.name} has no protobuf version stamp: was it generated by the pinned generator?"
        protobuf_stamps.append(tuple(map(int, match.groups())))
    assert grpc_stamps and protobuf_stamps
    return max(grpc_stamps), max(protobuf_stamps)


def _floors(extra: str) -> dict[str, tuple[int, ...]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for requirement in project["optional-dependencies"][extra]:
        if match := re.fullmatch(r"([\w-]+)>=([\d.]+)", requirement.replace(" ", "")):
            floors[match.group(1)] = tuple(map(int, match.group(2).split(".")))
    return floors


@pytest.mark.parametrize("extra", ["serve", "serve-cpu"])
def test_pyproject_floors_are_what_the_generated_stubs_require(extra: str) -> None:
    grpc_stamp, protobuf_stamp = _stub_stamps()
    floors = _floors(extra)
    assert floors["protobuf"] == protobuf_stamp, (
        f"[{extra}] protobuf floor must be {'.'.join(map(str, protobuf_stamp))}"
    )
    for package in ("grpcio", "grpcio-health-checking", "grpcio-reflection"):
        assert floors[package] == grpc_stamp, f"[{extra}] {package} floor must be {'.'.join(map(str, grpc_stamp))}"


def test_the_stub_generator_is_pinned_to_the_version_in_proto_generate() -> None:
    from proto.generate import GENERATOR, GENERATOR_VERSION

    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert f"{GENERATOR}=={GENERATOR_VERSION}" in [r.replace(" ", "") for r in dev]
    assert GENERATOR_VERSION == ".".join(map(str, _stub_stamps()[0]))


def test_the_stubs_import_under_the_floor_versions(tmp_path: Path) -> None:
    """A user with exactly the floor grpcio and protobuf installs cleanly and imports every stub."""
    floors = _floors("serve")
    wanted = {name: ".".join(map(str, floors[name])) for name in ("grpcio", "protobuf")}
    wheels = sorted(FLOOR_WHEELS.glob("*.whl")) if FLOOR_WHEELS.is_dir() else []
    for name, version in wanted.items():
        assert any(w.name.startswith(f"{name}-{version}-") for w in wheels), (
            f"no {name}=={version} wheel in {FLOOR_WHEELS}: the README's test command downloads the floor versions "
            f"there (pip download -d .floor-wheels grpcio=={wanted['grpcio']} "
            f"protobuf=={wanted['protobuf']})"
        )
    venv = tmp_path / "floor"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index"]
    subprocess.run([*install, "--find-links", str(FLOOR_WHEELS), *(f"{n}=={v}" for n, v in wanted.items())], check=True)
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts) for path in (ROOT / "proto").rglob("*_pb2*.py")
    )
    probe = "import importlib, sys, grpc, google.protobuf as pb; [importlib.import_module(m) for m in sys.argv[1:]]; "
    probe += "print(grpc.__version__, pb.__version__)"
    result = subprocess.run(
        [str(python), "-I", "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); " + probe, *modules],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [wanted["grpcio"], wanted["protobuf"]]
