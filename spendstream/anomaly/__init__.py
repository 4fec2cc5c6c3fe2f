"""Spend anomaly detection: a runaway agent reported within minutes, with the reason.

- ``baseline``: a scope's usual minute spend for an hour (seasonal samples, median + MAD), pure;
- ``detector``: 1-minute buckets per (tenant, project, agent) and (tenant, project), scoring,
  the alert rule, episodes and the explanation, pure;
- ``alerts``: an anomaly as a ``spendstream.budget.alerts`` value (kind "anomaly"), pure;
- ``store``: baselines, tenants' rules and alerted episodes from ClickHouse (IO).

The stage is ``stream_processors/anomaly``; docs/anomaly.md describes the whole feature.
"""

from spendstream.anomaly.alerts import anomaly_alert_value
from spendstream.anomaly.baseline import Baseline, MinuteSample, build_baseline
from spendstream.anomaly.detector import Anomaly, Detector, Rule, anomaly_alert_id

__all__ = [
    "Anomaly",
    "Baseline",
    "Detector",
    "MinuteSample",
    "Rule",
    "anomaly_alert_id",
    "anomaly_alert_value",
    "build_baseline",
]
