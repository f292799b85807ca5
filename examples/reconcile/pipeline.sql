-- Reconciliation example: the quickstart's orders, converted to USD with an exchange-rate table
-- that turns out to be wrong and is corrected after the fact. The stream wrote yesterday's rows
-- with the old rate; `sluice reconcile` recomputes them from the raw archive with the table as
-- it is now, reports the partitions and columns that differ, and repairs them in one commit.
-- Run it all with examples/reconcile/run.sh.

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

-- The enrichment table reconcile reads as it is at the time of the run.
CREATE EXTERNAL TABLE fx STORED AS CSV
LOCATION 'examples/reconcile/data/fx.csv'
OPTIONS ('format.has_header' 'true');

-- `key` lets reconcile name the exact orders that are missing, extra or changed.
CREATE EXTERNAL TABLE orders_usd STORED AS PARQUET
PARTITIONED BY (order_date)
LOCATION 'examples/reconcile/lake/orders_usd/'
OPTIONS ('key' 'order_id');

INSERT INTO orders_usd
SELECT o.order_id,
       o.customer_id,
       o.amount * fx.rate AS amount_usd,
       upper(o.status)    AS status,
       o.ts,
       CAST(o.ts AS DATE) AS order_date
FROM orders o JOIN fx ON o.currency = fx.currency
WHERE o.status <> 'test';

-- The same expectation holds in the stream and in the batch recompute.
CREATE EXPECTATION positive_amount ON orders CHECK (amount > 0) ON VIOLATION DEAD_LETTER;
