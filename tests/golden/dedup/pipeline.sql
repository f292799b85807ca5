-- A repeat of an id within one minute (of event time) of the kept row is dropped.
CREATE UNBOUNDED EXTERNAL TABLE clicks (
  id BIGINT NOT NULL, user_id VARCHAR NOT NULL, amount BIGINT, ts TIMESTAMP NOT NULL
) STORED AS NDJSON LOCATION '${GOLDEN_INCOMING}'
OPTIONS ('poll_interval' '20ms', 'batch.interval' '30ms', 'batch.max_rows' '7',
         'event_time' 'ts', 'watermark.delay' '30s', 'dedup.key' 'id', 'dedup.ttl' '1m');

CREATE EXTERNAL TABLE clicks_once STORED AS PARQUET LOCATION '${GOLDEN_SINK}';

INSERT INTO clicks_once SELECT id, user_id, ts FROM clicks;
