-- Projections `without_user` on usage_daily and usage_hourly: the same sums without the `user`
-- key. Most analytics (overview, timeseries, breakdowns by project, agent, provider or model)
-- never look at users, yet `user` multiplies these tables' rows by the users per agent and model
-- (5x in the query benchmark's data, more for fleets serving many end users). ClickHouse reads a
-- projection instead of the table by itself whenever a query's keys, filters and sums fit in it
-- (and it reads fewer rows); a query on `user` or on the uniq states still reads the table.
-- A projection lives inside each data part: inserts (the materialized views) write it with the
-- part, so it can never disagree with the table, and MATERIALIZE builds it for parts written
-- before this migration (a background mutation; parts without it yet are read as before).
-- deduplicate_merge_projection_mode = 'rebuild': a SummingMergeTree merge adds rows up, so the
-- projection of a merged part is rebuilt from the merged rows (ClickHouse refuses projections on
-- this engine without a mode).

-- usage_daily: the long middle of a range (whole UTC days).
ALTER TABLE {db}.usage_daily MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild';

ALTER TABLE {db}.usage_daily ADD PROJECTION IF NOT EXISTS without_user
(
    SELECT
        tenant, bucket, project, agent, provider, model,
        sum(calls),
        sum(errors),
        sum(unpriced),
        sum(input_tokens),
        sum(output_tokens),
        sum(cache_read_tokens),
        sum(cache_write_tokens),
        sum(cache_write_1h_tokens),
        sum(reasoning_tokens),
        sum(input_audio_tokens),
        sum(output_audio_tokens),
        sum(cost_nanos),
        sum(cost_input_nanos),
        sum(cost_output_nanos),
        sum(cost_cache_read_nanos),
        sum(cost_cache_write_nanos),
        sum(cost_reasoning_nanos),
        sum(cost_input_audio_nanos),
        sum(cost_output_audio_nanos),
        sum(cost_request_nanos),
        sum(latency_ms_sum),
        sum(latency_count)
    GROUP BY tenant, bucket, project, agent, provider, model
);

ALTER TABLE {db}.usage_daily MATERIALIZE PROJECTION without_user;

-- usage_hourly: the hours of a range's edges (today, on a dashboard), hour timeseries.
ALTER TABLE {db}.usage_hourly MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild';

ALTER TABLE {db}.usage_hourly ADD PROJECTION IF NOT EXISTS without_user
(
    SELECT
        tenant, bucket, project, agent, provider, model,
        sum(calls),
        sum(errors),
        sum(unpriced),
        sum(input_tokens),
        sum(output_tokens),
        sum(cache_read_tokens),
        sum(cache_write_tokens),
        sum(cache_write_1h_tokens),
        sum(reasoning_tokens),
        sum(input_audio_tokens),
        sum(output_audio_tokens),
        sum(cost_nanos),
        sum(cost_input_nanos),
        sum(cost_output_nanos),
        sum(cost_cache_read_nanos),
        sum(cost_cache_write_nanos),
        sum(cost_reasoning_nanos),
        sum(cost_input_audio_nanos),
        sum(cost_output_audio_nanos),
        sum(cost_request_nanos),
        sum(latency_ms_sum),
        sum(latency_count)
    GROUP BY tenant, bucket, project, agent, provider, model
);

ALTER TABLE {db}.usage_hourly MATERIALIZE PROJECTION without_user;
