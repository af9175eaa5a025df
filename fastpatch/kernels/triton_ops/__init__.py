"""Triton kernels for fastpatch, one module per op (Liger style).

``dispatch`` is pure Python (no triton import) so the launch-config logic can be inspected and
enumerated (scripts/triton_aot_report.py) anywhere; ``fused_add_norm`` holds the kernels and the
launcher and imports triton.
"""
