-- SELECT DISTINCT over an event-time source: a GROUP BY without aggregates, windowed like one.
CREATE UNBOUNDED EXTERNAL TABLE clicks (
  id BIGINT NOT NULL, user_id VARCHAR NOT NULL, amount BIGINT, ts TIMESTAMP NOT NULL
) STORED AS NDJSON LOCATION '${GOLDEN_INCOMING}'
OPTIONS ('poll_interval' '20ms', 'batch.interval' '30ms', 'batch.max_rows' '7',
         'event_time' 'ts', 'watermark.delay' '10s');

CREATE EXTERNAL TABLE users_per_minute STORED AS PARQUET LOCATION '${GOLDEN_SINK}';

INSERT INTO users_per_minute
SELECT DISTINCT date_bin(INTERVAL '1 minute', ts) AS w, user_id FROM clicks;
