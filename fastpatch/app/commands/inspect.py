"""`fastpatch inspect FILE`: the manifest and sites of a patch file (.safetensors or .gguf)."""
from __future__ import annotations

import json
import sys

NAME = "inspect"
HELP = "show a patch file's manifest and a table of its sites"
DESCRIPTION = """\
Print a patch file's manifest (name, version, author, created time, description and the
fingerprint of the model it was fitted on) and one row per patch: site, kind, rank, gate,
position scope and tensor shapes. The file is fully checked while reading (hashes, shapes,
values); a broken file is reported and the command exits with status 1.

A llama.cpp / repeng control vector (.gguf) is shown as the steering patches it maps to
(direction.N -> layers.N.resid_post).

example:
  fastpatch inspect honesty.safetensors
  fastpatch inspect honesty.safetensors --json | jq .sites
  fastpatch inspect happy.gguf
"""


def add_arguments(p) -> None:
    p.add_argument("file", help="a fastpatch .safetensors patch file or a control-vector .gguf")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _gate_text(gate) -> str:
    if gate is None:
        return "-"
    return f"{gate['metric']} {gate['fire']} {gate['threshold']:g}"


def _rows(mapping: dict) -> list:
    """One dict per patch: site, index in the site, kind, rank, gate, scope, tensor shapes."""
    from ...core.bank import PatchBank
    from ...core.patches import CanonicalPatch, Gated
    from ...core.scope import Scoped

    rows = []
    for site, value in mapping.items():
        scope = "all"
        if isinstance(value, Scoped):
            scope, value = str(value.scope), value.patch
        if value is None:
            rows.append({"site": site, "index": None, "container": "none", "kind": "-", "rank": 0,
                         "gate": None, "scope": scope, "shapes": {}})
            continue
        container = "bank" if isinstance(value, PatchBank) else "list" if isinstance(value, list) else "patch"
        plist = value.patches if isinstance(value, PatchBank) else value if isinstance(value, list) else [value]
        for j, p in enumerate(plist):
            c = p.canonical()
            gate = None
            if c.gate is not None:
                gate = {"metric": c.gate.metric, "fire": c.gate.fire, "threshold": c.gate.threshold}
            inner = p.patch if isinstance(p, Gated) else p
            kind = c.kind if isinstance(inner, CanonicalPatch) else inner.kind
            if c.kind == "composed":
                kind = "composed(" + " > ".join(c.params.get("parts", [])) + ")"
            rows.append({"site": site, "index": j if container != "patch" else None, "container": container,
                         "kind": kind, "rank": c.rank, "gate": gate, "scope": scope,
                         "shapes": _shapes(inner)})
    return rows


def _shapes(p) -> dict:
    names = ("v", "u", "A", "B", "bias", "R", "W", "b", "down", "up", "shift")
    out = {}
    for n in names:
        t = getattr(p, n, None)
        if t is not None and hasattr(t, "shape") and not callable(t):
            out[n] = list(t.shape)
    return out


def _describe(path: str) -> dict:
    from ...files.gguf_io import import_gguf, read_gguf
    from ...files.patch_file import load, read_manifest

    if path.lower().endswith(".gguf"):
        info = read_gguf(path)
        mapping = import_gguf(path)
        head = {"format": "llama.cpp control vector (GGUF)", "model_hint": info["model_hint"],
                "layer_count": info["layer_count"]}
    else:
        manifest, _ = read_manifest(path)
        mapping = load(path)  # full check of every tensor, not just the header
        head = {k: manifest.get(k) for k in ("format", "format_version", "name", "version", "created", "author",
                                              "description", "fastpatch_version", "hidden_size", "model",
                                              "payload_sha256")}
    head["sites"] = _rows(mapping)
    return head


def _print_text(d: dict, out) -> None:
    for key in ("format", "name", "version", "author", "created", "description", "hidden_size", "model_hint",
                "layer_count"):
        if key in d:
            out.write(f"{key + ':':<13}{d[key] if d[key] is not None else '-'}\n")
    if "model" in d:
        m = d["model"]
        if not m:
            out.write("model:       - (no fingerprint recorded)\n")
        else:
            out.write(f"model:       {m.get('architecture')} ({m.get('model_type')}), hidden {m.get('hidden_size')}, "
                      f"{m.get('num_layers')} layers, {m.get('dtype')}\n")
            out.write(f"             config sha256 {str(m.get('config_sha256'))[:16]}..., "
                      f"weights sha256 {str(m.get('weights_sha256'))[:16]}...\n")
    header = ("site", "kind", "rank", "gate", "scope", "tensors")
    rows = []
    for r in d["sites"]:
        site = r["site"] + (f"[{r['index']}]" if r["index"] is not None else "")
        if r["container"] == "bank":
            site += " (bank)"
        shapes = " ".join(f"{k}{s}" for k, s in r["shapes"].items())  # e.g. "A[64, 4] B[4, 64]"
        rows.append((site, r["kind"], str(r["rank"]), _gate_text(r["gate"]), r["scope"], shapes or "-"))
    widths = [max(len(x) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    out.write("\n" + "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip() + "\n")
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
    if not rows:
        out.write("(no sites)\n")


def run(args) -> int:
    from ...files.patch_file import PatchFileError

    try:
        d = _describe(args.file)
    except (PatchFileError, OSError, ImportError) as exc:
        print(f"fastpatch inspect: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        _print_text(d, sys.stdout)
    return 0
