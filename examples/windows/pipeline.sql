-- Windows, late rows and dedup over a click stream (event time, not arrival time).
-- Run it with examples/windows/run.sh.

-- Clicks arrive as NDJSON files, up to 10 s out of order, sometimes sent twice.
CREATE UNBOUNDED EXTERNAL TABLE clicks (
  click_id  BIGINT NOT NULL,
  user_id   BIGINT NOT NULL,
  page      VARCHAR,
  ms        BIGINT,                 -- time on page
  ts        TIMESTAMP NOT NULL      -- when the click happened
) STORED AS NDJSON
LOCATION 'examples/windows/incoming/'
OPTIONS ('poll_interval' '100ms',
         'event_time' 'ts',           -- windows and lateness follow this column
         'watermark.delay' '10s',     -- the watermark trails the newest click by 10 s
         'late' 'dead_letter',        -- clicks behind the watermark go to dead letters
         'dedup.key' 'click_id',      -- a click_id seen again within 1 h is dropped
         'dedup.ttl' '1h');

-- Tumbling: clicks per page per minute, written once each minute is complete.
CREATE EXTERNAL TABLE clicks_per_minute STORED AS PARQUET PARTITIONED BY (day)
LOCATION 'examples/windows/lake/clicks_per_minute/';

INSERT INTO clicks_per_minute
SELECT date_bin(INTERVAL '1 minute', ts) AS window_start,
       date_bin(INTERVAL '1 minute', ts) + INTERVAL '1 minute' AS window_end,
       page,
       count(*) AS clicks,
       approx_distinct(user_id) AS users,
       avg(ms) AS avg_ms,
       approx_percentile_cont(0.9) WITHIN GROUP (ORDER BY ms) AS p90_ms,
       CAST(date_bin(INTERVAL '1 minute', ts) AS DATE) AS day
FROM clicks
GROUP BY date_bin(INTERVAL '1 minute', ts), page;

-- Hopping: active users over the last 5 minutes, every minute. hop(slide, width, ts) is the
-- window start; each click counts in the five windows that contain it.
CREATE EXTERNAL TABLE active_users_5m STORED AS PARQUET
LOCATION 'examples/windows/lake/active_users_5m/';

INSERT INTO active_users_5m
SELECT hop(INTERVAL '1 minute', INTERVAL '5 minutes', ts) AS window_start,
       hop(INTERVAL '1 minute', INTERVAL '5 minutes', ts) + INTERVAL '5 minutes' AS window_end,
       count(DISTINCT user_id) AS users,
       count(*) AS clicks
FROM clicks
GROUP BY hop(INTERVAL '1 minute', INTERVAL '5 minutes', ts);
