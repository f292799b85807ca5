-- Kafka → S3: orders from a Kafka topic, converted to USD, written as date-partitioned Parquet
-- to a bucket on an S3-compatible store. run.sh starts a broker (tansu) and an S3 server
-- (moto) on loopback and exports KAFKA_BROKERS and S3_ENDPOINT (and the AWS_* credentials).

CREATE UNBOUNDED EXTERNAL TABLE orders (
  order_id BIGINT NOT NULL, customer_id BIGINT, amount DOUBLE, currency VARCHAR,
  ts TIMESTAMP NOT NULL,
  _kafka_partition INT, _kafka_offset BIGINT
) STORED AS KAFKA LOCATION 'kafka://${KAFKA_BROKERS}/orders'
OPTIONS ('group.id' 'sluice-orders', 'start' 'earliest', 'batch.interval' '500ms');

CREATE EXTERNAL TABLE fx
STORED AS CSV LOCATION 'examples/kafka_s3/fx.csv' OPTIONS ('format.has_header' 'true');

CREATE EXPECTATION known_currency ON orders CHECK (currency IN ('USD', 'EUR', 'GBP')) ON VIOLATION DEAD_LETTER;

CREATE EXTERNAL TABLE orders_usd STORED AS PARQUET PARTITIONED BY (order_date)
LOCATION 's3://lake/orders_usd/'
OPTIONS ('s3.endpoint' '${S3_ENDPOINT}', 's3.allow_http' 'true', 'key' 'order_id');

INSERT INTO orders_usd
SELECT o.order_id, o.customer_id, o.amount * fx.rate AS amount_usd, o.ts,
       o._kafka_partition AS kafka_partition, o._kafka_offset AS kafka_offset,
       CAST(o.ts AS DATE) AS order_date
FROM orders o JOIN fx ON o.currency = fx.currency;
