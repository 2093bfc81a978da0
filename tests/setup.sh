#!/usr/bin/env bash
# Everything the test suite needs, installed where missing (the README's test command runs this first; so does CI).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: prometheus (promtool and the Prometheus integration test), chromium (the web page in a real
# headless browser), nodejs and npm (a client on another gRPC stack). Needs root, or install them first.
if ! (command -v promtool && command -v chromium && command -v npm) >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus chromium $(command -v npm >/dev/null || echo nodejs npm) >/dev/null
fi

# The project with every extra, on the CPU build of torch these machines carry (drop the pin on a CUDA machine).
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 -e ".[train,serve,loadtest,dev]"

# NVIDIA's tritonclient in an environment of its own: it pins protobuf < 7, the server needs >= 7.35.1.
python3 -m venv .venv-triton
.venv-triton/bin/pip install -q "tritonclient[grpc,http]"

# Node.js's @grpc/grpc-js, for the test that calls the service from another gRPC stack.
npm install --silent --no-audit --no-fund --prefix .node-clients @grpc/grpc-js@1 @grpc/proto-loader@0

# The oldest grpcio and protobuf the generated stubs accept: a test installs them in an empty environment.
.venv/bin/pip download -q --only-binary :all: -d .floor-wheels grpcio==1.85.1 protobuf==7.35.1
