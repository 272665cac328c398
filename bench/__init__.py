"""Benchmarks of ParaFort Proxy against PostgreSQL directly and PgBouncer; run with ``python -m bench``."""
