# syntax=docker/dockerfile:1
# Build: docker build -t rabbitmq-bridge-workers .
# Run:   docker run --rm -e BRIDGE_AMQP_URL=amqp://guest:guest@rabbit:5672/ rabbitmq-bridge-workers run all

FROM python:3.11.10-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY bridge ./bridge
COPY workers ./workers
RUN pip install --no-cache-dir .

FROM python:3.11.10-slim-bookworm
RUN groupadd --system --gid 10001 bridge \
    && useradd --system --uid 10001 --gid bridge --home-dir /var/lib/bridge --shell /usr/sbin/nologin bridge \
    && mkdir -p /var/lib/bridge/state \
    && chown -R bridge:bridge /var/lib/bridge
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BRIDGE_STATE_DIR=/var/lib/bridge/state
WORKDIR /var/lib/bridge
USER 10001:10001
EXPOSE 9100 7000
# Exec form: the worker is PID 1 and receives SIGTERM directly, so the drain runs.
ENTRYPOINT ["rabbitmq-bridge"]
CMD ["run", "all"]
