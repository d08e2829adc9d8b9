# FinSight Fleet: one image for every role. The entrypoint is the `fleet` CLI, so the command picks the role:
#   docker run IMAGE api --host 0.0.0.0 --port 8000
#   docker run IMAGE worker --adapter simple --device cpu -c 2
#   docker run IMAGE flower --port 5555 --address 0.0.0.0
#   docker run IMAGE models create --symbols AAPL --timeframes 1h --types patchtst,sentiment
#
# Build args:
#   EXTRAS               optional extras of pyproject.toml, comma-separated, e.g. "triton" (Triton worker pools)
#   PIP_EXTRA_INDEX_URL  an extra package index for pip, empty by default. torch is pinned (torch==2.13.0 in
#                        pyproject.toml); from the default index that is the CUDA build (large, needed for
#                        --device cuda pools). Point this at PyTorch's CPU wheel index to get the much smaller
#                        CPU-only build (pip then prefers the 2.13.0+cpu wheel) for CPU-only images.
#   PYTHON_IMAGE         base image (python:3.11-slim)

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ARG EXTRAS=""
ARG PIP_EXTRA_INDEX_URL=""
# NOTE: build args are in the environment of RUN steps, so pip reads PIP_EXTRA_INDEX_URL itself (empty: none).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, in their own layer: torch and friends are rebuilt only when pyproject.toml changes, not on
# every source change. The project's packages are empty here (README.md is a stand-in that pyproject needs).
COPY pyproject.toml ./
RUN touch README.md \
 && pip install --upgrade pip \
 && pip install ".${EXTRAS:+[${EXTRAS}]}" \
 && pip uninstall -y finsight-fleet

# The project itself (a regular, non-editable install: the source tree is not needed at run time).
COPY README.md ./
COPY shared ./shared
COPY workers ./workers
COPY producer_api ./producer_api
RUN pip install --no-deps . \
 && fleet --help >/dev/null

# ---------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

# tini as PID 1: forwards SIGTERM to the fleet process (Celery's warm shutdown, aiohttp's graceful exit) and
# reaps orphans.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 fleet \
 && useradd --system --uid 10001 --gid fleet --home-dir /home/fleet --create-home --shell /usr/sbin/nologin fleet

COPY --from=build /opt/venv /opt/venv

# /data holds the model store and the Triton model repository; mount volumes there (a fresh named volume takes
# the ownership below, so the non-root user can write to it).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODEL_STORE_DIR=/data/model-store \
    TRITON_MODEL_REPOSITORY=/data/triton-repository
RUN mkdir -p /data/model-store /data/triton-repository \
 && chown -R fleet:fleet /data

USER 10001:10001
WORKDIR /home/fleet
EXPOSE 8000 5555

ENTRYPOINT ["tini", "--", "fleet"]
CMD ["--help"]
