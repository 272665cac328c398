"""Development tooling: throwaway PostgreSQL clusters (cluster), a real proxy process for tests (testing),
the demo (demo). Only tests, bench and the `demo` command use it; the running proxy never imports it."""
