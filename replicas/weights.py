"""Load a Hugging Face safetensors checkpoint (single file or sharded index) into CausalLM.

Checkpoint tensor -> our parameter (the only renames are the fused projections)::

    *.self_attn.{q,k,v}_proj.{weight,bias}  -> *.self_attn.qkv_proj  rows [q | k | v]
    *.mlp.{gate,up}_proj.{weight,bias}      -> *.mlp.gate_up_proj    rows [gate | up]
    lm_head.weight                          -> skipped when tied to embed_tokens
    everything else                         -> same name

Tensors are read one at a time (safetensors mmap), so peak memory is one model plus one tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from replicas.model import CausalLM

_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint dir (via the sharded index when present)."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        with index.open() as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        return [root / name for name in sorted(set(weight_map.values()))]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {model_dir}")
    return files


def iter_checkpoint(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of the checkpoint, lazily."""
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not dicts
                yield name, f.get_tensor(name)


def _shard_sizes(model: CausalLM, fused: str) -> list[int]:
    cfg = model.config
    if fused == "qkv_proj":
        return [cfg.q_size, cfg.kv_size, cfg.kv_size]
    return [cfg.intermediate_size, cfg.intermediate_size]


@torch.no_grad()
def load_weights(model: CausalLM, model_dir: str | Path) -> None:
    """Copy every checkpoint tensor into ``model`` (cast to the parameter dtype).

    Raises ValueError naming the tensor on a shape mismatch, an unknown tensor, or a
    parameter the checkpoint never provides.
    """
    params = dict(model.named_parameters())
    tied = model.config.tie_word_embeddings
    loaded: set[str] = set()
    for name, tensor in iter_checkpoint(model_dir):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and tied:
            continue
        parts = name.split(".")
        target, offset, size = name, 0, None
        if len(parts) >= 2 and parts[-2] in _FUSED:
            fused, shard = _FUSED[parts[-2]]
            target = ".".join([*parts[:-2], fused, parts[-1]])
            sizes = _shard_sizes(model, fused)
            offset, size = sum(sizes[:shard]), sizes[shard]
        param = params.get(target)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} has no matching parameter")
        dst = param.data if size is None else param.data.narrow(0, offset, size)
        if dst.shape != tensor.shape:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(dst.shape)}"
            )
        dst.copy_(tensor)
        loaded.add(target)
    missing = set(params) - loaded
    if tied:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks parameters: {sorted(missing)[:8]}")
