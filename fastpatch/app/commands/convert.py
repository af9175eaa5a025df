"""`fastpatch convert IN OUT`: fastpatch .safetensors ↔ llama.cpp control-vector .gguf."""
from __future__ import annotations

import sys
from pathlib import Path

NAME = "convert"
HELP = "convert a patch file between .safetensors (fastpatch) and .gguf (llama.cpp control vector)"
DESCRIPTION = """\
Convert by the files' extensions:

  .safetensors -> .gguf          steering-only patch sets (ungated Steer, scope 'all', one per site
                                 at layers.N.resid_post with N >= 1) become direction.N tensors;
                                 any other patch is refused with the site and the reason
  .gguf -> .safetensors          each direction.N becomes Steer(v) at layers.N.resid_post

--scale multiplies the vectors (written into the GGUF, or as the Steer scale when importing).
--model-hint sets controlvector.model_hint (default: the model type recorded in the patch file).
When writing .safetensors, --name/--version/--author/--description fill the manifest.

example:
  fastpatch convert happy.safetensors happy.gguf --model-hint llama
  llama-cli -m model.gguf --control-vector happy.gguf          # then in llama.cpp
  fastpatch convert happy.gguf happy.safetensors --scale 2 --name happy --version 1.0.0
"""


def add_arguments(p) -> None:
    p.add_argument("input", help="input file (.safetensors or .gguf)")
    p.add_argument("output", help="output file (.gguf or .safetensors)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the steering vectors by this (default 1)")
    p.add_argument("--model-hint", default=None,
                   help="controlvector.model_hint for .gguf output (default: the file's model type, else '')")
    p.add_argument("--name", default=None, help="manifest name for .safetensors output (default: output file stem)")
    p.add_argument("--version", default="0.1.0",
                   help="manifest semantic version for .safetensors output (default 0.1.0)")
    p.add_argument("--author", default=None, help="manifest author for .safetensors output")
    p.add_argument("--description", default=None, help="manifest description for .safetensors output")


def _kind(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".safetensors", ".gguf"):
        return suffix[1:]
    raise ValueError(f"{path}: unknown extension {suffix!r}; use .safetensors or .gguf")


def run(args) -> int:
    from ...files.gguf_io import export_gguf, import_gguf
    from ...files.patch_file import PatchFileError, load, read_manifest, save

    try:
        src, dst = _kind(args.input), _kind(args.output)
        if src == dst:
            raise ValueError(f"input and output are both .{src}; convert goes .safetensors <-> .gguf")
        if src == "safetensors":
            manifest, _ = read_manifest(args.input)
            mapping = load(args.input)
            hint = args.model_hint
            if hint is None:
                hint = (manifest.get("model") or {}).get("model_type") or ""
            export_gguf(mapping, args.output, model_hint=hint, scale=args.scale)
            n = sum(v is not None for v in mapping.values())
        else:
            mapping = import_gguf(args.input, scale=args.scale)
            save(mapping, args.output, name=args.name, version=args.version, author=args.author,
                 description=args.description)
            n = len(mapping)
    except (PatchFileError, ValueError, TypeError, OSError, ImportError) as exc:
        print(f"fastpatch convert: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({n} site{'s' if n != 1 else ''})")
    return 0
