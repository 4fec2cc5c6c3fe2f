"""The anomaly stage: usage.priced -> 1-minute spend per scope -> anomaly alerts on budget.alerts."""
