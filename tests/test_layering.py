"""The import map, checked on every package module by parsing it (``ast``, nothing imported).

Layers, lowest first. A module may import its own layer and any lower one; an import of a
higher layer is an upward import and fails, at module level or inside a function:

    0  medgen             (core/)        run config, atomic writes, constants
    1  medgen.privacy     (privacy/)     DP-SGD, accounting, the ledger and privacy round,
                                         releases, audits, aggregation-side DP
    2  medgen.models      (models/)      recipes and networks (DP only through privacy/)
    3  medgen.data        (data/)        datasets, manifests, readers, writers
    4  medgen.sim         (sim/)         the simulated hospitals: site folders on disk
    4  medgen.client      (client/)      the node role
    5  medgen.evaluation  (evaluation/)  metrics and reports of runs
    6  medgen.server      (server/)      the coordinator role
    7  medgen.deploy      (deploy/)      launching coordinators and nodes

Two sim/ modules are pure functions of public label maps that recipes use to augment
public data (``MODULE_LAYERS``: random contrasts, random deformations); they sit with
privacy/ at layer 1, below the recipes.

Entry points compose the product from every layer (``ENTRY_POINTS``: the Flower apps,
loaded by name by Flower, and the commands): what they import is not checked for
direction; they are judged by their package's layer when something imports them (an
in-process runner may reuse the ClientApp).

Imports sit at module top. The exceptions are few and listed with their reason in
``LAZY_IMPORTS`` (a heavy or optional module kept off a light import path); registries
load by name through ``importlib`` (models/registry.py, core/cli.py), which is not an
import statement and is how a recipe's or a command's heavy imports cost only its users.
``typing.TYPE_CHECKING`` blocks are for annotations only and are exempt from the
function-level rule (never ``if False:``).
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = {"medgen": 0, "medgen.privacy": 1, "medgen.models": 2, "medgen.data": 3, "medgen.sim": 4,
          "medgen.client": 4, "medgen.evaluation": 5, "medgen.server": 6, "medgen.deploy": 7}
MODULE_LAYERS = {"medgen.sim.random_contrast": 1, "medgen.sim.random_deformation": 1}

ENTRY_POINTS = {
    "medgen.cli",                         # `medgen ...` dispatcher
    "medgen.client.app",                  # the ClientApp (Flower loads it by name)
    "medgen.client.rounds",               # the ClientApp's rounds, cold path or warm trainer
    "medgen.client.worker",               # python -m medgen.client.worker (medgen-client starts it)
    "medgen.server.app",                  # the ServerApp
    "medgen.client.cli",                  # medgen-client
    "medgen.client.translate",            # medgen translate
    "medgen.client.restore",              # medgen restore
    "medgen.server.cli",                  # medgen-server
    "medgen.server.deploy_cli",           # medgen-server deploy ...
    "medgen.privacy.audit_cli",           # medgen audit
    "medgen.models.segmenter_pretrain",   # medgen pretrain-segmenter
    "medgen.evaluation.utility",          # python -m medgen.evaluation.utility RUN_DIR
    "medgen.sim.cli",                     # medgen sim build
    "medgen.data.cli",                    # medgen data ...
    "medgen.deploy.cli_pki",              # medgen-server pki
}

# (importing module, imported module): why it is imported inside a function
LAZY_IMPORTS = {
    ("medgen.sim.federation", "medgen.sim.dicom_export"):
        "pydicom only when a build writes DICOM sites: `import medgen.sim` stays numpy-only",
    ("medgen.evaluation.report", "medgen.evaluation.translation"):
        "torch and MONAI (8 s) only for a report that has a translation section",
    ("medgen.client.app", "medgen.client.rounds"):
        "the per-message ClientApp imports torch, MONAI and the recipes only on the cold path; "
        "on the warm path it forwards to the trainer (docs/deployment.md)",
    ("medgen.privacy.client_dp", "medgen.privacy.accounting"):
        "Opacus only to account client-level DP on the server, never in the ClientApp's clipping mod",
}

# modules owned by work still in flight elsewhere (issue 12 items 1-3, issue 13): their
# imports are being hoisted there; listed by rule so they cannot grow unnoticed
PENDING = {
    "function-level": set(),
    "upward": set(),
}


@dataclass(frozen=True)
class Import:
    module: str     # the importing module
    target: str     # the imported medgen module
    line: int
    in_function: bool
    typing_only: bool


def package_modules() -> dict[str, Path]:
    """Every module of the installed packages, from pyproject's package-dir mapping."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = config["package-dir"]
    modules = {}
    for package in config["packages"]:
        folder = ROOT / mapping[package]
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def imports_of(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(child, package):
                    if target == "medgen" or target.startswith("medgen."):
                        found.append(Import(module, target, child.lineno, in_function, typing_only))
                continue
            function = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, function, typing_only or _is_type_checking(child))

    visit(tree, False, False)
    return found


