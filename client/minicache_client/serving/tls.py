"""TLS server credentials of both services, from PEM files named in their settings."""

from __future__ import annotations

from pathlib import Path

import grpc


def server_credentials(
    cert_file: str, key_file: str, client_ca_file: str = ""
) -> grpc.ServerCredentials | None:
    """Credentials for a TLS port (None without a certificate: the port is plaintext).

    With `client_ca_file`, clients must present a certificate signed by that CA (mTLS)."""
    if not cert_file:
        return None
    client_ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials(
        [(Path(key_file).read_bytes(), Path(cert_file).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
