# Tools image for the model-producing half: data checks, training on CPU, export and verification.
# The serving image (GPU and CPU variants, non-root, health check) comes with the gRPC server.
#   docker build -t mnist-tools .
#   docker run --rm -v /path/to/mnist:/data -e MNIST_DIR=/data mnist-tools --check server/bundled/googlenet-fast.onnx
FROM python:3.12-slim
WORKDIR /app
RUN useradd --create-home --uid 10001 app
COPY pyproject.toml README.md ./
COPY training training
COPY export export
COPY server server
COPY loadtest loadtest
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch>=2.4" \
 && pip install --no-cache-dir ".[train,serve-cpu]"
USER app
ENTRYPOINT ["mnist-export"]
CMD ["--help"]
