"""build_app's per-deployment Ray options (no Ray started: the bound deployments are read)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve")


def test_serve_main_loop_sets_the_ingress_and_llm_replicas_serve_flags() -> None:
    from cluster.serve.app import MAIN_LOOP_ENV, build_app

    for setting, on in ((True, {"ingress", "llm"}), (False, set()), ("ingress", {"ingress"}),
                        ("llm", {"llm"})):
        ingress = build_app({"serve_main_loop": setting})._bound_deployment
        llm = ingress.init_args[0]._bound_deployment
        selector = llm.init_args[1]._bound_deployment
        for name, d in (("ingress", ingress), ("llm", llm)):
            env = d.ray_actor_options.get("runtime_env", {}).get("env_vars", {})
            assert env == (MAIN_LOOP_ENV if name in on else {}), (setting, name)
        assert "runtime_env" not in selector.ray_actor_options
    with pytest.raises(ValueError, match="serve_main_loop"):
        build_app({"serve_main_loop": "selector"})
    assert MAIN_LOOP_ENV == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                             "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def test_early_start_follows_the_engine_core_unless_set() -> None:
    from cluster.serve.app import build_app

    def max_inflight(args: dict) -> int:
        llm = build_app(args)._bound_deployment.init_args[0]._bound_deployment
        return llm.init_args[5]  # NOTE: LLMReplica's early_start_max_inflight

    core_thread = {"engine": {"engine_process": False}, "max_ongoing_requests": 32}
    core_proc = {"engine": {"engine_process": True}, "max_ongoing_requests": 32}
    assert max_inflight(core_thread) == 0 and max_inflight(core_proc) == 32
    assert max_inflight({**core_thread, "early_start": True}) == 32
    assert max_inflight({**core_proc, "early_start": False}) == 0


def test_niceness_reaches_every_deployment_and_null_leaves_rays() -> None:
    from cluster.serve.app import MAIN_LOOP_ENV, build_app

    def envs(args: dict) -> list[dict]:
        ingress = build_app(args)._bound_deployment
        llm = ingress.init_args[0]._bound_deployment
        selector = llm.init_args[1]._bound_deployment
        return [d.ray_actor_options.get("runtime_env", {}).get("env_vars", {})
                for d in (ingress, llm, selector)]

    assert all(e == {"TINYSERVE_NICENESS": "5"} for e in envs({"niceness": 5}))
    assert envs({}) == envs({"niceness": None}) == [{}, {}, {}]
    main = envs({"niceness": 0, "serve_main_loop": "llm"})[1]
    assert main == {**MAIN_LOOP_ENV, "TINYSERVE_NICENESS": "0"}
    with pytest.raises(ValueError, match="niceness"):
        build_app({"niceness": 20})
