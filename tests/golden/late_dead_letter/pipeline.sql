-- Late rows go to the dead letters; the partitions they would have touched are marked dirty.
CREATE UNBOUNDED EXTERNAL TABLE clicks (
  id BIGINT NOT NULL, user_id VARCHAR NOT NULL, amount BIGINT, ts TIMESTAMP NOT NULL
) STORED AS NDJSON LOCATION '${GOLDEN_INCOMING}'
OPTIONS ('poll_interval' '20ms', 'batch.interval' '30ms', 'batch.max_rows' '7',
         'event_time' 'ts', 'watermark.delay' '5s', 'late' 'dead_letter');

CREATE EXTERNAL TABLE clicks_per_minute STORED AS PARQUET PARTITIONED BY (day)
LOCATION '${GOLDEN_SINK}';

INSERT INTO clicks_per_minute
SELECT date_bin(INTERVAL '1 minute', ts) AS window_start, user_id,
       count(*) AS clicks, sum(amount) AS total,
       CAST(date_bin(INTERVAL '1 minute', ts) AS DATE) AS day
FROM clicks
GROUP BY date_bin(INTERVAL '1 minute', ts), user_id;
