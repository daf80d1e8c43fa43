"""Data: sources -> validated Parquet shards -> preprocessing -> Ray Data to train workers."""
