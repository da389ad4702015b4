"""Endpoint Picker (EPP) for LLM inference gateways.

Envoy streams each request to the EPP over ext_proc; the EPP picks the model-server
endpoint that should serve it. See docs/architecture.md for the path a request takes.
"""

__version__ = "0.1.0"
