#!/usr/bin/env bash
# Everything the test suite needs, installed where missing (the README's test command runs this first; so does CI).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: prometheus (promtool and the Prometheus integration test), chromium (the web page in a real
# headless browser), nodejs and npm (a client on another gRPC stack), postgresql (the feedback store's tests start
# a server of their own: initdb and pg_ctl, which Debian keeps in /usr/lib/postgresql/<version>/bin, off PATH).
# Needs root, or install them first.
if ! (command -v promtool && command -v chromium && command -v npm && ls /usr/lib/postgresql/*/bin/pg_ctl \
    /usr/lib/postgresql/*/bin/initdb) >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus chromium postgresql $(command -v npm >/dev/null || echo nodejs npm) >/dev/null
fi

# The project with every extra, on the CPU build of torch these machines carry (drop the pin on a CUDA machine).
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 -e ".[train,serve,loadtest,dev]"

# NVIDIA's tritonclient in an environment of its own: it pins protobuf < 7, the server needs >= 7.35.1.
python3 -m venv .venv-triton
.venv-triton/bin/pip install -q "tritonclient[grpc,http]"

# Node.js's @grpc/grpc-js, for the test that calls the service from another gRPC stack.
npm install --silent --no-audit --no-fund --prefix .node-clients @grpc/grpc-js@1 @grpc/proto-loader@0

# Handwriting fonts (npm @fontsource, latin woff) for training/digit_sources.py: the digit detector is fitted on
# some (FIT_FONTS) and evaluated on the others (HELD_OUT_FONTS). Only the missing ones are installed.
hand_fonts=(caveat indie-flower shadows-into-light reenie-beanie kalam gochi-hand patrick-hand architects-daughter
    just-another-hand nothing-you-could-do coming-soon gaegu gloria-hallelujah covered-by-your-grace permanent-marker
    rock-salt schoolbell nanum-pen-script)
missing_fonts=()
for font in "${hand_fonts[@]}"; do
    woff=".fonts/node_modules/@fontsource/$font/files/$font-latin-400-normal.woff"
    [ -f "$woff" ] || missing_fonts+=("@fontsource/$font@5")
done
if ((${#missing_fonts[@]})); then
    npm install --silent --no-audit --no-fund --prefix .fonts "${missing_fonts[@]}"
fi

# The oldest grpcio and protobuf the generated stubs accept: a test installs them in an empty environment.
.venv/bin/pip download -q --only-binary :all: -d .floor-wheels grpcio==1.85.1 protobuf==7.35.1
