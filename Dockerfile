# The EPP as a container: ext_proc and Pick API on 9002, gRPC health on 9003, metrics on 9090.

# The KV-event index in Rust (native/README.md). Bookworm's python3 is 3.11, the ABI the
# library targets (abi3-py311); native/Cargo.lock needs cargo >= 1.78, so not Debian's.
FROM rust:1-slim-bookworm AS native
RUN apt-get update -q && apt-get install -y -q --no-install-recommends python3 && \
    rm -rf /var/lib/apt/lists/*
WORKDIR /src/native
COPY native ./
RUN PYO3_PYTHON=python3 cargo build --release --locked

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY epp ./epp
COPY --from=native /src/native/target/release/libepp_native.so ./epp/kvevents/_native.abi3.so
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
