"""medgen: federated, differentially private training of medical image generators.

The top package is mapped from ``core/`` (not ``medgen/``) on purpose: Flower puts the
app folder first on ``sys.path``, and a folder named ``medgen/`` would shadow the
installed package in every ClientApp (see docs/architecture.md).
"""

__version__ = "0.1.0"

# No label classes here: the schema (class names, hence counts) comes from a dataset's
# manifest (dataset.toml) and travels in the run config as ``label-names`` (core/config.py).
