"""The Open Inference Protocol (KServe v2) over gRPC, as Triton Inference Server publishes it.

grpc_service.proto and model_config.proto are NVIDIA's, unmodified, under the BSD-3-Clause licence in
LICENSE (github.com/triton-inference-server/common, protobuf/, commit 83adf7c of 2026-07-23). The
*_pb2 modules are generated from them by `python -m proto.generate`.
"""
