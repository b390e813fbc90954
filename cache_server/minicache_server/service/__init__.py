"""The gRPC face of the cache server: servicer, the conversion of its messages to and from
the domain (messages.py), and server assembly (authentication is in minicache_client.serving)."""