def _targets(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative import: resolve against the importing package
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
    return [base]


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def layer_of(module: str) -> int:
    """The layer of ``module``: its own entry in MODULE_LAYERS, else that of its longest
    package prefix (core is ``medgen`` itself)."""
    if module in MODULE_LAYERS:
        return MODULE_LAYERS[module]
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


MODULES = package_modules()
IMPORTS = [imp for name, path in MODULES.items() for imp in imports_of(name, path)]


def test_every_package_is_placed_in_a_layer():
    packages = {name for name, path in MODULES.items() if path.stem == "__init__"}
    top = {p for p in packages if p.count(".") <= 1}
    assert top <= set(LAYERS), f"packages without a layer: {sorted(top - set(LAYERS))}"
    listed = ENTRY_POINTS | set(MODULE_LAYERS)
    assert listed <= set(MODULES), f"listed modules that do not exist: {sorted(listed - set(MODULES))}"


def test_no_function_level_medgen_imports_outside_the_documented_list():
    hidden = [f"{i.module}:{i.line} imports {i.target} inside a function"
              for i in IMPORTS if i.in_function and not i.typing_only
              and (i.module, i.target) not in LAZY_IMPORTS
              and i.module not in PENDING["function-level"]]
    assert not hidden, "hoist these to module top, or document them in LAZY_IMPORTS:\n" + "\n".join(hidden)


def test_no_upward_imports():
    upward = [f"{i.module}:{i.line} (layer {layer_of(i.module)}) imports {i.target} "
              f"(layer {layer_of(i.target)})"
              for i in IMPORTS if i.module not in ENTRY_POINTS and i.module not in PENDING["upward"]
              and i.target not in ENTRY_POINTS and layer_of(i.target) > layer_of(i.module)]
    assert not upward, "upward imports (see the layer order in this file's docstring):\n" + "\n".join(upward)


NO_CLIENT = ("medgen.server", "medgen.evaluation", "medgen.models")


def test_server_evaluation_and_models_never_import_the_client():
    """The node role is a leaf: data comes from medgen.data, the in-process runner gets its
    sites passed in (client/simulated_site.py). Entry points and functions included."""
    offenders = [f"{i.module}:{i.line} imports {i.target}" for i in IMPORTS
                 if i.module.startswith(NO_CLIENT) and not i.typing_only
                 and (i.target == "medgen.client" or i.target.startswith("medgen.client."))]
    by_name = [f"{name} names medgen.client.* for importlib" for name, path in MODULES.items()
               if name.startswith(NO_CLIENT) and "\"medgen.client." in path.read_text(encoding="utf-8")]
    assert not offenders + by_name, "import data from medgen.data, not the client:\n" + \
        "\n".join(offenders + by_name)


def test_no_if_false_blocks_for_typing():
    offenders = [f"{name}:{node.lineno}" for name, path in MODULES.items()
                 for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, ast.If) and isinstance(node.test, ast.Constant) and node.test.value is False]
    assert not offenders, "use `if TYPE_CHECKING:` for typing-only imports: " + ", ".join(offenders)


def test_documented_exceptions_are_still_needed():
    """A lazy import that was hoisted, or a pending module that now passes, leaves the lists."""
    present = {(i.module, i.target) for i in IMPORTS if i.in_function}
    assert set(LAZY_IMPORTS) <= present, f"no longer lazy: {sorted(set(LAZY_IMPORTS) - present)}"
    still = {i.module for i in IMPORTS if i.in_function and not i.typing_only}
    assert PENDING["function-level"] <= still, sorted(PENDING["function-level"] - still)
    up = {i.module for i in IMPORTS if layer_of(i.target) > layer_of(i.module)}
    assert PENDING["upward"] <= up, sorted(PENDING["upward"] - up)


@pytest.mark.parametrize("module,expected", [("medgen.config", 0), ("medgen.privacy.round", 1),
                                             ("medgen.models.recipe", 2), ("medgen.client.app", 4),
                                             ("medgen.sim.federation", 4), ("medgen.sim.random_contrast", 1)])
def test_layer_lookup(module, expected):
    assert layer_of(module) == expected
