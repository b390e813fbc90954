"""MiniCache cache server: the MiniCache encoder and (later) storage tiers and gRPC service."""

__version__ = "0.1.0"
