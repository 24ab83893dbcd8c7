# regproxy's container image: a virtualenv built in one stage, copied onto a slim Python base.
#
#   docker build -t regproxy .
#   docker run -p 5000:5000 -v regproxy-cache:/var/lib/regproxy regproxy serve --upstream URL
#
# One tag for every architecture (buildx builds each platform and pushes one index):
#
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/regproxy:TAG --push .
#
# Build arguments and secrets:
#   BASE_IMAGE      a Debian-based image with Python >= 3.11 and its venv module, used for both
#                   stages so the virtualenv's interpreter path exists in the final image. The
#                   tests pass a debootstrapped Debian 12 with python3-venv (Docker Hub is out
#                   of their reach).
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST
#                   a private or mirrored package index (builder stage only, never in the image).
#   --secret id=pip_cert,src=CA-BUNDLE
#                   CA bundle for an index behind a TLS-inspecting proxy; mounted for the one
#                   RUN that installs, never written to a layer.
#
# Runtime: user 10001:10001, the cache at the VOLUME /var/lib/regproxy, the default configuration
# at /etc/regproxy/config.yml (picked up through REGPROXY_CONFIG; an explicit --config, flags and
# REGPROXY_* variables override it), port 5000, HEALTHCHECK on /healthz. The image runs with a
# read-only root filesystem as long as /var/lib/regproxy is writable.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------- builder
FROM ${BASE_IMAGE} AS builder

ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

# .dockerignore admits only what the wheel is built from: pyproject.toml, README.md, proxy/,
# storage/, and constraints.txt, the tested versions of its dependencies. One COPY, one layer.
COPY . /src

# The wheel of this tree, installed with its dependencies (the tested versions) from the index
# into /opt/regproxy; then pip goes.
RUN --mount=type=secret,id=pip_cert,required=false \
    set -eu; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    python3 -m venv /opt/regproxy; \
    /opt/regproxy/bin/pip wheel --no-deps --wheel-dir /tmp/wheels /src; \
    /opt/regproxy/bin/pip install --constraint /src/constraints.txt /tmp/wheels/regproxy-*.whl; \
    /opt/regproxy/bin/python -m pip uninstall --yes pip setuptools

# --------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="regproxy" \
      org.opencontainers.image.description="Pull-through caching registry proxy for Docker Hub and OCI registries" \
      org.opencontainers.image.licenses="Apache-2.0"

ARG REGPROXY_UID=10001
RUN set -eu; \
    groupadd --system --gid "${REGPROXY_UID}" regproxy; \
    useradd --system --uid "${REGPROXY_UID}" --gid regproxy --no-create-home \
        --home-dir /var/lib/regproxy --shell /usr/sbin/nologin regproxy; \
    mkdir -p /var/lib/regproxy /etc/regproxy; \
    chown regproxy:regproxy /var/lib/regproxy; \
    chmod 0750 /var/lib/regproxy; \
    printf '%s\n' \
      '# Default configuration of the regproxy image. Replace it (mount a file here, or pass' \
      '# --config FILE) or override single settings with flags or REGPROXY_* variables.' \
      'listen: 0.0.0.0:5000' \
      'storage: /var/lib/regproxy' \
      > /etc/regproxy/config.yml

COPY --from=builder /opt/regproxy /opt/regproxy

ENV PATH=/opt/regproxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REGPROXY_CONFIG=/etc/regproxy/config.yml

VOLUME ["/var/lib/regproxy"]
WORKDIR /var/lib/regproxy
USER ${REGPROXY_UID}:${REGPROXY_UID}
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["regproxy", "healthcheck"]
ENTRYPOINT ["regproxy"]
CMD ["serve"]
