"""AppConfig: the arguments of the Serve application builder (``cluster.serve.app:build_app``).

``deploy/app.yaml`` ``applications[].args`` maps 1:1 onto these fields, so a YAML typo is a
validation error at ``serve run`` time, not a silently ignored key:

    args:
      engine: {model: default, num_blocks: 1024}     # replicas.config.EngineConfig
      num_replicas: 2
      router: tinyserve                              # or prefix_cache_affinity / pow2
      router_kwargs: {select_timeout_s: 0.05}
      selector: {port: 50051, policy: tinyserve, num_replicas: 2,
                 objective: {alpha_load: 3.0},       # cluster.selector.objective.ObjectiveConfig
                 tls: {cert_file: ..., key_file: ..., ca_file: ...}}  # cluster.selector.grpc_tls
      placement: {llm: {llm: 1}, ingress: {head: 1}} # custom Ray resources pinning replicas
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cluster.selector.grpc_tls import TLSSettings
from cluster.selector.objective import ObjectiveConfig
from cluster.selector.objective_settings import objective_from_mapping
from cluster.serve.openai_auth import AuthSettings
from cluster.serve.openai_limits import LimitSettings
from replicas.config import EngineConfig
from replicas.niceness import Niceness

RouterName = Literal["tinyserve", "prefix_cache_affinity", "pow2"]

# The Serve request router class for each ``router`` choice (import paths, resolved by Serve).
ROUTER_CLASSES: dict[str, str] = {
    "tinyserve": "cluster.serve.router:TinyServeRouter",
    "prefix_cache_affinity": (
        "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router:"
        "PrefixCacheAffinityRouter"
    ),
    "pow2": ("ray.serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter"),
}


class SelectorSettings(BaseModel):
    """The cache-selection service deployment (``num_replicas`` replicas in the same app)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        default=True,
        description="Run the selection service; when False replicas report nothing and the "
        "tinyserve router always uses its power-of-two fallback.",
    )
    host: str = Field(
        default="",
        description="gRPC bind address of the service; '' = the node's own address (what "
        "replicas and routers dial), not every interface.",
    )
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port (0 = any free port).")
    fast_lane_port: int | None = Field(
        default=50061,
        ge=0,
        le=65535,
        description="Port of the Select fast lane (cluster/selector/fast_lane.py: length-"
        "prefixed frames over TCP, ~4x the Select/s of gRPC per core), published with the "
        "gRPC address; the router uses it and falls back to gRPC. 0 = any free port, null = "
        "off. Plaintext: not opened when tls is on.",
    )
    policy: str = Field(default="tinyserve", description="The service's default policy.")
    pending_ttl_s: float = Field(
        default=2.0, gt=0, description="Speculative-insert lifetime of a routed prefix."
    )
    stale_after_s: float = Field(
        default=30.0, gt=0, description="A silent replica expires after this long."
    )
    learn: bool = Field(default=False, description="Learn the objective's w from feedback.")
    objective: dict[str, Any] = Field(
        default_factory=dict,
        description="ObjectiveConfig overrides (cluster/selector/objective.py), e.g. {alpha_load: 3}; "
        "unknown keys and out-of-range values are refused at deploy time.",
    )
    num_cpus: float = Field(default=0.5, ge=0, description="Ray CPUs of each service replica.")
    num_replicas: int = Field(
        default=2,
        ge=1,
        description="Selection service replicas; each holds the full index (every LLM "
        "replica streams to all) and the router fails over between them.",
    )
    tls: TLSSettings = Field(
        default_factory=TLSSettings,
        description="TLS of the service's gRPC (cluster/selector/grpc_tls.py): cert_file, key_file and "
        "ca_file together, or none (plaintext). Read once at deploy time, handed through Ray.",
    )

    @field_validator("objective")
    @classmethod
    def _check_objective(cls, v: dict[str, Any]) -> dict[str, Any]:
        objective_from_mapping(v)  # NOTE: ValueError -> pydantic ValidationError naming it
        return v

    @field_validator("tls")
    @classmethod
    def _check_tls(cls, v: TLSSettings) -> TLSSettings:
        v.require_both()  # NOTE: the app's selection replicas serve and its clients dial
        return v

    def objective_config(self) -> ObjectiveConfig:
        """The service's ObjectiveConfig: the defaults, ``objective``, then ``learn``."""
        cfg = objective_from_mapping(self.objective)
        return replace(cfg, learn=True) if self.learn else cfg


