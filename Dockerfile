# viewport-relay: multi-stage build, wheels from the project's own metadata with the dependencies pinned by
# deploy/image-constraints.txt, non-root runtime.
#
# Offline build (no package index): put every wheel the build needs in ./wheelhouse first, then
#   pip wheel --no-deps --wheel-dir wheelhouse -r deploy/image-constraints.txt 'setuptools>=68' wheel
#   docker build --network none --build-arg PIP_NO_INDEX=1 -t viewport-relay .
# (tests/test_image.py builds the image that way.) For the labels add
#   --build-arg SOURCE_URL=<repository URL> --build-arg REVISION=$(git rev-parse HEAD)
FROM python:3.11-slim-bookworm AS build
# A venv of its own: works on the official image and on a Debian python3 + python3-venv base alike.
RUN python3 -m venv /opt/build
WORKDIR /src
# "wheelhous[e]" copies ./wheelhouse when it exists and nothing otherwise (the constraints file is always there).
COPY deploy/image-constraints.txt wheelhous[e] ./wheelhouse/
COPY pyproject.toml setup.cfg README.md LICENS[E] ./
COPY viewport ./viewport
COPY twisted ./twisted
ARG PIP_NO_INDEX=0
RUN /opt/build/bin/pip wheel --no-cache-dir --wheel-dir /wheels --find-links /src/wheelhouse \
        --constraint /src/wheelhouse/image-constraints.txt .

FROM python:3.11-slim-bookworm
# The package version (viewport/__init__.py __version__); tests/test_image.py fails when they differ.
ARG VERSION=0.2.0
ARG SOURCE_URL=""
ARG REVISION=""
LABEL org.opencontainers.image.title="viewport-relay" \
      org.opencontainers.image.description="Self-hostable WebSocket relay for Viewport daemons and browsers" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --create-home --uid 10001 relay
COPY --from=build /wheels /wheels
# Twisted's plugin cache (dropin.cache) is written here, as root: uid 10001 cannot write into the venv, so
# without it every start logs "Unable to write to plugin cache". It is stamped 2 s into the future because
# image layers keep whole seconds, and a cache no newer than a plugin file counts as stale.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels viewport-relay \
    && rm -rf /wheels \
    && /opt/venv/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && touch -d "@$(($(date +%s) + 2))" /opt/venv/lib/python3*/site-packages/twisted/plugins/dropin.cache
USER 10001
WORKDIR /home/relay
# Bound to all interfaces: without explicit URLs the relay then runs in "staging" mode (no query-string
# tokens, no verbose state), never silently in dev mode. Configure everything else by environment.
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOST=0.0.0.0 \
    PORT=7781 \
    PYTHONUNBUFFERED=1
EXPOSE 7781
# GET /health on this container's PORT (on loopback when HOST is a wildcard): plain HTTP, or HTTPS without
# certificate verification when the relay serves TLS (RELAY_TLS=1; with RELAY_TLS=auto, whichever answers).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, ssl, sys, urllib.request\ntls = os.environ.get('RELAY_TLS', 'auto').strip().lower()\nhost = os.environ.get('HOST', '0.0.0.0').strip()\nhost = {'': '127.0.0.1', '0.0.0.0': '127.0.0.1', '::': '[::1]'}.get(host, '[%s]' % host if ':' in host else host)\nfor scheme in {'1': ['https'], '0': ['http']}.get(tls, ['http', 'https']):\n    try:\n        with urllib.request.urlopen('%s://%s:%s/health' % (scheme, host, os.environ.get('PORT', '7781')), timeout=1.4, context=ssl._create_unverified_context()) as answer:\n            sys.exit(0 if answer.status == 200 else 1)\n    except Exception:\n        pass\nsys.exit(1)"]
CMD ["twistd", "--nodaemon", "--pidfile=", "viewport-relay"]
