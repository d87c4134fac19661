"""Optional TLS of the selection service's gRPC: settings, credentials and channels.

Certificates come from PEM files: the server needs its certificate chain and private key,
every client (router, LLM replicas, the standalone CLI's users) the CA that signed it.

    TLSSettings (files, validated)  --read once-->  ServerTLS (cert + key bytes)
                                                    ClientTLS (CA bytes + server name)

In the app, ``build_app`` reads the files once on the machine that runs ``serve run`` /
``serve deploy`` and hands the PEM bytes through Ray, as it does the shared token
(``cluster.serve.grpc_auth``): no node but that one needs the files. The selection replicas bind
their node's address, so the server certificate must name it (a SAN per node IP) or the
clients must be told the name it does hold (``server_name``, gRPC's
``ssl_target_name_override``).

A TLS server refuses plaintext clients (their handshake fails: UNAVAILABLE) and a client
refuses a server whose certificate its CA did not sign (UNAVAILABLE too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from pydantic import BaseModel, ConfigDict, Field, model_validator

_CERT_MARK = b"-----BEGIN CERTIFICATE-----"
_KEY_MARK = b"PRIVATE KEY-----"
_KINDS = {_CERT_MARK: "CERTIFICATE", _KEY_MARK: "PRIVATE KEY"}
ChannelOptions = Sequence[tuple[str, Any]]


def _read_pem(path: str, what: str, mark: bytes) -> bytes:
    """The file's bytes; ValueError naming ``what`` when it is missing or holds no PEM."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {str(p)!r} cannot be read: {exc.strerror}") from exc
    if mark not in data:
        raise ValueError(f"{what} {str(p)!r} holds no PEM {_KINDS[mark]}")
    return data


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """A TLS server's certificate chain and private key (PEM bytes)."""

    cert_chain: bytes
    private_key: bytes = field(repr=False)  # NOTE: never in Serve's logs of init args

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.cert_chain)])


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """What a client verifies the server with: the CA bundle (PEM bytes) and, when the
    certificate does not name the dialled host, the name it does hold."""

    root_certificates: bytes
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def channel(address: str, tls: ClientTLS | None, options: ChannelOptions = ()) -> grpc.Channel:
    """A synchronous channel to ``address``: TLS when ``tls`` is given, else plaintext."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, tls.credentials(), options=[*options, *tls.options()])


def aio_channel(
    address: str, tls: ClientTLS | None, options: ChannelOptions = ()
) -> grpc.aio.Channel:
    """``channel`` for asyncio (binds to the running loop on first use)."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(
        address, tls.credentials(), options=[*options, *tls.options()]
    )


class TLSSettings(BaseModel):
    """``selector.tls`` in ``app.yaml`` (and the CLI's ``--tls-*`` flags). All empty = off.

    Server side: ``cert_file`` + ``key_file`` (both or neither). Client side: ``ca_file``.
    The app needs all three (its selection replicas serve, its router and replicas dial);
    files are checked when the settings are built (readable, PEM of the right kind)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cert_file: str = Field(default="", description="Server certificate chain (PEM file).")
    key_file: str = Field(default="", description="Server private key (PEM file).")
    ca_file: str = Field(
        default="", description="CA bundle (PEM file) clients verify the server with."
    )
    server_name: str = Field(
        default="",
        description="Name clients expect in the server certificate; '' = the dialled host "
        "(the certificate must then name every node address the service binds).",
    )

    @model_validator(mode="after")
    def _check_files(self) -> TLSSettings:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls: cert_file and key_file go together (set both or neither)")
        if self.server_name and not self.ca_file:
            raise ValueError("tls: server_name needs ca_file (it is what clients verify)")
        if self.cert_file:
            _read_pem(self.cert_file, "tls.cert_file", _CERT_MARK)
            _read_pem(self.key_file, "tls.key_file", _KEY_MARK)
        if self.ca_file:
            _read_pem(self.ca_file, "tls.ca_file", _CERT_MARK)
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file or self.ca_file)

    def server(self) -> ServerTLS | None:
        """The server side, read from the files (None when off)."""
        if not self.cert_file:
            return None
        return ServerTLS(
            _read_pem(self.cert_file, "tls.cert_file", _CERT_MARK),
            _read_pem(self.key_file, "tls.key_file", _KEY_MARK),
        )

    def client(self) -> ClientTLS | None:
        """The client side, read from the CA file (None when off)."""
        if not self.ca_file:
            return None
        return ClientTLS(_read_pem(self.ca_file, "tls.ca_file", _CERT_MARK), self.server_name)

    def require_both(self) -> None:
        """For the app, which serves and dials: all three files or none."""
        if self.enabled and not (self.cert_file and self.ca_file):
            raise ValueError("selector.tls needs cert_file, key_file and ca_file together")
