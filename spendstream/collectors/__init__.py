"""Provider usage collectors: what OpenAI's and Anthropic's admin APIs report an organisation used
and spent, collected into ClickHouse next to what Spendstream counted (docs/collectors.md).

- ``model``: the rows (``UsageRow`` hourly tokens, ``CostRow`` daily nano-USD) and field readers;
- ``openai`` / ``anthropic``: each provider's requests and page parsers (pure);
- ``registry``: the one registry of providers and their datasets;
- ``windows``: which span a run collects (watermark, 48 h re-collect, backfill);
- ``http``: httpx pages with pagination, 429/retry-after, backoff with jitter, bounds;
- ``connections``: admin-API connections, keys sealed with ``spendstream.secrets``;
- ``store`` / ``runner``: ClickHouse writes and one collection run;
- ``reconcile``: provider-reported vs Spendstream-counted figures (pure merge + queries);
- ``service``: the APScheduler service behind ``spendstream collectors``.
"""
