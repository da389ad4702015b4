# The EPP as a container: ext_proc and Pick API on 9002, gRPC health on 9003, metrics on 9090.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY epp ./epp
RUN pip install --no-cache-dir --prefix=/install . && \
    # xds-protos overwrites opentelemetry/proto with an old copy; put the real one back
    pip install --no-cache-dir --prefix=/install --no-deps --force-reinstall \
      "$(pip list --path /install/lib/python3.11/site-packages --format=freeze | grep '^opentelemetry-proto==')"

FROM python:3.11-slim
RUN useradd --system --uid 65532 --no-create-home epp
COPY --from=build /install /usr/local
USER 65532
EXPOSE 9002 9003 9090
ENTRYPOINT ["epp"]
