"""BERT (post-LN encoder): the adds live inside ``attention.output`` and ``output`` (add + LayerNorm)."""
from . import ArchSpec

SPEC = ArchSpec(name="bert", model_types=("bert",), style="post", norm="layer", layers="encoder.layer",
                final_norm=None)
