"""Statement classification and routing policy."""
