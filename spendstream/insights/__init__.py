"""Insights: forecasts of spend, savings recommendations and model cost comparison. Pure.

- :mod:`spendstream.insights.forecast`: daily spend forecasts with nested, non-negative bands and
  a horizon total from simulated paths (statsforecast: AutoETS / AutoTheta / SeasonalNaive(7),
  chosen per series by a rolling-origin backtest; run-rate for short histories);
- :mod:`spendstream.insights.repricing`: history re-priced at today's catalog prices;
- :mod:`spendstream.insights.recommendations`: savings recommendations from usage and the catalog;
- :mod:`spendstream.insights.catalog_info`: substitution table, batch discounts, context windows.

Data in, results out: no HTTP, Kafka or ClickHouse client here; the query API reads the
aggregates and runs these (fits in a worker process, see ``query_api/insights.py``).
"""

from __future__ import annotations

from spendstream.money import NANOS_PER_USD


def usd(nanos: int) -> str:
    """Exact decimal USD with nine places (one nano-USD): 1_500_000_000 -> '1.500000000'."""
    nanos = int(nanos)
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    return f"{'-' if nanos < 0 else ''}{whole}.{frac:09d}"
