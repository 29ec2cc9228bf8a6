"""medgen: federated, differentially private training of medical image generators.

The top package is mapped from ``core/`` (not ``medgen/``) on purpose: Flower puts the
app folder first on ``sys.path``, and a folder named ``medgen/`` would shadow the
installed package in every ClientApp (see docs/architecture.md).
"""

__version__ = "0.1.0"

TISSUE_CLASSES: tuple[str, ...] = ("background", "csf", "gm", "wm")
"""Label values in every tissue map medgen reads or writes: index = label value."""
