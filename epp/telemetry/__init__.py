"""Seeing what the EPP decides: decision records, the status page's data, JSON logs and
OpenTelemetry traces. The director reaches all of it through `RequestObserver`."""

from epp.telemetry.observer import DecisionRing, RequestObserver, Watch

__all__ = ["DecisionRing", "RequestObserver", "Watch"]
