r"""Multi-objective gradient aggregators, computed from the Gram matrix.

For K objectives of equal standing, each transform here takes the tuple of the
K gradients (what :func:`bloop_optax.value_and_grads` returns for K losses)
and returns one direction :math:`d = \sum_i w_i g_i` shaped like a gradient, so any
optax transform can follow it in ``optax.chain``. The weights come from the
K x K Gram matrix of global inner products: per-leaf reductions summed, only
scalars cross devices, the K x P Jacobian is never formed. For more than four
objectives (or past 4,096 per-leaf reductions) the Gram matrix is one
full-precision product of the K stacked copies of each leaf: it compiles in
seconds at K = 64, stores the stacked leaves (a temporary as large as the K
gradients) and all-reduces the K x K matrix across devices. On a single CPU
device a large leaf is stacked and multiplied one cache-sized block at a time
instead (no temporary beyond the block).
:func:`on_shared` restricts an aggregator to the shared parameters of a
multi-task model (a trunk), every task head getting its own task's gradient.

Every aggregator but :func:`mean`, :func:`random` and :func:`constant` takes
``ema_decay``: ``None`` (the method as published) or the weight on the old
average of EMAs of the K gradients, from whose Gram matrix the weights are then
decided, as Bloop projects on an EMA of the main gradient (:func:`moco` needs
it: its tracked gradients are these EMAs). :func:`cr_mogm` wraps any of them and
smooths the weights instead. The small problems (MGDA's and UPGrad's quadratic
programs, CAGrad's inner problem) are solved exactly inside ``jit`` by an
active-set method with a fixed budget of ``4 K + 8`` iterations, each solving a
KKT system exactly through a pseudo-inverse (eigenvalues below ``(K + 1) eps``
of the largest count as zero); from ``K = 16`` on, from the inverse of the free
block instead, updated as one index enters or leaves, where the block's
smallest eigenvalue is safely above that cutoff; optimality is tested to
``64 K eps`` of the problem's scale; Nash-MTL's and FairGrad's equations by at
most 40 damped Newton steps on an equivalent strictly convex problem, stopping
once a step moves no weight by more than rounding. No host round trip;
deterministic.

References:
  Hsieh, Thornton, Ndiaye, Klein, Cuturi, Ablin. "Careful with that Scalpel:
  Improving Gradient Surgery with an EMA". ICML 2024. arXiv:2402.02998.
"""

from bloop_optax._pcd import pcd_weights
from bloop_optax.aggregators._base import AggregatorState
from bloop_optax.aggregators._dual_cone import dualproj
from bloop_optax.aggregators._dual_cone import dualproj_weights
from bloop_optax.aggregators._dual_cone import upgrad
from bloop_optax.aggregators._dual_cone import upgrad_weights
from bloop_optax.aggregators._equalizing import aligned_mtl
from bloop_optax.aggregators._equalizing import aligned_mtl_weights
from bloop_optax.aggregators._equalizing import config
from bloop_optax.aggregators._equalizing import config_weights
from bloop_optax.aggregators._equalizing import db_mtl
from bloop_optax.aggregators._equalizing import db_mtl_weights
from bloop_optax.aggregators._equalizing import imtl_g
from bloop_optax.aggregators._equalizing import imtl_g_weights
from bloop_optax.aggregators._fairness import fairgrad
from bloop_optax.aggregators._fairness import fairgrad_weights
from bloop_optax.aggregators._fairness import nash_mtl
from bloop_optax.aggregators._fairness import nash_mtl_weights
from bloop_optax.aggregators._min_norm import cagrad
from bloop_optax.aggregators._min_norm import cagrad_weights
from bloop_optax.aggregators._min_norm import mgda
from bloop_optax.aggregators._min_norm import mgda_weights
from bloop_optax.aggregators._robust import krum
from bloop_optax.aggregators._robust import krum_weights
from bloop_optax.aggregators._sequential import gradvac
from bloop_optax.aggregators._sequential import gradvac_weights
from bloop_optax.aggregators._sequential import pcgrad
from bloop_optax.aggregators._sequential import pcgrad_weights
from bloop_optax.aggregators._shared import SharedParamsState
from bloop_optax.aggregators._shared import on_shared
from bloop_optax.aggregators._simple import constant
from bloop_optax.aggregators._simple import constant_weights
from bloop_optax.aggregators._simple import mean
from bloop_optax.aggregators._simple import mean_weights
from bloop_optax.aggregators._simple import random
from bloop_optax.aggregators._simple import random_weights
from bloop_optax.aggregators._smoothing import SmoothedWeightsState
from bloop_optax.aggregators._smoothing import cr_mogm
from bloop_optax.aggregators._smoothing import moco
from bloop_optax.aggregators._smoothing import moco_weights

__all__ = (
  "AggregatorState",
  "SharedParamsState",
  "SmoothedWeightsState",
  "aligned_mtl",
  "aligned_mtl_weights",
  "cagrad",
  "cagrad_weights",
  "config",
  "config_weights",
  "constant",
  "constant_weights",
  "cr_mogm",
  "db_mtl",
  "db_mtl_weights",
  "dualproj",
  "dualproj_weights",
  "fairgrad",
  "fairgrad_weights",
  "gradvac",
  "gradvac_weights",
  "imtl_g",
  "imtl_g_weights",
  "krum",
  "krum_weights",
  "mean",
  "mean_weights",
  "mgda",
  "mgda_weights",
  "moco",
  "moco_weights",
  "nash_mtl",
  "nash_mtl_weights",
  "on_shared",
  "pcd_weights",
  "pcgrad",
  "pcgrad_weights",
  "random",
  "random_weights",
  "upgrad",
  "upgrad_weights",
)
