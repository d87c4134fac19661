"""Regenerate fixtures/vllm_hash_vectors.json from vLLM's own hashing (run by hand:
``python tests/kvmanager/gen_vllm_hash_vectors.py``). Needs vLLM importable."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

CASES = [  # (seed or None for vLLM's default, block_size, num_tokens, extra_keys)
    (None, 16, 40, None),
    (None, 16, 64, ("salt-a",)),
    (None, 32, 100, None),
    ("1234", 16, 48, None),
    (None, 4, 9, (7, "lora")),
]


def main() -> None:
    import vllm
    import vllm.v1.core.kv_cache_utils as kcu
    from vllm.utils.hashing import sha256_cbor

    rng = random.Random(0)
    out = {"vllm_version": vllm.__version__, "scheme": "sha256_cbor", "cases": []}
    for seed, block_size, n, extra in CASES:
        if seed is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = seed
        kcu.init_none_hash(sha256_cbor)
        tokens = [rng.randrange(0, 150_000) for _ in range(n)]
        parent, hashes = None, []
        for i in range(n // block_size):
            chunk = tokens[i * block_size : (i + 1) * block_size]
            parent = kcu.hash_block_tokens(sha256_cbor, parent, chunk, extra)
            hashes.append(kcu.maybe_convert_block_hash(parent))
        out["cases"].append(
            {"seed": seed, "block_size": block_size, "token_ids": tokens,
             "extra_keys": list(extra) if extra else None, "block_hashes": [str(h) for h in hashes]}
        )
    path = Path(__file__).parent / "fixtures" / "vllm_hash_vectors.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {len(out['cases'])} cases from vLLM {vllm.__version__} to {path}")


if __name__ == "__main__":
    main()
