"""No module outside the brain simulator hard-codes the brain's label classes (issue 14).

The schema (class names, hence the count) comes from a dataset's manifest and flows through
the run config (``label-names``). Checked by parsing every package module (``ast``, nothing
imported) for:
  - a tuple/list/set literal of strings that holds "csf", "gm" and "wm" and at most one
    more (the brain's 4 classes; the head's 7-class schema names them too, and is its own);
  - a string literal that spells them comma-separated ("background,csf,gm,wm");
  - the name ``TISSUE_CLASSES`` or ``NUM_CLASSES``/``NUM_TISSUES`` (a module-level class
    count), assigned or read anywhere;
  - ``len(<something with a brain-class name>)`` or a literal 4 assigned to a name that
    says it is a class count (``num_classes = 4``, ``N_TISSUES = 4``).
Allowed: the brain simulator (sim/, except the head federation's modules, which carry
their own 7-class schema and are checked like everything else) and the few places below
that own the brain default by design, each with its reason.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BRAIN = {"csf", "gm", "wm"}
COUNT_NAME = re.compile(r"^(num|n)_?(classes|tissues|labels)$|^(NUM|N)_(CLASSES|TISSUES|LABELS)$", re.I)
BANNED_NAMES = {"TISSUE_CLASSES", "NUM_CLASSES", "NUM_TISSUES"}

# (relative path): why it may name the brain's classes
ALLOWED = {
    "core/config.py": "the run config's default label-names is the embedded brain federation's schema",
    "data/manifest.py": "DatasetManifest.default_brain(): data from before manifests is the brain default",
}
# the brain simulator: renders the embedded MNI brain federation (DATA.md)
SIMULATOR = "sim/"
HEAD_MODULES = ("sim/head_",)  # the head federation: its own schema, checked like the rest


def _package_dirs() -> list[Path]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = pyproject["tool"]["setuptools"]["package-dir"]
    return sorted({ROOT / folder for folder in mapping.values()})


def _modules() -> list[Path]:
    files = []
    for folder in _package_dirs():
        files += [p for p in folder.rglob("*.py") if "flowerapp" not in p.parts]
    return sorted(set(files))


def _strings(node: ast.AST) -> list[str]:
    return [e.value.lower() for e in getattr(node, "elts", []) if isinstance(e, ast.Constant)
            and isinstance(e.value, str)]


def brain_constants(source: str) -> list[tuple[int, str]]:
    """(line, what) for every hard-coded brain class list or class count in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = set(_strings(node))
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and BRAIN <= names and len(names) <= 4:
            found.append((node.lineno, "a literal holding the brain classes csf, gm, wm"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            parts = {p.strip().lower() for p in node.value.split(",")}
            if "," in node.value and BRAIN <= parts and len(parts) <= 4:
                found.append((node.lineno, f"the brain classes spelled as {node.value!r}"))
        elif isinstance(node, ast.Name) and node.id in BANNED_NAMES:
            found.append((node.lineno, f"the brain class constant {node.id}"))
        elif isinstance(node, ast.Attribute) and node.attr in BANNED_NAMES:
            found.append((node.lineno, f"the brain class constant .{node.attr}"))
        elif isinstance(node, ast.alias) and node.name in BANNED_NAMES:
            found.append((getattr(node, "lineno", 0), f"an import of {node.name}"))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            value = node.value
            if any(COUNT_NAME.match(n) for n in names) and isinstance(value, ast.Constant) \
                    and value.value == 4:
                found.append((node.lineno, f"a literal 4-class count ({', '.join(names)} = 4)"))
        elif isinstance(node, ast.arg) and COUNT_NAME.match(node.arg):
            pass  # a parameter named num_classes is how the schema is passed: fine
    return found


def _allowed(rel: str) -> bool:
    if rel in ALLOWED:
        return True
    return rel.startswith(SIMULATOR) and not rel.startswith(HEAD_MODULES)


def test_no_module_outside_the_brain_simulator_hard_codes_the_brain_classes():
    offenders = []
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        if _allowed(rel):
            continue
        offenders += [f"{rel}:{line}: {what}" for line, what in brain_constants(path.read_text())]
    assert not offenders, ("the label schema must come from the manifest / run config "
                           "(label-names), not from a constant:\n" + "\n".join(offenders))


def test_num_classes_default_parameters_are_not_the_brain_count():
    """A defaulted ``num_classes: int = 4`` parameter is a hidden brain constant too."""
    offenders = []
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        if _allowed(rel):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args[len(node.args.args) - len(node.args.defaults):]
                pairs = list(zip(args, node.args.defaults)) + [
                    (a, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
                for arg, default in pairs:
                    if COUNT_NAME.match(arg.arg) and isinstance(default, ast.Constant) and default.value == 4:
                        offenders.append(f"{rel}:{node.lineno}: {node.name}({arg.arg}=4)")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("source,hit", [
    ('CLASSES = ("background", "csf", "gm", "wm")', True),
    ('names = ["CSF", "GM", "WM"]', True),
    ('DEFAULT = "background,csf,gm,wm"', True),
    ("from medgen import TISSUE_CLASSES", True),
    ("NUM_CLASSES = 4", True),
    ("num_classes = 4", True),
    ('HEAD = ("air", "bone")', False),
    ('HEAD = ("air", "soft_tissue", "fat", "bone", "csf", "gm", "wm")', False),
    ("def f(num_classes: int): return num_classes", False),
    ('msg = "csf"', False),
])
def test_the_checker_finds_what_it_should(source, hit):
    assert bool(brain_constants(source)) is hit
