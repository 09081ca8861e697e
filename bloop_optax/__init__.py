"""bloop_optax: gradient surgery with an EMA (Bloop) as optax transforms.

References:
  Hsieh, Thornton, Ndiaye, Klein, Cuturi, Ablin. "Careful with that Scalpel:
  Improving Gradient Surgery with an EMA". ICML 2024. arXiv:2402.02998.
"""

from bloop_optax import aggregators as aggregators
from bloop_optax._accumulate import MultiStepsState
from bloop_optax._accumulate import multi_steps
from bloop_optax._baselines import MixedState
from bloop_optax._baselines import SurgeryState
from bloop_optax._baselines import dynamic_barrier
from bloop_optax._baselines import mixed
from bloop_optax._baselines import pcgrad_pair
from bloop_optax._bloop import BloopState
from bloop_optax._bloop import bloop
from bloop_optax._grads import value_and_grads
from bloop_optax._hierarchical import HierarchicalBloopState
from bloop_optax._hierarchical import hierarchical_bloop
from bloop_optax._pair import MainAux
from bloop_optax._partition import PartitionState
from bloop_optax._partition import partition
from bloop_optax._pcd import PCDNorms
from bloop_optax._pcd import pcd
from bloop_optax._tree_math import tree_dot
from bloop_optax._tree_math import tree_dots

__version__ = "0.1.0"

__all__ = (
  "BloopState",
  "HierarchicalBloopState",
  "MainAux",
  "MixedState",
  "MultiStepsState",
  "PCDNorms",
  "PartitionState",
  "SurgeryState",
  "bloop",
  "dynamic_barrier",
  "hierarchical_bloop",
  "mixed",
  "multi_steps",
  "partition",
  "pcd",
  "pcgrad_pair",
  "tree_dot",
  "tree_dots",
  "value_and_grads",
)
