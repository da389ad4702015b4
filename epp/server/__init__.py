"""The gRPC edges of the EPP: ext_proc, the Pick API, health. Protobuf stops here."""
