"""Llama-like decoders: Llama, Mistral, Qwen2, Qwen3 (pre-RMSNorm, two residual adds per layer)."""
from . import ArchSpec

SPEC = ArchSpec(name="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), style="pre", norm="rms")
