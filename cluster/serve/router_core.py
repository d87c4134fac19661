"""The Serve-free half of the TinyServe request router: settings, prompt hashing, and turning
a selection-service answer into Serve's ranked replica groups. Unit-tested without Ray.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from cluster.selector.client import split_addresses
from cluster.selector.core_types import Selection
from kvmanager.hashing import BlockHasher, make_hasher

R = TypeVar("R")


@dataclass(slots=True, frozen=True)
class RouterSettings:
    """``request_router_kwargs`` of ``TinyServeRouter`` (the app builder fills block_size and
    hash_mode from the engine config, so router and pool hashes agree).

    select_timeout_s: deadline of one Select; past it the request is routed by power-of-two.
    policy: the service policy to ask for ("" = the service's default).
    max_ranked: how many ranked replicas to hand Serve (0 = all); the rest of the order only
        matters when the better ones reject (at max_ongoing_requests).
    reresolve_after_failures: consecutive failed Selects before the router asks the
        CacheSelector deployment for its address again (it may have restarted elsewhere).
    tls_ca_file / tls_server_name: TLS to a standalone service (``selector_address``): the
        CA that signed its certificate and the name to expect in it (``cluster.selector.grpc_tls``);
        the app's own service hands its router these itself.
    selector_fast_lanes: the standalone service's Select fast lanes (``cluster.selector.
        fast_lane``), comma-separated ``host:port`` in the order of ``selector_address``'s
        entries ("" = gRPC only); plaintext, so not with TLS. The app's own service publishes
        its lanes itself.
    early_start: write the request to the chosen replica's socket before Serve's call leaves
        (``replicas.early_start``), where the replica publishes one on this node.
    """

    block_size: int = 16
    hash_mode: str = "fast"
    select_timeout_s: float = 0.05
    policy: str = ""
    max_ranked: int = 0
    selector_deployment: str = "CacheSelector"
    selector_address: str | None = None
    reresolve_after_failures: int = 5
    tls_ca_file: str = ""
    tls_server_name: str = ""
    selector_fast_lanes: str = ""
    early_start: bool = True

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> RouterSettings:
        """Validate kwargs (unknown key or bad value: ValueError naming it)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown TinyServeRouter kwargs {unknown}; known: {sorted(known)}")
        settings = cls(**dict(kwargs))
        if settings.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {settings.block_size}")
        if not settings.select_timeout_s > 0:
            raise ValueError(f"select_timeout_s must be > 0, got {settings.select_timeout_s}")
        make_hasher(settings.hash_mode)  # ValueError for an unknown mode
        settings.fast_lanes()  # ValueError for lanes that do not pair with the addresses
        return settings

    def fast_lanes(self) -> dict[str, str]:
        """``selector_address`` entry -> its fast lane (``selector_fast_lanes``); ValueError
        when they do not pair up, lack a standalone address, or meet TLS."""
        if not self.selector_fast_lanes:
            return {}
        if not self.selector_address:
            raise ValueError("selector_fast_lanes needs selector_address (a standalone service)")
        if self.tls_ca_file:
            raise ValueError("selector_fast_lanes is plaintext: not with tls_ca_file")
        addresses = split_addresses(self.selector_address)
        lanes = split_addresses(self.selector_fast_lanes)
        if len(lanes) != len(addresses):
            raise ValueError(
                f"selector_fast_lanes has {len(lanes)} entries for {len(addresses)} "
                "selector_address entries (one lane per address, same order)"
            )
        return dict(zip(addresses, lanes, strict=True))


@dataclass(slots=True, frozen=True)
class PromptInfo:
    """What the router reads from a routed call's first argument (a GenerateRequest)."""

    request_id: str
    prompt_token_ids: Sequence[int]
    max_tokens: int
    session_id: str
    policy: str = ""  # the request's own routing policy ("" = the router's)
    request: Any = field(default=None, repr=False, compare=False)  # the argument itself


def prompt_info(args: Sequence[Any]) -> PromptInfo | None:
    """The GenerateRequest among a call's positional args, or None (then the router falls
    back). Duck-typed on ``prompt_token_ids`` so ``cluster`` needs no import of the replica
    deployment module."""
    for arg in args:
        ids = getattr(arg, "prompt_token_ids", None)
        if ids is None:
            continue
        params = getattr(arg, "sampling_params", None)
        return PromptInfo(
            request_id=str(getattr(arg, "request_id", "")),
            prompt_token_ids=ids,
            max_tokens=int(getattr(params, "max_tokens", 0) or 0),
            session_id=str(getattr(arg, "session_id", "") or ""),
            policy=str(getattr(arg, "routing_policy", "") or ""),
            request=arg,
        )
    return None


def select_kwargs(
    info: PromptInfo,
    settings: RouterSettings,
    candidate_replica_ids: list[str],
    origin_node_id: str = "",
) -> dict[str, Any]:
    """The Select call's keyword arguments for one request (block hashes aside).

    ``origin_node_id`` is the node of the router's own process, i.e. of the ingress replica
    that owns the handle: the request's origin. NOTE: the objective's L term halves the
    locality of a candidate on another node (cluster/selector/objective.py), so between otherwise equal
    replicas the one beside the ingress wins and the token stream skips a network hop."""
    return {
        "request_id": info.request_id,
        "num_output_tokens": info.max_tokens,
        "session_id": info.session_id,
        "candidate_replica_ids": candidate_replica_ids,
        "policy": info.policy or settings.policy,
        "max_results": settings.max_ranked,
        "origin_node_id": origin_node_id,
    }


class PromptHasher:
    """Chained external block hashes of a prompt, as the replicas' pools compute them."""

    def __init__(self, block_size: int, hash_mode: str) -> None:
        self.block_size = block_size
        self._hasher: BlockHasher = make_hasher(hash_mode)

    def __call__(self, token_ids: Sequence[int]) -> list[int]:
        return self._hasher.external_hashes(token_ids, self.block_size)


def ranks_from_selection(
    selection: Selection, replicas: Mapping[str, R], max_ranked: int = 0
) -> list[list[R]]:
    """Serve's rank groups from a ranking: one replica per group, best first, skipping ids
    Serve does not know (a replica that just died). Empty when nothing matches."""
    out: list[list[R]] = []
    for ranked in selection.ranked:
        replica = replicas.get(ranked.replica_id)
        if replica is None:
            continue
        out.append([replica])
        if max_ranked and len(out) >= max_ranked:
            break
    return out
