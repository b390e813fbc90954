"""The gRPC face of the cache server: servicer and server assembly (authentication is in minicache_client.serving)."""
