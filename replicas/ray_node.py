"""This process's Ray node id: what the router sends as a request's origin, what a replica
reports itself on, and what decides whether outputs may go over a same-node socket."""

from __future__ import annotations


def this_node_id() -> str:
    """This process's Ray node id ("" outside a Ray worker or when Ray cannot say: locality
    off, outputs as Ray items; never a failure)."""
    try:
        import ray

        # NOTE: outside a Ray process get_runtime_context() would start Ray: ask first.
        if not ray.is_initialized():
            return ""
        return str(ray.get_runtime_context().get_node_id() or "")
    except Exception:
        return ""
