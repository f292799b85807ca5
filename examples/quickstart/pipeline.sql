-- Quickstart: orders arrive over HTTP as NDJSON, are converted to USD with a static
-- exchange-rate table, and land as hive-partitioned Parquet by order date.

-- The source: producers POST to http://127.0.0.1:7878/v1/sources/orders
CREATE UNBOUNDED EXTERNAL TABLE orders (
  order_id     BIGINT NOT NULL,
  customer_id  BIGINT,
  amount       DOUBLE,
  currency     VARCHAR,
  status       VARCHAR,
  ts           TIMESTAMP NOT NULL
) STORED AS HTTP
LOCATION '/v1/sources/orders'
OPTIONS ('batch.interval' '500ms', 'batch.max_rows' '50000');

-- A static table for enrichment (any DataFusion format).
CREATE EXTERNAL TABLE fx STORED AS CSV
LOCATION 'examples/quickstart/data/fx.csv'
OPTIONS ('format.has_header' 'true');

-- The sink: partitioned Parquet on local disk.
CREATE EXTERNAL TABLE orders_usd STORED AS PARQUET
PARTITIONED BY (order_date)
LOCATION 'examples/quickstart/lake/orders_usd/'
OPTIONS ('compression' 'zstd(3)');

-- The pipeline.
INSERT INTO orders_usd
SELECT o.order_id,
       o.customer_id,
       o.amount * fx.rate AS amount_usd,
       upper(o.status)    AS status,
       o.ts,
       CAST(o.ts AS DATE) AS order_date
FROM orders o JOIN fx ON o.currency = fx.currency
WHERE o.status <> 'test';

-- Expectations, checked on every micro-batch before its commit: a row-level check on the
-- source (failing records go to dead letters with the expectation's name) and one on the sink
-- (counted and logged, rows kept). `sluice quality report` shows them with the profiles.
CREATE EXPECTATION positive_amount ON orders CHECK (amount > 0) ON VIOLATION DEAD_LETTER;
CREATE EXPECTATION known_status ON orders_usd CHECK (status IN ('NEW', 'PAID', 'SHIPPED')) ON VIOLATION WARN;
