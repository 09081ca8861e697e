"""Small linear algebra shared by the weight rules: normalising the Gram
matrix, projections onto the simplex and a dual cone, cosines, visiting
orders."""

import jax
import jax.numpy as jnp

from bloop_optax import _qp


def _normalized(gram: jax.Array) -> jax.Array:
  """``G / max_i G_ii`` (:math:`G` itself when it is zero)."""
  top = jnp.max(jnp.diag(gram))
  return gram / jnp.where(top > 0, top, 1)


def _onto_dual_cone(g: jax.Array, u: jax.Array) -> jax.Array:
  """Weights of the projection of ``J^T u`` onto the dual cone of the rows of
  ``J``: ``argmin_{v >= u} v^T G v``, i.e. ``u`` plus the nonnegative QP in
  ``x = v - u`` (quadratic ``G``, linear ``G u``); ``u`` may be a batch
  ``[B, K]`` of such problems, solved together. ``G u`` as a sum of products:
  jax 0.6 refuses a matrix product between an array on an explicit mesh and a
  constant ``u``."""
  return u + _qp.nonneg(g, jnp.sum(g * u[..., None, :], axis=-1))


def _cosines(g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The cosine matrix of the vectors whose Gram matrix is ``g``, the inverse
  norms and which vectors are nonzero (a zero vector: cosines and inverse 0)."""
  norms = jnp.sqrt(jnp.maximum(jnp.diag(g), 0))
  live = norms > 0
  inv = jnp.where(live, 1 / jnp.where(live, norms, 1), 0)
  return g * inv[:, None] * inv[None, :], inv, live


def _onto_simplex(v: jax.Array) -> jax.Array:
  """Euclidean projection onto the probability simplex (sort, then the
  threshold; no gather or scatter, which jax 0.6 cannot partition on an
  explicit mesh)."""
  k = v.shape[0]
  u = jnp.sort(v)[::-1]
  excess = jnp.cumsum(u) - 1
  index = jnp.arange(k)
  positive = u - excess / (index + 1).astype(v.dtype) > 0
  last = jnp.max(jnp.where(positive, index, 0))
  theta = jnp.sum(jnp.where(index == last, excess, 0)) / (last + 1).astype(v.dtype)
  return jnp.maximum(v - theta, 0)


def _orders(key: jax.Array, k: int) -> jax.Array:
  """``[K, K]`` visiting orders: row ``i`` a random permutation of ``0 .. K-1``."""
  return jax.vmap(lambda kk: jax.random.permutation(kk, k))(jax.random.split(key, k))
