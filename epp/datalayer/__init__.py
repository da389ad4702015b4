"""The data layer: keeps every endpoint's load metrics current in the Datastore.

- `promtext`: a targeted extractor for Prometheus text pages (only the wanted series).
- `engines`: which metric names each kind of model server uses, and page -> EndpointMetrics.
- `scraper`: one asyncio polling task per endpoint, started and stopped with the pool.
- `poolmetrics`: the EPP's own `inference_pool_*` gauges, refreshed from the Datastore.
"""
