"""OpenAIIngress: the HTTP front door (FastAPI through ``serve.ingress``).

Routes: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{model}``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream`` true = SSE), vLLM's
``POST /tokenize`` and ``/detokenize`` (``cluster.serve.openai_extras``); any other path or method
answers 404/405 in OpenAI's error shape. Bad input gets OpenAI's error body
with the right status (400 invalid request, 404 unknown model, 503 no replica answered) and
disturbs nothing else. The prompt is tokenized here, once; the token ids travel in a
``GenerateRequest`` through the router (which hashes them) to the replica.

Failure handling: a replica that dies before the first token is retried on another replica
(``MAX_ATTEMPTS``); once tokens have streamed, the error ends the stream. A client that goes
away cancels the Serve call, which aborts the request in the replica's engine. That replica
call and the response made of its outputs (JSON or SSE) live in ``openai_answer.py``
(``IngressAnswer``); this file holds the app, the routes, tokenizing and the request's checks.
"""

# NOTE: no ``from __future__ import annotations`` here, on purpose: Serve's class-based
# ingress rewrites the route methods' signatures, and FastAPI then cannot resolve postponed
# (string) annotations such as ``request: Request`` (it would read them as query params).

import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from cluster.serve import openai_limits as limits
from cluster.serve.app_config import AppConfig
from cluster.serve.openai_answer import IngressAnswer
from cluster.serve.openai_auth import check_local_only, load_keys
from cluster.serve.openai_extras import (
    DetokenizeRequest,
    TokenizeRequest,
    detokenize,
    fit_context,
    install_error_handlers,
    model_card,
    render_chat,
    served_max_model_len,
    tokenize,
)
from cluster.serve.openai_guard import Guard, install
from cluster.serve.openai_health import HealthCache
from cluster.serve.openai_parse import checked_policy, parse_body
from cluster.serve.openai_protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from cluster.serve.openai_responses import ResponseContext
from cluster.serve.openai_schema import install_openapi
from cluster.serve.openai_trace import IngressTrace, TraceLog
from cluster.serve.output_inbox import OutputInbox
from cluster.serve.tokenizer_pool import TokenizerPool, encode_ids
from replicas.deployment import GenerateRequest
from replicas.loop_lag import LoopLag
from replicas.niceness import apply_niceness
from replicas.ray_node import serve_loop_flags, this_node_id

api = FastAPI(title="TinyServe Cluster", version="0.1.0")
install(api)  # NOTE: API key and body size, before any route runs (cluster.serve.openai_guard)
install_error_handlers(api)
install_openapi(api)  # NOTE: /openapi.json with the real request and response bodies


@api.exception_handler(OpenAIError)
async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    msg = f"{'.'.join(loc) + ': ' if loc else ''}{first.get('msg', 'invalid request')}"
    err = OpenAIError(msg, param=loc[0] if loc else None)
    return JSONResponse(err.body(), status_code=400)


