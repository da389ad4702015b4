"""Saturation detection, shedding and flow control: protect important work under load.

- `saturation`: how full the pool is (plugins `utilization-detector`, `concurrency-detector`).
- `queues`: per-band queues with fairness (among fairness ids) and ordering (within one).
- `controller`: the dispatcher that releases queued requests, highest priority first.
- `admission`: what the director awaits before scheduling (`DefaultAdmission` sheds
  sheddable requests; `FlowControlAdmission` queues behind the `flowControl` feature gate).
- `settings`: the EndpointPickerConfig sections (`saturationDetector`, `flowControl`).
"""
