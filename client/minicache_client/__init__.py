"""MiniCache client SDK.

Light on purpose (NumPy and msgpack only, CuPy optional): compression policies,
the stored-entry format with its checksum, and the decoder that restores KV from a
stored entry. The encoder lives in the server package (`minicache_server`).
"""

__version__ = "0.1.0"
