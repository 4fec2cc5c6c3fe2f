"""Re-pricing of stored usage: a price fixed later corrects every stored cost and aggregate.

- :mod:`~spendstream.repricing.planner` (pure): the scope of a job, what an event costs now with
  the pricing stage's own core (catalog at event time + overrides effective at event time), the
  two correction rows of a re-priced event, and the diff (per model, per day, a sample).
- :mod:`~spendstream.repricing.store` (ClickHouse): stream the scope's events in key order, one
  batch at a time; insert a batch's correction rows deduplicated by a token of the job and batch;
  job state (``reprice_jobs``) and the audit trail (``pricing_audit``).
- :mod:`~spendstream.repricing.jobs`: one job, dry run or apply, resumable from its cursor.

How the correction rows look in ``usage_events`` and how analysts read them:
clickhouse/schema/0017_repricing.sql and clickhouse/README.md ("Re-pricing").
"""
