"""Service plumbing shared by the cache server and the inference worker.

Both services (`minicache_server`, `minicache_worker`) import it; the SDK proper (the
clients, policies, the entry format and the restore path) does not, and needs nothing
here. It lives in the client distribution because both services already depend on it,
so neither service depends on the other:

- `metrics`: a `MetricSet` base for a service's metrics in its own prometheus-client
  registry, counters and histograms labelled by keyword, and `serve_metrics`, the
  library's HTTP endpoint for them.
- `auth`: bearer tokens mapped to tenants (`TokenAuth`, `load_token_tenants`) and the
  interceptors that refuse unknown tokens, for asyncio (`AuthInterceptor`) and
  threaded (`SyncAuthInterceptor`) gRPC servers.
- `rpc_methods`: `add_service`, which registers a service's methods with a
  deserializer that never raises and one wrapper (`RpcOutcomes`) for timing, metrics,
  cancellation, the mapping of domain errors to status codes and bounded details.
- `settings`: `SettingsError`, `setting` (a field with its flag's help), the readers of
  a settings dataclass from flags and env vars (`add_setting_flags`, `setting_values`,
  `parse_bool`, `parse_size`, `split_address`) and `--print-config`'s view of them with
  secrets masked (`masked_settings`, `config_json`).
- `tls`: `server_credentials`, a TLS (or mTLS) port's credentials from PEM files.
- `logs`: `configure_logging`, JSON lines or plain text.
"""
