"""Every repository path and every dotted name of the package that a comment, a docstring or a document
quotes exists (issue 20): a layout change that leaves the old path of the float64 reference in a kernel's
header sends the next reader to a file that is gone.

Scanned: comments and docstrings of the .py / .h / .cpp / .cu / .cuh files under the repository (not
string literals that are data: error messages are checked by the tests that raise them), and the whole text
of README.md and docs/*.md.

- A path is a run of path characters starting with a top-level folder (``fastpatch/``, ``csrc/``, ``docs/``,
  ``benchmarks/``, ``scripts/``, ``tests/``) and not preceded by a path character (so URLs and relative
  tails like ``backends/cuda.py`` are not paths). It must exist on disk; a ``*`` glob must match something.
- A dotted name is the package name followed by dot-identifier parts, not followed by ``-`` or ``/`` (a
  file name such as an egg-info folder); it must be an importable module or an attribute reached from
  one by getattr (a ``*`` tail: some attribute with that prefix).
- Templated names (``<name>``, ``{x}``) stand for no one file and are skipped; ALLOWED lists the few
  intentionally hypothetical names, each with its reason.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("fastpatch", "csrc", "docs", "benchmarks", "scripts", "tests")
SOURCE_SUFFIXES = {".py", ".h", ".cpp", ".cu", ".cuh"}
SKIP_DIRS = {"__pycache__", "build", "dist", "node_modules", "results"}

# Paths: a top-level folder, then path characters; the lookbehind keeps URLs and relative tails out.
PATH_RE = re.compile(r"(?<![\w./\\-])(?:%s)/[\w./*<>{}-]*[\w*>}/]" % "|".join(TOP))
# Dotted names: the package, then dot-identifier parts taken whole (possessive: a name followed by "-" or
# "/" is a file name, not a shorter dotted name), not inside a longer dotted name or a path.
NAME_RE = re.compile(r"(?<![\w./\\-])fastpatch(?:\.[A-Za-z_]\w*)++(?![-/])\*?")
TEMPLATED = re.compile(r"[<>{}]")

# Intentionally hypothetical or produced-at-run-time names: (kind, name) -> why it may not exist.
ALLOWED = {
    ("name", "fastpatch.format"): "a safetensors metadata key of patch files, not a Python name",
    ("name", "fastpatch.format_version"): "a safetensors metadata key of patch files, not a Python name",
    ("name", "fastpatch.manifest"): "a safetensors metadata key of patch files, not a Python name",
    ("path", "fastpatch/_csrc"): "setup.py copies csrc/ there when it builds a wheel",
    ("path", "benchmarks/results/bench_gpu.json"): "the output file of the GPU benchmark command it documents",
    ("path", "benchmarks/results/vllm_cpu"): "the output folder of the vLLM benchmark command it documents",
}


def _source_files():
    for top in TOP:
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix in SOURCE_SUFFIXES and not SKIP_DIRS.intersection(path.relative_to(ROOT).parts):
                yield path
    yield from sorted(p for p in ROOT.glob("*.py"))


def _python_prose(text: str):
    """(line, text) of every comment and docstring (module, class, function, and bare string statements)."""
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT:
                yield tok.start[0], tok.string
    except (tokenize.TokenError, SyntaxError):
        pass
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            yield node.lineno, node.value.value


_C_COMMENT = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"', re.S)


def _c_prose(text: str):
    """(line, text) of every // and /* */ comment; string literals are matched so that a ``//`` inside
    one is not taken for a comment, then dropped."""
    for m in _C_COMMENT.finditer(text):
        if not m.group().startswith('"'):
            yield text.count("\n", 0, m.start()) + 1, m.group()


def _prose():
    """(file, line, text) of everything scanned."""
    for path in _source_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(ROOT).as_posix()
        chunks = _python_prose(text) if path.suffix == ".py" else _c_prose(text)
        for line, chunk in chunks:
            yield rel, line, chunk
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if path.exists():
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                yield path.relative_to(ROOT).as_posix(), i, line


def _located(text: str):
    """(offset, kind, name) of every path and dotted name quoted in ``text``; templated ones left out."""
    for m in PATH_RE.finditer(text):
        name = m.group().rstrip(".")
        if not TEMPLATED.search(name):
            yield m.start(), "path", name
    for m in NAME_RE.finditer(text):
        if not TEMPLATED.match(text[m.end():m.end() + 1]) and not text.startswith(".<", m.end()):
            yield m.start(), "name", m.group()


def references(text: str):
    """(kind, name) of every path and dotted name quoted in ``text``; templated ones left out."""
    return [(kind, name) for _, kind, name in _located(text)]


def path_exists(name: str) -> bool:
    if "*" in name:
        return any(ROOT.glob(name))
    if (ROOT / name).exists():
        return True
    # "tests/models.tiny_model": a module's file written without .py, then one of its top-level names
    stem, _, attr = name.rpartition(".")
    module = ROOT / f"{stem}.py"
    return bool(stem) and attr.isidentifier() and module.is_file() and attr in _names_in(module)


def _module_file_exists(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _top_level_names(module: str) -> set:
    """Names a module defines at top level, read from its source (for modules whose optional
    dependency, e.g. triton, is not installed here)."""
    base = ROOT.joinpath(*module.split("."))
    return _names_in(base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py")


def _has_instance_attribute(cls, attr: str) -> bool:
    """Whether ``cls`` (or a base) gives its instances ``attr``: annotated, or assigned as ``self.attr``
    in its source. getattr on the class cannot see what __init__ sets."""
    for klass in cls.__mro__:
        if attr in getattr(klass, "__annotations__", {}):
            return True
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if re.search(rf"\bself\.{re.escape(attr)}\s*(?::[^=\n]*)?=(?!=)", source):
            return True
    return False


def _names_in(path: Path) -> set:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def name_exists(name: str) -> bool:
    glob = name.endswith("*")
    parts = name.rstrip("*").split(".")
    if glob:
        prefix = parts.pop()
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        if not _module_file_exists(module):
            continue
        rest = parts[i:]
        try:
            obj = importlib.import_module(module)
        except ImportError as exc:  # an optional dependency missing here: read the source instead
            if (exc.name or "").split(".")[0] == "fastpatch":
                raise
            defined = _top_level_names(module)
            if glob and not rest:
                return any(n.startswith(prefix) for n in defined)
            return bool(rest) and rest[0] in defined
        for j, attr in enumerate(rest):
            if not hasattr(obj, attr):
                # an instance attribute, last in the name (PatchBank.down): what __init__ assigns
                return j == len(rest) - 1 and inspect.isclass(obj) and _has_instance_attribute(obj, attr)
            obj = getattr(obj, attr)
        return any(a.startswith(prefix) for a in dir(obj)) if glob else True
    return False


def _stale():
    seen = {}
    for rel, line, text in _prose():
        for offset, kind, name in _located(text):
            seen.setdefault((kind, name), []).append(f"{rel}:{line + text.count(chr(10), 0, offset)}")
    bad = []
    for (kind, name), where in sorted(seen.items()):
        if (kind, name) in ALLOWED:
            continue
        ok = path_exists(name) if kind == "path" else name_exists(name)
        if not ok:
            bad.append(f"{kind} {name}  (quoted at {', '.join(where[:4])}{' ...' if len(where) > 4 else ''})")
    return seen, bad


def test_quoted_paths_and_names_exist():
    seen, bad = _stale()
    # the scan sees what it should (a broken regex finding nothing would pass vacuously)
    assert ("path", "fastpatch/kernels/backends/selftest.py") in seen
    assert ("name", "fastpatch.core.reference") in seen
    assert not bad, ("comments, docstrings or docs quote paths or names that do not exist; fix the quote "
                     "(or, for an intentionally hypothetical name, add it to ALLOWED with the reason):\n  "
                     + "\n  ".join(bad))


def test_allowlist_entries_are_still_needed():
    """An ALLOWED entry whose name now exists, or that nothing quotes any more, is dead weight."""
    seen, _ = _stale()
    for kind, name in ALLOWED:
        assert (kind, name) in seen, f"ALLOWED {kind} {name!r} is quoted nowhere: remove it"
        exists = path_exists(name) if kind == "path" else name_exists(name)
        assert not exists, f"ALLOWED {kind} {name!r} exists now: remove it from ALLOWED"


@pytest.mark.parametrize("text,expected", [
    ("// Semantics: fastpatch/reference.py; keep in step.", [("path", "fastpatch/reference.py")]),
    ("see fastpatch.kernels.ops.check_inputs.", [("name", "fastpatch.kernels.ops.check_inputs")]),
    ("Mirrors fastpatch.core.patches.GATE_*.", [("name", "fastpatch.core.patches.GATE_*")]),
    ("a module in `fastpatch/kernels/backends/<name>.py`", []),  # templated
    ("kernels.backends.<b>.run and fastpatch.kernels.backends.<b>.run", []),
    ("https://github.com/o/fastpatch/tests/x.py and ../fastpatch/core", []),  # URL, relative
    ("the fastpatch package, tests/ and csrc", []),  # prose: a bare folder word is no path
    ("an old `fastpatch.egg-info` folder; fastpatch.app/", []),  # file names, not dotted names
    ('key "fastpatch.format" (see fastpatch.files.patch_file).', [("name", "fastpatch.format"),
                                                                 ("name", "fastpatch.files.patch_file")]),
    ("[docs/surgery.md](docs/surgery.md#training), csrc/cpu/.", [("path", "docs/surgery.md")] * 2
     + [("path", "csrc/cpu/")]),
])
def test_extraction(text, expected):
    assert list(references(text)) == expected


def test_an_injected_stale_path_and_name_are_caught():
    assert not path_exists("fastpatch/surgery/fused.py") and path_exists("csrc/patch_math.h")
    assert path_exists("csrc/cuda/*.cu") and not path_exists("fastpatch/backends/*.py")
    assert not name_exists("fastpatch.ops.check_inputs") and name_exists("fastpatch.kernels.ops.check_inputs")
    assert not name_exists("fastpatch.patches.GATE_*") and name_exists("fastpatch.core.patches.GATE_*")
    assert name_exists("fastpatch.fused_add_norm") and not name_exists("fastpatch.fused_add_norm.nothing")
    # module-file-plus-name paths and instance attributes count; misspelt ones do not
    assert path_exists("tests/models.tiny_model") and not path_exists("tests/models.no_such_model")
    assert name_exists("fastpatch.core.bank.PatchBank.down") and not name_exists("fastpatch.core.bank.PatchBank.dwn")
