"""Varlen paged-prefill cases shared by the Triton kernel tests (interpreter on CPU, CUDA).

``make_case`` builds a batch of sequences with random cached-prefix lengths that cross block
boundaries (plus a fresh prompt, a one-token chunk and an empty chunk), scattered block
tables padded with -1, and a query that is a strided slice of a wider row (as the engine's
fused qkv output). ``rel_err`` compares against the fp32 gather + SDPA reference.

Run as a script with TRITON_INTERPRET=1 (set before triton is imported) it executes every
case of CASES through the Triton kernel on CPU and prints {case id: relative error} as JSON;
tests/cuda_kernels/test_prefill_triton.py does exactly that in a subprocess.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import torch


class Case(NamedTuple):
    num_kv_heads: int
    group: int  # query heads per KV head
    head_dim: int
    dtype: str
    block_size: int
    config: tuple[int, int, int, int] | None  # TileConfig fields; None = launcher default
    max_len: int  # longest context
    seed: int

    @property
    def id(self) -> str:
        cfg = "default" if self.config is None else "x".join(map(str, self.config[:2]))
        return (
            f"kv{self.num_kv_heads}-g{self.group}-d{self.head_dim}-{self.dtype}"
            f"-bs{self.block_size}-{cfg}-L{self.max_len}"
        )


# NOTE: small tiles (32 x 16) make the interpreter cover many row tiles and key tiles (full
# and masked loops, tiles straddling block boundaries) with small, fast shapes.
CASES: tuple[Case, ...] = (
    Case(2, 1, 64, "float16", 16, (32, 16, 4, 2), 90, 1),
    Case(2, 4, 64, "bfloat16", 16, (32, 16, 4, 2), 90, 2),
    Case(1, 8, 128, "bfloat16", 16, (64, 32, 4, 2), 70, 3),
    Case(3, 3, 64, "float16", 32, (32, 16, 4, 2), 80, 4),  # SmolLM2's GQA ratio, 32-token blocks
    Case(2, 4, 128, "float16", 16, (16, 64, 4, 2), 100, 5),  # BLOCK_N spans 4 blocks
    Case(1, 4, 64, "bfloat16", 16, None, 200, 6),  # the H100 default tiles (128 x 64)
)


INT64_TABLES = "int64-block-tables"  # CASES[0] with int64 block tables, default tiles


def make_case(case: Case, device: str) -> dict[str, object]:
    """Inputs for ops/prefill_triton.paged_prefill_attention (block tables on device,
    cu_seqlens_q and seq_lens on the host, as the engine passes them)."""
    gen = torch.Generator().manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)
    bs, hkv, d = case.block_size, case.num_kv_heads, case.head_dim
    num_heads = hkv * case.group
    lens = torch.randint(1, case.max_len + 1, (5,), generator=gen).tolist()
    lens[0] = case.max_len
    chunks = torch.randint(1, 60, (5,), generator=gen).tolist()
    q_lens = [min(n, c) for n, c in zip(lens, chunks, strict=True)]
    q_lens[1] = lens[1]  # a fresh prompt: no cached prefix
    q_lens[2] = 1  # one new token over a prefix
    lens.append(int(torch.randint(1, 40, (1,), generator=gen)))
    q_lens.append(0)  # a sequence with no new tokens this step
    max_blocks = -(-max(lens) // bs) + 2
    num_blocks = len(lens) * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(lens), max_blocks), -1, dtype=torch.int32)
    for i, n in enumerate(lens):
        used = -(-n // bs)
        tables[i, :used] = perm[i * max_blocks : i * max_blocks + used].to(torch.int32)
    shape = (num_blocks, bs, hkv, d)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    num_tokens = sum(q_lens)
    wide = torch.randn(num_tokens, num_heads + 2, d, generator=gen).to(dtype)
    query = wide[:, 1 : num_heads + 1]  # NOTE: token stride > num_heads * head_dim
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return {
        "query": query.to(device),
        "k_cache": k_cache.to(device),
        "v_cache": v_cache.to(device),
        "cu_seqlens_q": cu,
        "seq_lens": torch.tensor(lens, dtype=torch.int32),
        "block_tables": tables.to(device),
        "scale": d**-0.5,
    }


def rel_err(out: torch.Tensor, inputs: dict[str, object]) -> float:
    """Relative L2 error of out against the fp32 reference on the same (upcast) inputs."""
    from cuda_kernels import reference

    args = dict(inputs)
    for name in ("query", "k_cache", "v_cache"):
        args[name] = args[name].float()  # type: ignore[attr-defined]
    ref = reference.paged_prefill_attention(**args)  # type: ignore[arg-type]
    diff = (out.double() - ref.double()).norm() / ref.double().norm()
    return float(diff)


def _patch_interpreter_bf16_dot() -> None:
    """NOTE: Triton's interpreter (3.9) keeps bf16 as raw uint16 bits and its tl.dot
    multiplies those bits (a [16,16] bf16 product is off by ~1e10; fp16 is exact). Widen bf16
    dot operands to fp32 first; the kernel source and every other op stay as they are."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    original = interp.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        def widen(h):  # type: ignore[no-untyped-def]
            if h.dtype.scalar != tl.bfloat16:
                return h
            data = interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interp.TensorHandle(data, tl.float32)

        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interp.InterpreterBuilder.create_dot = create_dot  # type: ignore[method-assign]


def run_interpreted() -> dict[str, float]:
    from cuda_kernels import prefill_triton

    _patch_interpreter_bf16_dot()

    errs = {}
    for case in CASES:
        inputs = make_case(case, "cpu")
        cfg = None if case.config is None else prefill_triton.TileConfig(*case.config)
        out = prefill_triton.paged_prefill_attention(**inputs, config=cfg)  # type: ignore[arg-type]
        assert out.shape == inputs["query"].shape and out.dtype == inputs["query"].dtype  # type: ignore[attr-defined]
        errs[case.id] = rel_err(out, inputs)
    inputs = make_case(CASES[0], "cpu")
    inputs["block_tables"] = inputs["block_tables"].long()  # type: ignore[attr-defined]
    out = prefill_triton.paged_prefill_attention(**inputs)  # type: ignore[arg-type]
    errs[INT64_TABLES] = rel_err(out, inputs)
    return errs


if __name__ == "__main__":
    print(json.dumps(run_interpreted()))
