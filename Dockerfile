# viewport-relay: multi-stage build, wheels from the project's own metadata, non-root runtime.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY viewport ./viewport
COPY twisted ./twisted
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN useradd --create-home --uid 10001 relay
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels /wheels/*.whl && rm -rf /wheels
USER 10001
WORKDIR /home/relay
# Bound to all interfaces: without explicit URLs the relay then runs in "staging" mode (no query-string
# tokens, no verbose state), never silently in dev mode. Configure everything else by environment.
ENV HOST=0.0.0.0 \
    PORT=7781 \
    PYTHONUNBUFFERED=1
EXPOSE 7781
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '7781'), timeout=2); sys.exit(0 if r.status == 200 else 1)"]
CMD ["twistd", "--nodaemon", "--pidfile=", "viewport-relay"]
