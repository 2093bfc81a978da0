# mnist-serve image. Two variants from one file (build argument VARIANT):
#   docker build -t mnist-serve:gpu .                        # onnxruntime-gpu + NVIDIA CUDA 13 / cuDNN 9 wheels
#   docker build -t mnist-serve:cpu --build-arg VARIANT=cpu .  # CPU build of onnxruntime, ~20x smaller
#   docker run --rm --gpus all -p 50051:50051 -p 9464:9464 mnist-serve:gpu
# Configuration: MNIST_SERVE_* environment variables (see `mnist-serve --help`).
# TLS and tokens (README "TLS and tokens"): mount the PEM files read-only at /etc/mnist/tls and the tokens
# file at /etc/mnist/tokens, and point the server at them, e.g.
#   docker run ... -v "$PWD/tls:/etc/mnist/tls:ro" -v "$PWD/tokens:/etc/mnist/tokens:ro" \
#     -e MNIST_SERVE_TLS_CERT=/etc/mnist/tls/tls.crt -e MNIST_SERVE_TLS_KEY=/etc/mnist/tls/tls.key \
#     -e MNIST_SERVE_AUTH_TOKENS_FILE=/etc/mnist/tokens/tokens -e MNIST_TLS_CA=/etc/mnist/tls/ca.crt mnist-serve:gpu
# (MNIST_SERVE_TLS_CLIENT_CA=/etc/mnist/tls/ca.crt adds mTLS.) The HEALTHCHECK is liveness: GET /livez on the
# metrics port (python -m server.livez_probe, answered off the gRPC event loop, so overload does not fail it),
# over HTTPS when MNIST_SERVE_TLS_CERT is set, with MNIST_TLS_CERT/MNIST_TLS_KEY as client certificate for mTLS;
# it needs no token. With MNIST_SERVE_METRICS_PORT=0 there is no /livez: run with
# --health-cmd "mnist-classify --health" (grpc health; MNIST_TLS_CA for TLS) or --no-healthcheck.
# Files must be readable by uid 10001 (e.g. mode 0440, group 10001); the tokens file should not be world-readable.
ARG PYTHON=python:3.12-slim-bookworm

# --- build: turn the project into a wheel (the bundled model is package data) ---
FROM ${PYTHON} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto proto
COPY server server
COPY export export
COPY training training
COPY loadtest loadtest
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime: only the `serve` (or `serve-cpu`) extra, as a non-root user ---
FROM ${PYTHON} AS runtime
ARG VARIANT=gpu
RUN useradd --create-home --uid 10001 mnist
COPY --from=build /wheels /wheels
# The GPU variant adds onnxruntime-gpu's cuda/cudnn extras: the NVIDIA runtime libraries as wheels,
# found at start by onnxruntime.preload_dlls(); the host needs only the driver.
# Versions come from pyproject.toml's lower bounds (one place), not from pins repeated here.
# hadolint ignore=DL3013
RUN set -eu; \
    if [ "$VARIANT" = "cpu" ]; then extra=serve-cpu; nvidia=""; else extra=serve; nvidia="onnxruntime-gpu[cuda,cudnn]"; fi; \
    pip install --no-cache-dir "$(ls /wheels/*.whl)[$extra]" ${nvidia:+"$nvidia"}; \
    rm -rf /wheels
USER 10001
# One process until the GPU check has measured workers on a GPU host (docs/operations.md, Workers): set
# MNIST_SERVE_WORKERS=auto (one per 4 cores the container may use) or a number to run several.
ENV MNIST_SERVE_HOST=[::] \
    MNIST_SERVE_PORT=50051 \
    MNIST_SERVE_METRICS_PORT=9464 \
    MNIST_SERVE_WORKERS=1 \
    PYTHONUNBUFFERED=1
EXPOSE 50051 9464 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s --retries=3 \
    CMD ["python", "-m", "server.livez_probe", "--timeout", "2"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["mnist-serve"]
