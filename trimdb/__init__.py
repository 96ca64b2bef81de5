"""trimdb: token-level data selection (TRIM) over a DuckDB and FAISS index."""

__version__ = "0.1.0"
