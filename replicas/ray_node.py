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


def serve_loop_flags() -> dict[str, bool]:
    """How Serve runs this replica process's handlers and its handles' routers, as the process
    read it from its environment (the app's ``serve_main_loop``; empty outside Serve)."""
    try:
        from ray.serve._private import constants
    except ImportError:
        return {}
    return {
        "user_code_in_separate_thread": bool(constants.RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD),
        "router_in_separate_loop": bool(constants.RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP),
    }
