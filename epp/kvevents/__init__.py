"""Model servers' own KV-cache events: decoding (`decode`), the block index (`index`) and
the ZeroMQ intake that keeps it current (`subscriber`: the EPP connects to each engine;
`bound`: the engines connect to the EPP)."""
