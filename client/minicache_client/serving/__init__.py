"""Service plumbing shared by the cache server and the inference worker.

Both services (`minicache_server`, `minicache_worker`) import it; the SDK proper (the
clients, policies, the entry format and the restore path) does not, and needs nothing
here. It lives in the client distribution because both services already depend on it,
so neither service depends on the other:

- `metrics`: counters, gauges and histograms in the Prometheus text format, a
  `MetricSet` base for a service's metrics, and `serve_metrics`, their HTTP endpoint.
- `auth`: bearer tokens mapped to tenants (`TokenAuth`, `load_token_tenants`) and the
  interceptors that refuse unknown tokens, for asyncio (`AuthInterceptor`) and
  threaded (`SyncAuthInterceptor`) gRPC servers.
- `settings`: `SettingsError` and the readers of a settings dataclass from flags and env
  vars (`add_setting_flags`, `setting_values`, `parse_bool`, `parse_size`,
  `split_address`).
- `logs`: `configure_logging`, JSON lines or plain text.
"""
