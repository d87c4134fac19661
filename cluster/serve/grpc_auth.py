"""The selection service's shared token inside the app: made at deploy time, handed through Ray.

``build_app`` calls ``new_token()`` once per deploy and passes the token as a constructor
argument (pickled by Serve, kept by its controller, never written to a file or the YAML) to
the CacheSelector (which requires it on every RPC but health checks), to every LLM replica
(inside ``TokenSinkFactory``, for ReportKV and Feedback) and, through the CacheSelector's
``auth_token()`` handle method, to the request router in the ingress (for Select). Only a
process already inside the Ray cluster (which has its own token auth) can read it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from cluster.selector.grpc_tls import ClientTLS
from cluster.serve.app_reporting import SelectorSink, make_selector_sink
from replicas.deployment_report import SinkSpec


def new_token() -> str:
    """256 random bits, URL-safe text (gRPC metadata values must be printable ASCII)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class TokenSinkFactory:
    """The LLM replicas' ``SinkFactory``: a ``SelectorSink`` that sends ``token`` (over TLS
    verified with ``tls`` when the service serves TLS: ``cluster.selector.grpc_tls``)."""

    token: str = field(repr=False)  # NOTE: never in Serve's logs of init args
    tls: ClientTLS | None = None

    def __call__(self, spec: SinkSpec) -> SelectorSink:
        return make_selector_sink(spec, token=self.token, tls=self.tls)
