"""Granite: Llama's block whose branches are scaled before each add,
``residual + branch * residual_multiplier`` (the block's attribute, from ``config.residual_multiplier``)."""
from . import ArchSpec

SPEC = ArchSpec(name="granite", model_types=("granite",), style="pre", norm="rms",
                residual_multiplier="residual_multiplier")
