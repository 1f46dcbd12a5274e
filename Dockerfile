# policy-server image. CPU by default; for GPU workers build on a CUDA-enabled torch image:
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime \
#                --build-arg INSTALL_TORCH=0 -t policy-server:gpu .
# TORCH_INDEX_URL can point pip at a CPU-only torch index to keep the CPU image slim.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG INSTALL_TORCH=1
ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    POLICY_SERVER_MODEL_DIR=/data/models \
    POLICY_SERVER_DATA_DIR=/data/var

RUN useradd --create-home --uid 10001 app
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
RUN if [ "$INSTALL_TORCH" = "1" ]; then \
        pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0; \
    fi \
 && pip install .
# The shipped models seed the data volume (an empty named volume is filled from the image).
COPY models /data/models
RUN mkdir -p /data/var && chown -R app:app /data

USER app
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
CMD ["policy-server", "serve", "--host", "0.0.0.0", "--port", "8000"]
