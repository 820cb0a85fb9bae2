# The gateway image used by docker-compose.yml. Dependencies come from uv.lock, as in `make setup`.
FROM python:3.11-slim AS build
ENV UV_PROJECT_ENVIRONMENT=/opt/kpg UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy
RUN pip install --no-cache-dir uv==0.13.8
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
COPY clients/python ./clients/python
COPY gateway ./gateway
RUN uv sync --frozen --no-dev --no-editable

FROM python:3.11-slim
RUN useradd --system --uid 10001 kpg && mkdir -p /var/lib/kpg && chown kpg /var/lib/kpg
COPY --from=build /opt/kpg /opt/kpg
COPY examples /etc/kpg/examples
ENV PATH=/opt/kpg/bin:$PATH \
    KPG_GRPC__HOST=0.0.0.0 KPG_REST__HOST=0.0.0.0 \
    KPG_STATE_DIR=/var/lib/kpg KPG_LOG_FORMAT=json
USER kpg
EXPOSE 50051 8080
HEALTHCHECK --interval=5s --timeout=3s --retries=12 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz').status != 200)"
ENTRYPOINT ["kpg", "serve"]
