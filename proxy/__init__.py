"""ParaFort Proxy: a PostgreSQL connection-routing proxy daemon."""

__version__ = "0.1.0"
