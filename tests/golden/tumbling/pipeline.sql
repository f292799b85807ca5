-- Tumbling one-minute windows per user: count, sum and average, emitted once the watermark
-- (newest event time minus 10 s) passes each window's end.
CREATE UNBOUNDED EXTERNAL TABLE clicks (
  id BIGINT NOT NULL, user_id VARCHAR NOT NULL, amount BIGINT, ts TIMESTAMP NOT NULL
) STORED AS NDJSON LOCATION '${GOLDEN_INCOMING}'
OPTIONS ('poll_interval' '20ms', 'batch.interval' '30ms', 'batch.max_rows' '7',
         'event_time' 'ts', 'watermark.delay' '10s');

CREATE EXTERNAL TABLE clicks_per_minute STORED AS PARQUET LOCATION '${GOLDEN_SINK}';

INSERT INTO clicks_per_minute
SELECT date_bin(INTERVAL '1 minute', ts) AS window_start,
       date_bin(INTERVAL '1 minute', ts) + INTERVAL '1 minute' AS window_end,
       user_id, count(*) AS clicks, sum(amount) AS total, avg(amount) AS mean
FROM clicks
GROUP BY date_bin(INTERVAL '1 minute', ts), user_id;
