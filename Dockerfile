# Serving image (CPU): mnist-serve with the bundled model, as a non-root user.
# GPU variant, multi-stage build and gRPC HEALTHCHECK: see the operations issue.
#   docker build -t mnist-serve .
#   docker run --rm -p 50051:50051 -p 9090:9090 mnist-serve
FROM python:3.12-slim
WORKDIR /app
RUN useradd --create-home --uid 10001 app
COPY pyproject.toml README.md ./
COPY proto proto
COPY server server
COPY export export
COPY training training
COPY loadtest loadtest
RUN pip install --no-cache-dir ".[serve-cpu]"
USER app
EXPOSE 50051 9090
ENV MNIST_SERVE_PORT=50051 MNIST_SERVE_METRICS_PORT=9090
ENTRYPOINT ["mnist-serve"]