def _serve_http_host() -> str | None:
    """The address Serve's HTTP proxies bind (None when it cannot be read)."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        return str(client.http_config.host) if client is not None else None
    except Exception:  # NOTE: unknown counts as not loopback (auth off then refuses to start)
        return None


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=256)
@serve.ingress(api)
class OpenAIIngress(IngressAnswer):
    """``llm`` is the LLMReplica deployment's handle; ``settings`` the AppConfig dict."""

    def __init__(self, llm: Any, settings: dict[str, Any]) -> None:
        from replicas.model_loader import load_tokenizer
        from replicas.model_source import resolve_model_dir

        apply_niceness()
        self.config = AppConfig(**settings)
        self.model_name = self.config.model_name()
        model_dir = resolve_model_dir(self.config.engine.model)
        self.tokenizer = load_tokenizer(model_dir)
        self.max_model_len = served_max_model_len(self.config.engine.max_model_len, model_dir)
        self.llm = llm.options(stream=True)
        self.trace_log = TraceLog(loop_lag=LoopLag.from_env(), main_lag=LoopLag.from_env())
        node = this_node_id()
        self._inbox = (OutputInbox(node) if node and self.config.stream_outputs_over_socket
                       else None)
        # NOTE: tokenizing (and the chat template) of a long prompt runs off the event loop,
        # so streams keep flowing while it is encoded; one tokenizer copy per thread. A short
        # one is encoded inline: the thread hop would cost more than the encode.
        self._tokenize_pool = TokenizerPool(
            self.tokenizer,
            self.config.ingress_tokenizer_threads,
            inline_max_chars=self.config.ingress_inline_tokenize_chars,
            idle_inline_max_chars=self.config.ingress_idle_inline_tokenize_chars,
            split_encode=self.config.ingress_split_encode,
        )
        self.num_active = 0
        self.limits = self.config.limits
        self.vocab_size = len(self.tokenizer) if self.tokenizer is not None else None
        self.max_token_chars = limits.max_token_chars(self.tokenizer)
        check_local_only(self.config.auth, _serve_http_host())
        api.state.guard = Guard(load_keys(self.config.auth), self.limits)
        install_openapi(api, self.model_name)  # NOTE: request bodies name the served model
        self._health = HealthCache(serve.get_replica_context().app_name)

    def __del__(self) -> None:
        """Serve's shutdown hook: the inbox's socket and directory go."""
        inbox = getattr(self, "_inbox", None)
        if inbox is not None:
            inbox.shutdown()

    # -- plumbing ------------------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise OpenAIError(
                f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                status_code=404,
                param="model",
                code="model_not_found",
            )

    def _tokenize_chat(self, tokenizer: Any, body: ChatCompletionRequest, split: bool = True
                       ) -> tuple[str, list[int]]:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise OpenAIError("this model has no chat template; use /v1/completions")
        chat = body.chat()
        num_chars = sum(len(m["content"]) for m in chat)
        limits.check_prompt_chars(num_chars, self.max_token_chars, self.limits, "messages")
        text = render_chat(tokenizer, chat, add_generation_prompt=True)
        # NOTE: the template already holds the special tokens; do not add a BOS twice.
        ids = encode_ids(tokenizer, text, add_special_tokens=False, split=split)
        limits.check_prompt_tokens(len(ids), self.limits, "messages")
        return text, ids

    def _tokenize_completion(self, tokenizer: Any, body: CompletionRequest, split: bool = True
                             ) -> tuple[str, list[int]]:
        prompt = body.single_prompt()
        if isinstance(prompt, list):
            limits.check_prompt_tokens(len(prompt), self.limits)
            limits.check_token_ids(prompt, self.vocab_size, "prompt")
            text = tokenizer.decode(prompt) if tokenizer is not None else ""
            return text, prompt
        if tokenizer is None:
            raise OpenAIError("this model has no tokenizer; send token ids as the prompt")
        limits.check_prompt_chars(len(prompt), self.max_token_chars, self.limits)
        ids = encode_ids(tokenizer, prompt, split=split)
        limits.check_prompt_tokens(len(ids), self.limits)
        return prompt, ids

    def _check_limits(self, body: ChatCompletionRequest | CompletionRequest) -> None:
        limits.check_params(
            body.stop, body.stop_token_ids, body.session_id, self.vocab_size, self.limits
        )

    # -- routes ----------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> JSONResponse:
        """200 while an LLM replica runs, else 503 (``cluster.serve.openai_health``)."""
        state = await self._health.get()
        return JSONResponse(state.body(), status_code=200 if state.healthy else 503)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [model_card(self.model_name, self.max_model_len)]}

    @api.get("/v1/models/{model:path}")
    async def model(self, model: str) -> dict[str, Any]:
        self._check_model(model)
        return model_card(self.model_name, self.max_model_len)

    @api.post("/tokenize")
    async def tokenize(self, request: Request) -> dict[str, Any]:
        body = await parse_body(request, TokenizeRequest, self.limits)
        if body.model is not None:
            self._check_model(body.model)
        return await self._tokenize_pool.run(tokenize, body, self.max_model_len)

    @api.post("/detokenize")
    async def detokenize(self, request: Request) -> dict[str, Any]:
        body = await parse_body(request, DetokenizeRequest, self.limits)
        if body.model is not None:
            self._check_model(body.model)
        return await self._tokenize_pool.run(detokenize, body, None)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        recv = time.time()
        body = await parse_body(request, ChatCompletionRequest, self.limits)
        self._check_model(body.model)
        body.check_supported()
        self._check_limits(body)
        return await self._generate("chat", "chatcmpl", body, self._tokenize_chat, recv)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        recv = time.time()
        body = await parse_body(request, CompletionRequest, self.limits)
        self._check_model(body.model)
        body.check_supported()
        self._check_limits(body)
        return await self._generate("completion", "cmpl", body, self._tokenize_completion, recv)

    def inbox_stats(self) -> dict[str, int]:
        """Frames the output inbox received (and dropped: their request had ended); -1 when
        the outputs travel as Ray items (``stream_outputs_over_socket`` off, or no Ray node)."""
        inbox = self._inbox
        if inbox is None:
            return {"frames": -1, "dropped": -1}
        return {"frames": inbox.num_frames, "dropped": inbox.num_dropped}

    def serve_loops(self) -> dict[str, bool]:
        """How Serve runs this ingress's handlers and its handle's router (``serve_main_loop``)."""
        return serve_loop_flags()

    def traces(self) -> list[dict[str, Any]]:
        """Finished requests' per-hop stamps since the last call (``cluster.serve.openai_trace``);
        for benchmarks and operators, through the deployment handle."""
        return self.trace_log.take()

    async def _generate(
        self,
        kind: Literal["chat", "completion"],
        id_prefix: str,
        body: ChatCompletionRequest | CompletionRequest,
        tokenize: Callable[[Any, Any], tuple[str, list[int]]],
        recv: float,
    ) -> Any:
        """Tokenize ``body`` (inline or on a tokenizer thread, by its size) and answer it."""
        parsed = time.time()
        self.trace_log.sample_loops()
        n = body.num_prompt_chars()
        idle = self.num_active == 0
        inline = self._tokenize_pool.is_inline(n, idle)
        split = self._tokenize_pool.may_split(idle)
        text, ids = await self._tokenize_pool.run(tokenize, body, split, num_chars=n, idle=idle)
        rid = f"{id_prefix}-{uuid.uuid4().hex}"
        trace = IngressTrace(rid, recv, parsed, tokenized_inline=inline, split_allowed=split)
        params = body.sampling_params(self.config.default_max_tokens)
        explicit = (getattr(body, "max_completion_tokens", None) or body.max_tokens) is not None
        params.max_tokens = fit_context(len(ids), params.max_tokens, explicit, self.max_model_len)
        req = GenerateRequest(
            rid,
            ids,
            params,
            prompt=text,
            session_id=body.session_id or "",
            routing_policy=checked_policy(body.routing_policy),
            n=body.n,
            stream=bool(body.stream),
            reply_to=await self._reply_to(),
        )
        ctx = ResponseContext(kind, rid, self.model_name, self.tokenizer, params.logprobs)
        trace.tokenized = time.time()
        return await self._respond(ctx, req, body.stream, body.include_usage(), trace)
