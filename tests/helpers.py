"""Helpers the test modules share: random gradient pytrees, flattening, a jitted
scan over steps, tolerance checks, float64 blocks, code blocks of a Markdown page."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from bloop_optax import MainAux

STEPS = 60


SHAPES = {"scalar": (), "vec": (7,), "cube": (2, 3, 4), "nested": [(5, 1), (3,)]}


def enable_x64():
  """float64 within a block: ``jax.enable_x64`` (new) or its experimental form (jax < 0.6)."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64 as experimental

  return experimental(True)


def random_tree(rng, dtype=jnp.float32, scale=1.0):
  return jax.tree.map(
    lambda shape: jnp.asarray(scale * rng.standard_normal(shape), dtype),
    SHAPES,
    is_leaf=lambda x: isinstance(x, tuple),
  )


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def unflat(vector, like):
  leaves, treedef = jax.tree.flatten(like)
  out, start = [], 0
  for leaf in leaves:
    size = int(np.prod(leaf.shape))
    out.append(np.reshape(vector[start : start + size], leaf.shape))
    start += size
  return jax.tree.unflatten(treedef, out)


def gradient_sequence(seed, steps=STEPS, dtype=jnp.float32):
  """Main gradients around a drifting mean; aux gradients that often conflict.

  Odd steps draw ``A = -2 M + noise`` (strong conflict), even steps draw an
  independent A, so both signs of <M, A> and both DB branches occur.
  """
  rng = np.random.default_rng(seed)
  mean = random_tree(rng)
  mains, auxs = [], []
  for t in range(steps):
    m = jax.tree.map(lambda mu, n: mu + 0.5 * n, mean, random_tree(rng))
    if t % 2:
      a = jax.tree.map(lambda x, n: -2.0 * x + 0.3 * n, m, random_tree(rng))
    else:
      a = random_tree(rng)
    mains.append(jax.tree.map(lambda x: x.astype(dtype), m))
    auxs.append(jax.tree.map(lambda x: x.astype(dtype), a))
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  return stack(mains), stack(auxs)


def run(tx, mains, auxs, params):
  """Runs ``tx.update`` over stacked (main, aux) steps under jit + lax.scan."""

  @jax.jit
  def scan(state, xs):
    def step(state, pair):
      direction, state = tx.update(MainAux(*pair), state, params)
      return state, (direction, state)

    return jax.lax.scan(step, state, xs)

  _, (directions, states) = scan(tx.init(params), (mains, auxs))
  return directions, states


def steps_of(stacked):
  """Flat float64 vectors, one per step, from a stacked pytree."""
  n = jax.tree.leaves(stacked)[0].shape[0]
  return [flat(jax.tree.map(lambda x, i=i: x[i], stacked)) for i in range(n)]


def zeros_params(dtype=jnp.float32):
  return jax.tree.map(lambda x: jnp.zeros_like(x, dtype), random_tree(np.random.default_rng(0)))


def assert_close(actual, desired, rtol=2e-5, atol=2e-5):
  np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=rtol, atol=atol)


def numbers(x):
  x = jnp.asarray(x)
  return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  a_leaves, b_leaves = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert a_leaves
  for x, y in zip(a_leaves, b_leaves, strict=True):
    np.testing.assert_allclose(numbers(x), numbers(y), rtol=rtol, atol=atol)


def data(n=32):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, 5)), jnp.float32)
  return x, x @ jnp.arange(1.0, 6.0)


def blocks(text, language):
  return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)
