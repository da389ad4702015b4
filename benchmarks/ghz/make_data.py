"""Call data for ghz: the ext_proc messages Envoy sends for one POST, and a Pick request.

ghz sends a list of messages per streaming call when `--data` is a JSON array, so one
ghz call of `ExternalProcessor/Process` is one headers+body exchange, shaped like what
Envoy 1.40 sends with the config of `epp envoy-config` (FULL_DUPLEX_STREAMED bodies):
the request headers (with `protocol_config` on the first message, header values as
`raw_value` bytes) then the whole body in one chunk with `end_of_stream`. The EPP answers
with the headers reply and the streamed body, and the call ends when ghz half-closes.

The JSON is written from the real protobuf classes (`json_format.MessageToDict`), so a
field renamed in xds-protos fails here instead of silently sending an empty message.
`x-request-id` is a ghz template (`{{.UUID | b64enc}}`): every call gets its own id, as
behind Envoy, so the EPP's in-flight accounting sees distinct requests.

Run `python benchmarks/ghz/make_data.py` to rewrite the files next to this script.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
_UUID_TEMPLATE = "{{.UUID | b64enc}}"
_UUID_PLACEHOLDER = "UkVRVUVTVC1JRC1QTEFDRUhPTERFUg=="  # base64 of a marker, swapped below


def completion_body(prompt_bytes: int = 1024) -> bytes:
    """A `/v1/completions` body with a prompt of about `prompt_bytes` bytes."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "the", "gateway", "picks", "an", "endpoint", "for", "every", "request", "it", "sees"]
    out: list[str] = []
    n = 0
    i = 0
    while n < prompt_bytes:
        w = words[i % len(words)]
        out.append(w)
        n += len(w) + 1
        i += 1
    body = {"model": MODEL, "prompt": " ".join(out), "max_tokens": 16, "temperature": 0}
    return json.dumps(body, separators=(",", ":")).encode()


def process_messages(body: bytes, path: str = "/v1/completions",
                     body_mode: str = "FULL_DUPLEX_STREAMED") -> list[dict]:
    """The two ProcessingRequest messages (as ghz JSON) of one headers+body exchange."""
    from envoy.config.core.v3 import base_pb2 as core
    from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    from google.protobuf import json_format

    headers = [
        (":authority", "127.0.0.1:8081"), (":path", path), (":method", "POST"),
        (":scheme", "http"), ("content-type", "application/json"),
        ("content-length", str(len(body))), ("user-agent", "ghz-bench"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", base64.b64decode(_UUID_PLACEHOLDER).decode()),
    ]
    hdrs = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(headers=core.HeaderMap(headers=[
            core.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers])),
        protocol_config=ep.ProtocolConfiguration(
            request_body_mode=pm.ProcessingMode.BodySendMode.Value(body_mode),
            response_body_mode=pm.ProcessingMode.BodySendMode.Value(body_mode)),
    )
    chunk = ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))
    msgs = [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in (hdrs, chunk)]
    for h in msgs[0]["request_headers"]["headers"]["headers"]:
        if h["raw_value"] == _UUID_PLACEHOLDER:
            h["raw_value"] = _UUID_TEMPLATE
    return msgs


def pick_request(body: bytes, path: str = "/v1/completions") -> dict:
    """One `epp.v1.PickRequest` as ghz JSON: the raw body, as a gateway would forward it."""
    return {"body": base64.b64encode(body).decode(), "path": path,
            "headers": {"x-request-id": "{{.UUID}}"}}


def protoset(*modules: Any) -> bytes:
    """A FileDescriptorSet of the modules' .proto files and all their imports.

    ghz cannot use the EPP's server reflection as it is (see README.md: Python's upb
    descriptor pool does not resolve a method name, which is what ghz asks for), so the
    benchmark hands ghz the very descriptors the EPP was built with.
    """
    from google.protobuf import descriptor_pb2

    out = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(fd: Any) -> None:
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            add(dep)
        proto = out.file.add()
        fd.CopyToProto(proto)

    for m in modules:
        add(m.DESCRIPTOR)
    return out.SerializeToString()


def write(out_dir: Path = HERE, prompt_bytes: int = 1024) -> dict[str, Path]:
    """Write the ghz call data and protosets; returns their paths by name."""
    from envoy.service.ext_proc.v3 import external_processor_pb2

    body = completion_body(prompt_bytes)
    files = {
        "process-data": out_dir / "process-data.json",
        "pick-data": out_dir / "pick-data.json",
        "process-protoset": out_dir / "extproc.protoset",
    }
    files["process-data"].write_text(json.dumps(process_messages(body), indent=1) + "\n")
    files["pick-data"].write_text(json.dumps(pick_request(body), indent=1) + "\n")
    files["process-protoset"].write_bytes(protoset(external_processor_pb2))
    try:
        from epp.v1 import pick_pb2
    except ImportError:  # the Pick API is not built in this tree
        pass
    else:
        files["pick-protoset"] = out_dir / "pick.protoset"
        files["pick-protoset"].write_bytes(protoset(pick_pb2))
    return files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=HERE)
    p.add_argument("--prompt-bytes", type=int, default=1024)
    a = p.parse_args()
    for name, path in write(a.out_dir, a.prompt_bytes).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
