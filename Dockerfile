# vpsrelay container image: a small Python image that runs the relay as a non-root user.
#
#   docker build -t vpsrelay .
#   docker run -d -p 80:80 -p 443:443 -v vpsrelay-data:/data \
#       -e VPSRELAY_TLS__DOMAINS=relay.example.com -e VPSRELAY_TLS__EMAIL=you@example.com vpsrelay
#
# Build arguments:
#   BASE_IMAGE  the Python base (default python:3.12-slim-bookworm). Any Debian-like image with
#               python3 (>= 3.11) and its venv module works, e.g. one made with debootstrap.
#   WHEELHOUSE  a directory in the build context holding every wheel the install needs
#               (vpsrelay's dependencies and setuptools): pip then installs offline from it
#               instead of PyPI. Empty (the default): wheels come from PyPI.
#               Either way the versions are constraints.txt's.
ARG BASE_IMAGE=python:3.12-slim-bookworm

# --- stage 1: build the wheels and a virtualenv from them --------------------------------------
FROM ${BASE_IMAGE} AS build
ARG WHEELHOUSE=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY . /src
RUN set -eu; \
    if [ -n "$WHEELHOUSE" ]; then \
        set -- --no-index --find-links "/src/$WHEELHOUSE"; \
    else \
        set --; \
    fi; \
    python3 -m venv /opt/build-venv; \
    # constraints.txt: the exact runtime set the tests ran with (library patches are pinned).
    /opt/build-venv/bin/pip wheel "$@" -c /src/constraints.txt --wheel-dir /wheels /src; \
    # --copies: the interpreter is a real file of this venv, so the capability below is
    # granted to this program only, not to every python3 in the image.
    python3 -m venv --copies /opt/vpsrelay; \
    /opt/vpsrelay/bin/pip install --no-index --find-links /wheels vpsrelay; \
    /opt/vpsrelay/bin/pip uninstall -y -q pip setuptools 2>/dev/null || true; \
    find /opt/vpsrelay -name __pycache__ -prune -exec rm -rf {} +; \
    /opt/vpsrelay/bin/python -m compileall -q /opt/vpsrelay/lib

# --- stage 2: the runtime ----------------------------------------------------------------------
FROM ${BASE_IMAGE}
COPY --from=build /opt/vpsrelay /opt/vpsrelay
# A fixed uid/gid so a bind-mounted data directory can be chowned on the host (10001:10001).
# CAP_NET_BIND_SERVICE as a file capability on the venv's own interpreter: the relay may bind
# ports 80 and 443 as this user, and gets no other privilege (keep `no-new-privileges` off:
# it would drop file capabilities). security.capability v2: magic, permitted bit 10, 0, 0, 0.
RUN set -eu; \
    groupadd --system --gid 10001 vpsrelay; \
    useradd --system --uid 10001 --gid vpsrelay --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin vpsrelay; \
    mkdir -p /data /etc/vpsrelay; \
    chown vpsrelay:vpsrelay /data; \
    python3 -c 'import os, struct; os.setxattr(os.path.realpath("/opt/vpsrelay/bin/python3"), "security.capability", struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0))'; \
    /opt/vpsrelay/bin/vpsrelay --version

ENV PATH=/opt/vpsrelay/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    VPSRELAY_DATA_DIR=/data \
    VPSRELAY_SERVER__LISTEN=0.0.0.0:5000
VOLUME ["/data"]
EXPOSE 80 443 5000
USER vpsrelay:vpsrelay
WORKDIR /data
# GET /healthz on the plain-HTTP listener (server.listen); exit 0 on 200.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["vpsrelay", "healthcheck"]
# SIGTERM: stop accepting, give in-flight pulls server.graceful_timeout (30 s) to finish.
# `docker stop` waits 10 s by default: compose sets stop_grace_period to match.
STOPSIGNAL SIGTERM
ENTRYPOINT ["vpsrelay"]
CMD ["serve"]
