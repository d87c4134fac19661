"""Node locality, router to objective without Ray: the router's Select carries the ingress's
node as origin_node_id (select_kwargs -> SelectRequest on the wire -> SelectionRequest), and
between replicas that hold the same prefix at equal load the one on that node wins.

The two-node ``ray.cluster_utils.Cluster`` e2e of issue 20 item 4 (the same tie through the
real app, the ingress on one node) is ``test_two_node_e2e.py``; this covers the chain of
calls without Ray, with the real gRPC message and the real selection core."""

from __future__ import annotations

import pytest
from selector_helpers import FakeClock, request

from cluster.selector.client import _request
from cluster.selector.convert import select_request_from_proto
from cluster.selector.core import CoreConfig, SelectorCore
from cluster.selector.types import LoadSnapshot
from cluster.serve.router_core import PromptInfo, RouterSettings, select_kwargs
from kvmanager.events import BlockStored
from replicas.ray_node import this_node_id


def _core(clock: FakeClock) -> SelectorCore:
    core = SelectorCore(CoreConfig(), clock=clock)
    for rid, node in (("a", "node-a"), ("b", "node-b")):
        core.join(rid, node_id=node, block_size=16, num_blocks=1000)
        core.update_load(rid, LoadSnapshot(num_blocks=1000, num_free_blocks=900,
                                           prefill_tokens_per_s=200.0))  # fmt: skip
    return core


@pytest.mark.parametrize("origin", ["node-a", "node-b"])
def test_a_tie_is_broken_toward_the_ingress_node(clock: FakeClock, origin: str) -> None:
    core = _core(clock)
    q = request(6)
    for rid in ("a", "b"):
        core.apply_events(rid, 0, [BlockStored(list(q.block_hashes[:4]), None, [], 16)])
    info = PromptInfo(request_id="q1", prompt_token_ids=[0] * q.num_prompt_tokens,
                      max_tokens=8, session_id="")  # fmt: skip
    kw = select_kwargs(info, RouterSettings(), ["a", "b"], origin_node_id=origin)
    msg = _request(list(q.block_hashes), q.num_prompt_tokens, **kw)
    sel_req, cands = select_request_from_proto(msg, 10_000)
    assert sel_req.origin_node_id == origin
    sel = core.select(sel_req, cands, speculative=False)
    winner = sel.ranked[0]
    assert winner.replica_id == origin[-1]
    # NOTE: locality is scaled by the matched fraction (4 of 6 blocks): full tier share here,
    # half of it on the other node.
    other = sel.ranked[1].terms
    assert winner.terms.locality == pytest.approx(winner.terms.similarity)
    assert other.locality == pytest.approx(0.5 * other.similarity)
    # Without an origin the same two replicas tie exactly (candidate order decides).
    kw["origin_node_id"] = ""
    plain, _ = select_request_from_proto(
        _request(list(q.block_hashes), q.num_prompt_tokens, **kw), 10_000
    )
    tie = core.select(plain, cands, speculative=False).ranked
    assert tie[0].score == tie[1].score


def test_this_node_id_is_empty_outside_ray() -> None:
    assert this_node_id() == ""
