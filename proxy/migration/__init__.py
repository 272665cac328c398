"""Moving a domain role's tables from main to its own database (issue 17): state, plan, statements seen,
and the logical replication that copies them (replication.py)."""
