"""The gateway's AI API proxy for OpenAI and Anthropic: pass-through, metering, hard budgets.

router.py (routes), service.py (the request path), usage.py (pure: flavours, usage, SSE),
costs.py (pure: reservation bound and settled cost), keys.py (stored provider keys in memory),
recorder.py (events to usage.raw, spooled on disk while the broker is down), errors.py (provider-
shaped refusals), metrics.py. Operators' documentation: docs/proxy.md.
"""