class PlacementSettings(BaseModel):
    """Custom Ray resources each deployment's replicas ask for, to pin them to nodes that
    offer them (``ray start --resources='{"llm": 1}'``): e.g. LLM replicas on GPU nodes only,
    the ingress and the selection service on the head. Empty = anywhere (Serve spreads)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ingress: dict[str, float] = Field(
        default_factory=dict, description="Resources of each OpenAIIngress replica."
    )
    llm: dict[str, float] = Field(
        default_factory=dict, description="Resources of each LLMReplica."
    )
    selector: dict[str, float] = Field(
        default_factory=dict, description="Resources of each CacheSelector replica."
    )

    @field_validator("ingress", "llm", "selector")
    @classmethod
    def _check(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if not name or name in ("CPU", "GPU", "memory") or not amount > 0:
                raise ValueError(
                    f"{name!r}: {amount}: custom resources only (set CPUs and GPUs with "
                    "num_cpus/num_gpus fields), amounts > 0"
                )
        return v


class AppConfig(BaseModel):
    """Everything ``build_app`` needs; every field has a working default (SmolLM2 on CPU)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="Engine of every LLM replica."
    )
    served_model_name: str | None = Field(
        default=None,
        description="Model id in the OpenAI API; None = 'smollm2-135m-instruct' for the "
        "default model, else the checkpoint's directory/file name.",
    )
    num_replicas: int = Field(default=2, ge=1, description="LLM replicas.")
    num_cpus_per_replica: float = Field(default=1.0, ge=0, description="Ray CPUs per replica.")
    num_gpus_per_replica: float = Field(
        default=0.0, ge=0, description="Ray GPUs per replica (set engine.device: cuda too)."
    )
    max_ongoing_requests: int = Field(
        default=64, ge=1, description="Serve's cap on requests in flight per LLM replica."
    )
    default_max_tokens: int = Field(
        default=256,
        ge=1,
        description="max_tokens of a chat request that sets none (vLLM uses the rest of the "
        "context; bounded here so a CPU replica answers in seconds).",
    )
    ingress_num_replicas: int = Field(default=1, ge=1, description="HTTP ingress replicas.")
    ingress_tokenizer_threads: int = Field(
        default=4,
        ge=1,
        description="Threads per ingress replica that tokenize prompts (one tokenizer copy each).",
    )
    ingress_inline_tokenize_chars: int = Field(
        default=2048,
        ge=0,
        description="Prompts of at most this many characters are tokenized on the ingress's "
        "event loop (no thread hop; ~0.2 us a character on a 2-core CPU box); longer ones on "
        "the tokenizer threads, so streams keep flowing while they encode. 0 = always threads.",
    )
    ingress_idle_inline_tokenize_chars: int = Field(
        default=32768,
        ge=0,
        description="While the ingress replica has no request in flight and no prompt on its "
        "tokenizer threads, prompts of at most this many characters are tokenized on its event "
        "loop too: it serves no one else then, and the thread hop is saved (~0.3 ms). 32,768 "
        "characters are ~8k tokens, ~2 ms of encode in pieces on a 16-core host. 0 = off.",
    )
    ingress_split_encode: Literal["idle", "always", "never"] = Field(
        default="idle",
        description="When a long prompt (>= 1,024 characters) may be encoded in pieces on the "
        "tokenizer's own thread pool, one piece per core (cluster/serve/chunked_encode.py; same "
        "ids): 'idle' = only while the ingress replica has no request in flight and no prompt "
        "on its tokenizer threads (the c=1 latency case: 1,024 tokens 1.77 -> 0.82 ms on a "
        "16-core host); 'always'; 'never'.",
    )
    stream_outputs_over_socket: bool = Field(
        default=True,
        description="Outputs go from an LLM replica to the ingress over a Unix "
        "socket when both run on one node (replicas/output_post.py: ~10 us an output against "
        "~0.8 ms of CPU for a Ray streaming item); as Ray items otherwise.",
    )
    serve_main_loop: bool | Literal["ingress", "llm"] = Field(
        default=False,
        description="Serve runs the ingress's and the LLM replicas' handlers on each replica's "
        "main event loop, and the ingress's request router on the caller's loop "
        "(RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 and RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 "
        "in those replicas' runtime_env): no thread hop per request and per streamed chunk. "
        "Random 8B on an H100, c=1: served TTFT 10.0 -> 8.4 ms above the engine's (session 16); "
        "but random 1B, c = 16-64: 0.84-0.92 of the engine's tok/s against 0.92-0.94 with "
        "Serve's layout (session 17; benchmarks/results/serve_overhead_notes.md). Off by default "
        "since the early start took most of the c=1 gain's hop. 'ingress' / 'llm': that "
        "deployment alone.",
    )
    niceness: Niceness | None = Field(
        default=None,
        description="CPU niceness of every replica process of the app (ingress, LLM replicas "
        "and their engine core's process, selection service; all threads). Ray starts workers "
        "at 15 (RAY_worker_niceness), so other Ray work on a node competes with the serving "
        "path as an equal. 0 puts the path ahead of it: beside two CPU-bound processes at 15, "
        "1.4-1.9x the output tok/s at c=1 on the 2-core box; serving alone it costs a little "
        "(Serve's HAProxy stays at 15), hence off by default (replicas/niceness.py). Lowering "
        "needs root or CAP_SYS_NICE; without, a replica logs a warning and keeps 15. null: as "
        "Ray started them.",
    )
    early_start: bool | None = Field(
        default=None,
        description="The tinyserve router writes each request to its chosen replica over a "
        "same-node Unix socket before Serve's call for it leaves; the replica starts it at once "
        "and Serve's call claims it (replicas/early_start.py): a handle hop off the TTFT. Only "
        "for replicas on the ingress's node with outputs posted to its inbox, and while the "
        "replica has fewer than max_ongoing_requests in flight. Unset = on where the engine core "
        "runs in its own process (the CUDA default); with the core on a thread of the replica "
        "the early prefill competes for the GIL with Serve's call for it (CPU box, c=1: TTFT "
        "+1.5-4.5 ms; benchmarks/results/serve_overhead_notes.md, session 17).",
    )
    ingress_num_cpus: float = Field(
        default=0.5, ge=0, description="Ray CPUs per ingress replica (tokenization only)."
    )
    router: RouterName = Field(
        default="tinyserve", description="Serve request router of the LLM deployment."
    )
    router_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="request_router_kwargs of that router (TinyServeRouter: "
        "select_timeout_s, policy, ...).",
    )
    report_interval_s: float = Field(
        default=0.05, gt=0, description="How often a replica flushes KV events to the service."
    )
    stream_max_outputs_per_s: float = Field(
        default=1000.0,
        ge=0,
        description="Streamed outputs per second an LLM replica sends before it merges each "
        "stream's deltas into fewer, larger chunks (a sequence's first and last output always "
        "go at once; replicas/output_pacing.py). Each output costs ~2.7 ms of serving-path CPU "
        "on a 2-core box (replica, ingress, proxy). 0 = every delta.",
    )
    selector: SelectorSettings = Field(default_factory=SelectorSettings)
    placement: PlacementSettings = Field(
        default_factory=PlacementSettings,
        description="Custom Ray resources pinning each deployment to nodes (default: none).",
    )
    auth: AuthSettings = Field(
        default_factory=AuthSettings, description="API keys of the HTTP API (on by default)."
    )
    limits: LimitSettings = Field(
        default_factory=LimitSettings, description="Per-request input limits of the ingress."
    )

    def model_name(self) -> str:
        """The model id clients send and /v1/models lists."""
        if self.served_model_name:
            return self.served_model_name
        if self.engine.model == "default":
            return "smollm2-135m-instruct"
        return self.engine.model.rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf")

    def main_loop_on(self, deployment: Literal["ingress", "llm"]) -> bool:
        """Whether ``serve_main_loop`` puts ``deployment``'s handlers on Serve's main loop."""
        return self.serve_main_loop is True or self.serve_main_loop == deployment

    def early_start_on(self) -> bool:
        """``early_start``, its unset value resolved (on with the engine core's process)."""
        return self.engine.engine_process if self.early_start is None else self.early_start

    def router_class(self) -> str:
        return ROUTER_CLASSES[self.router]
