"""The gRPC face of the cache server: servicer, authentication, server assembly."""
