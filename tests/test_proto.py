"""The committed generated code matches proto/mnist/v1/classifier.proto (regenerate: see README)."""

from __future__ import annotations

from pathlib import Path

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
    ]
