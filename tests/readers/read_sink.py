"""Reads a Sluice sink directory with Spark, DuckDB, Polars and pyarrow, each the way its users
do (plain hive-partitioned Parquet, no Sluice code), and prints one JSON line per reader:
{"reader": NAME, "rows": [[id, v, name, ts_epoch_micros, part], ...]} sorted by id.

Usage: read_sink.py SINK_DIR [READER ...]   (default: every reader)
"""
import json
import os
import sys

sink = os.path.abspath(sys.argv[1])
wanted = sys.argv[2:] or ["pyarrow", "duckdb", "polars", "spark"]
# One partition level (part=...), the layout the test writes; _sluice/ is never read.
glob = os.path.join(sink, "*=*", "*.parquet")


def emit(name, rows):
    rows = sorted([list(r) for r in rows], key=lambda r: r[0])
    print(json.dumps({"reader": name, "rows": rows}), flush=True)


def read_pyarrow():
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    import pyarrow as pa

    t = ds.dataset(sink, format="parquet", partitioning="hive").to_table()
    ts = pc.cast(pc.cast(t["ts"], pa.timestamp("us")), pa.int64())
    cols = [t["id"].to_pylist(), t["v"].to_pylist(), t["name"].to_pylist(), ts.to_pylist(), t["part"].to_pylist()]
    return list(zip(*cols))


def read_duckdb():
    import duckdb

    con = duckdb.connect()
    return con.execute(
        f"SELECT id, v, name, epoch_us(ts), CAST(part AS BIGINT) FROM read_parquet('{glob}', hive_partitioning = true)"
    ).fetchall()


def read_polars():
    import polars as pl

    df = pl.scan_parquet(glob, hive_partitioning=True).select(
        pl.col("id"), pl.col("v"), pl.col("name"), pl.col("ts").dt.epoch("us"), pl.col("part").cast(pl.Int64)
    ).collect()
    return df.rows()


def read_spark():
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[1]")
        .appName("sluice-readers")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    df = spark.read.parquet(sink)
    df.createOrReplaceTempView("t")
    rows = spark.sql(
        "SELECT id, v, name, unix_micros(CAST(ts AS TIMESTAMP)), CAST(part AS BIGINT) FROM t"
    ).collect()
    spark.stop()
    return [tuple(r) for r in rows]


for name in wanted:
    emit(name, globals()["read_" + name]())
