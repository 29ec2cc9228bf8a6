"""The simulated federation: real MNI anatomy rendered by simulated scanners (DATA.md).

Importing this package is light (numpy only); torch, MONAI and nibabel load on first use.
"""

from medgen.sim.brain_box import brain_box
from medgen.sim.config import SimConfig, SimConfigError
from medgen.sim.federation import FederationExistsError, Manifest, build_federation

__all__ = ["SimConfig", "SimConfigError", "Manifest", "FederationExistsError",
           "build_federation", "brain_box"]
