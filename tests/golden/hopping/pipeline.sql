-- Hopping windows: three minutes wide, one starting every minute. hop(slide, width, ts) is the
-- window start; a row counts in each of the three windows that contain it.
CREATE UNBOUNDED EXTERNAL TABLE clicks (
  id BIGINT NOT NULL, user_id VARCHAR NOT NULL, amount BIGINT, ts TIMESTAMP NOT NULL
) STORED AS NDJSON LOCATION '${GOLDEN_INCOMING}'
OPTIONS ('poll_interval' '20ms', 'batch.interval' '30ms', 'batch.max_rows' '7',
         'event_time' 'ts', 'watermark.delay' '10s');

CREATE EXTERNAL TABLE clicks_3m STORED AS PARQUET LOCATION '${GOLDEN_SINK}';

INSERT INTO clicks_3m
SELECT hop(INTERVAL '1 minute', INTERVAL '3 minutes', ts) AS window_start,
       hop(INTERVAL '1 minute', INTERVAL '3 minutes', ts) + INTERVAL '3 minutes' AS window_end,
       user_id, count(*) AS clicks, sum(amount) AS total
FROM clicks
GROUP BY hop(INTERVAL '1 minute', INTERVAL '3 minutes', ts), user_id;
