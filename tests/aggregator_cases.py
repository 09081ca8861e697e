"""Weight rules, factories, reference runs and gradient sequences that the
aggregator tests share."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bloop_optax import aggregators as agg
from bloop_optax.aggregators import _catalogue
from tests import reference_mtl as ref
from tests.helpers import enable_x64
from tests.helpers import random_tree

# name -> (weights rule on a Gram matrix, reference on J); PCGrad takes orders.
RULES = {
  "mean": (agg.mean_weights, ref.mean),
  "mgda": (agg.mgda_weights, ref.mgda),
  "imtl_g": (agg.imtl_g_weights, ref.imtl_g),
  "aligned_mtl": (agg.aligned_mtl_weights, ref.aligned_mtl),
  "upgrad": (agg.upgrad_weights, ref.upgrad),
  "cagrad": (lambda g: agg.cagrad_weights(g, c=0.5), lambda j: ref.cagrad(j, 0.5)),
  "dualproj": (agg.dualproj_weights, ref.dualproj),
  "config": (agg.config_weights, ref.config),
  "db_mtl": (agg.db_mtl_weights, ref.db_mtl),
  "nash_mtl": (lambda g: agg.nash_mtl_weights(g, max_norm=None), ref.nash_mtl),
  "fairgrad": (lambda g: agg.fairgrad_weights(g, 2.0), lambda j: ref.fairgrad(j, 2.0)),
}


# name -> factory(K, **options) of the rules above and PCGrad (Nash-MTL uncapped, as
# its reference).
FACTORIES = {
  e.name: (functools.partial(e.make, max_norm=None) if e.name == "nash_mtl" else e.make)
  for e in _catalogue.ENTRIES
  if e.name != "mean" and (e.name in RULES or e.name == "pcgrad")
}


def random_jacobians(seed, count=12):
  """Random K x P Jacobians, K = 1..5, P = 3 or 8 (so some K > P), rows of
  very different norms, some with conflicting and some with repeated rows."""
  rng = np.random.default_rng(seed)
  out = []
  for trial in range(count):
    k = 1 + trial % 5
    p = 8 if trial % 3 else 3
    jac = rng.standard_normal((k, p)) * rng.uniform(0.1, 10, size=(k, 1))
    if trial % 4 == 1 and k > 1:
      jac[1] = -0.3 * jac[0] + 0.5 * rng.standard_normal(p)  # strong conflict
    out.append(jac)
  return out


def direction_error(weights, jac, want):
  return np.abs(np.asarray(weights, np.float64) @ jac - want).max() / np.abs(jac).max()


@jax.jit
def _pcgrad_in_order(gram):
  k = gram.shape[0]
  return agg.pcgrad_weights(gram, jnp.tile(jnp.arange(k), (k, 1)))


JITTED = {name: jax.jit(rule) for name, (rule, _) in RULES.items()} | {
  "pcgrad": _pcgrad_in_order,
  "cagrad_c": jax.jit(lambda gram, c: agg.cagrad_weights(gram, c=c)),
}


def run_rule(name, jac, c=0.5):
  """The direction of a rule on J in float64 (PCGrad in the order 0..K-1)."""
  with enable_x64():
    gram = jnp.asarray(jac @ jac.T)
    if name == "cagrad":
      return np.asarray(JITTED["cagrad_c"](gram, c)) @ jac
    return np.asarray(JITTED[name](gram)) @ jac


G = np.array([3.0, -1.0, 2.0])


ALL = ["mean", "mgda", "pcgrad", "cagrad", "imtl_g", "aligned_mtl", "upgrad", "dualproj", "config"]


def sequence(seed, k, steps):
  """K gradient sequences around fixed means (objectives that conflict), noisy."""
  rng = np.random.default_rng(seed)
  means = [random_tree(rng) for _ in range(k)]
  means[1] = jax.tree.map(lambda a, b: -0.6 * a + 0.4 * b, means[0], means[1])
  return [
    tuple(jax.tree.map(lambda m, n: m + 0.8 * n, mu, random_tree(rng)) for mu in means)
    for _ in range(steps)
  ]
