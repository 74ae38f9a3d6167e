# GPU worker image for nst-batch: CUDA PyTorch + the project (`nst`, `flows`) + a Prefect process worker.
# Build, run, push, Kubernetes job template, measured timings: docs/docker.md.
#
# Base image: the CUDA "base" flavour on Ubuntu 24.04 (Python 3.12). The PyPI torch 2.14.1 wheel is the CUDA 13.0
# build and brings its own CUDA libraries (nvidia-cublas, -cudnn, ... wheels), so the "runtime" flavour would only
# add GBs of duplicate libraries; the base flavour still has what the NVIDIA container toolkit needs
# (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES, NVIDIA_REQUIRE_CUDA=cuda>=13.0, so a host whose driver is too
# old for CUDA 13 is refused at start with a clear message). Any Debian/Ubuntu image with Python >= 3.11 works,
# e.g. --build-arg BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04, or a digest-pinned copy in your registry.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

# OS packages: Python + venv, CA certificates, tini (PID 1 that forwards signals and reaps flow-run subprocesses).
# Versions are not pinned on purpose: they come from whichever Debian/Ubuntu release BASE_IMAGE is.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/*

# Non-root user (numeric uid, so Kubernetes runAsNonRoot can verify it), the virtualenv, a writable /work.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/nst --shell /usr/sbin/nologin nst \
    && python3 -m venv /opt/venv \
    && mkdir -p /opt/nst /work \
    && chown nst:nst /work

# The runtime interface comes before the installs: none of it changes what they produce, and metadata placed after
# the ~6 GB torch layer costs a full layer copy per instruction on builders without BuildKit (see docs/docker.md).
# WORK_POOL: the default work pool; override at run time with -e NST_WORK_POOL=... (the usual way).
ARG WORK_POOL=gpu-pool
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NST_WORK_POOL=${WORK_POOL} \
    NST_WORKER_TYPE=process \
    NST_WORKER_LIMIT=1 \
    PREFECT_WORKER_WEBSERVER_PORT=8080 \
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30
LABEL org.opencontainers.image.title="nst-batch GPU worker" \
      org.opencontainers.image.description="Batch neural style transfer (Gatys et al.) on Prefect: CUDA PyTorch worker"
WORKDIR /work
EXPOSE 8080
# The worker's own health endpoint (served because of --with-healthcheck in CMD). A container started with another
# command (e.g. `nst stylize ...`) shows "unhealthy", which Docker only displays; Kubernetes ignores HEALTHCHECK
# (docs/docker.md has the equivalent livenessProbe).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; \
u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PREFECT_WORKER_WEBSERVER_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--"]
# PREFECT_API_URL (and PREFECT_API_KEY for Prefect Cloud) are given at run time, never baked in.
# NST_WORKER_LIMIT=1: one flow run at a time per worker, i.e. per GPU. --install-policy never: nothing is
# installed at run time.
CMD ["sh", "-c", "exec prefect worker start --pool \"$NST_WORK_POOL\" --type \"$NST_WORKER_TYPE\" \
--limit \"$NST_WORKER_LIMIT\" --with-healthcheck --install-policy never"]

# Every dependency from the lock (exact versions + sha256; torch 2.14.1 is the ~6 GB CUDA 13.0 build): pip refuses
# anything unpinned or unhashed. Cached until requirements.txt changes (`make lock`, on purpose). pip itself first,
# from the lock (requirements-pip.txt): the base image's pip can refuse the locked install (see the Makefile).
COPY requirements-pip.txt requirements.txt /opt/nst/
RUN pip install --no-cache-dir --require-hashes -r /opt/nst/requirements-pip.txt \
    && pip install --no-cache-dir --require-hashes -r /opt/nst/requirements.txt \
    && python -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# The project itself (.dockerignore lets in only the package sources, manifests and prefect.yaml). The source tree
# stays in /opt/nst so a deployment's pull step can `set_working_directory: /opt/nst` and find flows/ there.
COPY . /opt/nst/
RUN pip install --no-cache-dir --no-deps --no-build-isolation /opt/nst \
    && rm -rf /opt/nst/build /opt/nst/*.egg-info \
    && python -c "import sys, nst; sys.exit('nst must not import prefect' if 'prefect' in sys.modules else 0)" \
    && python -c "import flows" \
    && nst --help > /dev/null

USER 10001:10001
