"""The Serve application builder: ``serve run cluster.serve.app:build_app`` or ``deploy/app.yaml``.

    OpenAIIngress  --handle-->  LLMReplica x num_replicas   (request router: ``router``)
                                    |  ReportKV: KV events, load, outcomes (gRPC)
                                    v
                                CacheSelector x selector.num_replicas  (the selection service)

``build_app(args)`` validates ``args`` as an ``AppConfig`` (one field per YAML key) and binds
the three deployments. The router's kwargs get ``block_size``/``hash_mode`` from the engine
config so router hashes and pool hashes agree by construction.
"""

from __future__ import annotations

from typing import Any, cast

from ray.serve.deployment import Application, Deployment

from cluster.serve.app_config import AppConfig
from cluster.serve.app_selector import CacheSelector
from cluster.serve.grpc_auth import TokenSinkFactory, new_token
from cluster.serve.openai_ingress import OpenAIIngress
from replicas.deployment import LLMReplica
from replicas.niceness import ENV as NICENESS_ENV

# NOTE: the proxy-side probe interval; our replicas publish their own stats through KV events.
ROUTING_STATS_PERIOD_S = 2.0


def router_config(config: AppConfig) -> dict[str, Any]:
    """The LLM deployment's ``request_router_config`` (router class and its kwargs)."""
    kwargs = dict(config.router_kwargs)
    if config.router == "tinyserve":
        kwargs.setdefault("block_size", config.engine.block_size)
        kwargs.setdefault("hash_mode", config.engine.hash_mode)
    return {
        "request_router_class": config.router_class(),
        "request_router_kwargs": kwargs,
        "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
    }


# NOTE: Serve reads these when a replica's process imports it, so a deployment's runtime_env
# sets them for its replicas alone (Serve merges env_vars with the app's runtime_env).
MAIN_LOOP_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def _actor_options(num_cpus: float, resources: dict[str, float], niceness: int | None,
                   main_loop: bool = False) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if resources:
        options["resources"] = dict(resources)
    env = dict(MAIN_LOOP_ENV) if main_loop else {}
    if niceness is not None:
        env[NICENESS_ENV] = str(niceness)
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Bind the app from ``serve run``/``serve deploy`` args (ValueError-style pydantic
    errors name the bad key)."""
    config = AppConfig(**(args or {}))
    selector_enabled = config.selector.enabled and config.router == "tinyserve"
    token = new_token()  # NOTE: one per deploy; cluster.serve.grpc_auth says who gets it and how
    # NOTE: TLS files are read here, once; their bytes travel through Ray like the token.
    server_tls, client_tls = config.selector.tls.server(), config.selector.tls.client()
    no_tls = {"selector": {"tls"}}
    selector = (
        cast(Deployment, CacheSelector)
        .options(
            num_replicas=config.selector.num_replicas,
            ray_actor_options=_actor_options(
                config.selector.num_cpus, config.placement.selector, config.niceness
            ),
        )
        .bind(config.selector.model_dump(exclude={"tls"}), token, server_tls, client_tls)
        if selector_enabled
        else None
    )
    actor_options = _actor_options(config.num_cpus_per_replica, config.placement.llm,
                                   config.niceness, config.main_loop_on("llm"))
    if config.num_gpus_per_replica:
        actor_options["num_gpus"] = config.num_gpus_per_replica
    llm = (
        cast(Deployment, LLMReplica)
        .options(
            num_replicas=config.num_replicas,
            max_ongoing_requests=config.max_ongoing_requests,
            ray_actor_options=actor_options,
            request_router_config=router_config(config),
        )
        .bind(
            config.engine.model_dump(),
            selector,
            TokenSinkFactory(token, client_tls) if selector_enabled else None,
            config.report_interval_s,
            config.stream_max_outputs_per_s,
            config.max_ongoing_requests if config.early_start_on() else 0,
        )
    )
    ingress = cast(Deployment, OpenAIIngress)
    return ingress.options(
        num_replicas=config.ingress_num_replicas,
        ray_actor_options=_actor_options(config.ingress_num_cpus, config.placement.ingress,
                                         config.niceness, config.main_loop_on("ingress")),
    ).bind(llm, config.model_dump(exclude=no_tls))
