"""Active-active EPP replicas: shared prefix index and in-flight load through Redis.

`sync.StateSync` moves state in the background; `wire` is the stream entry format;
`remote.RemoteLoad` holds the other replicas' in-flight counts. See docs/active-active.md.
"""

from epp.statesync.sync import StateSync, SyncOptions

__all__ = ["StateSync", "SyncOptions"]
