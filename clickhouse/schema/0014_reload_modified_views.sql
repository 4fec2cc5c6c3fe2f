-- Reload the four views whose query 0009 changed (ALTER TABLE ... MODIFY QUERY), so that their
-- insert deduplication agrees before and after a server restart.
--
-- Why: after MODIFY QUERY, the server that ran it derives other deduplication block ids for the
-- view's target than the same view gets once loaded from its metadata at the next start
-- (measured on ClickHouse 26.9, chDB 3.x: tests/integration/test_sink.py
-- test_a_retry_across_a_restart_after_modify_query_is_stored_once). An insert whose views had
-- committed but whose usage_events part had not when the server died (the views commit first)
-- is retried with the same insert_deduplication_token after the restart: usage_events takes it
-- once, but each aggregate sees a new block id and takes it a second time. The fault suite
-- caught it as a few events counted twice in every aggregate after a ClickHouse SIGKILL.
-- DETACH + ATTACH loads each view from its metadata, as a restart does, so the ids agree from
-- here on. Any later change to a view's query should be followed by the same reload (or be a
-- DROP + CREATE).
--
-- Between a view's DETACH and ATTACH (milliseconds) an insert into usage_events would not reach
-- that view's target: run migrations with the sink stopped, as `spendstream migrate` before the
-- processors start does (README, deploy/). Re-runnable: IF EXISTS / IF NOT EXISTS.

DETACH TABLE IF EXISTS {db}.usage_minute_mv;
ATTACH TABLE IF NOT EXISTS {db}.usage_minute_mv;

DETACH TABLE IF EXISTS {db}.usage_hourly_mv;
ATTACH TABLE IF NOT EXISTS {db}.usage_hourly_mv;

DETACH TABLE IF EXISTS {db}.usage_daily_mv;
ATTACH TABLE IF NOT EXISTS {db}.usage_daily_mv;

DETACH TABLE IF EXISTS {db}.usage_tags_daily_mv;
ATTACH TABLE IF NOT EXISTS {db}.usage_tags_daily_mv;
