"""Generated gRPC stubs for protos/epp/v1/pick.proto; regenerate with `make protos`."""
