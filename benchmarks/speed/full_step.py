"""Table 2: a whole training step (loss, gradients, optimizer, parameter update)
with Bloop and PCD against the Mixed step, on four models."""

from benchmarks.speed import _common as common


def _mlp_task(batch=256, width=1024, two_heads=False):
  """A 3-layer MLP with dropout on synthetic data.

  ``two_heads=False``: aux = 0.5 |theta|^2 (a regulariser). ``two_heads=True``:
  a second head on the same trunk and batch, aux = its cross-entropy on a
  second label set (multi-task; both losses need the dropout forward pass).
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
      for _ in range(2):
        x = nn.Dropout(0.1, deterministic=not train)(nn.relu(nn.Dense(width)(x)))
      return nn.Dense(10)(x), nn.Dense(10)(x)

  model = MLP()
  x = jax.random.normal(jax.random.key(0), (batch, 256))
  y = jax.random.randint(jax.random.key(1), (batch, 2), 0, 10)
  params = model.init(jax.random.key(2), x, train=False)["params"]
  if not two_heads:
    params = {k: v for k, v in params.items() if k != "Dense_3"}

  def ce(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  def losses(params, key):
    full = params if two_heads else {**params, "Dense_3": frozen_head}
    main_logits, aux_logits = model.apply({"params": full}, x, rngs={"dropout": key})
    if two_heads:
      return ce(main_logits, y[:, 0]), ce(aux_logits, y[:, 1])
    return ce(main_logits, y[:, 0]), 0.5 * sum(jnp.sum(p**2) for p in jax.tree.leaves(params))

  frozen_head = model.init(jax.random.key(2), x, train=False)["params"]["Dense_3"]
  return params, losses


def _transformer_task(batch=16):
  """The text task's byte transformer (width 128) on random bytes."""
  import jax
  import jax.numpy as jnp
  import optax

  from benchmarks import text

  model = text.ByteTransformer(width=128, heads=4, layers=2)
  tokens = jax.random.randint(jax.random.key(0), (batch, text.CONTEXT + 1), 0, 256)
  aux_tokens = jax.random.randint(jax.random.key(1), (batch, text.CONTEXT + 1), 0, 256)
  params = model.init(jax.random.key(2), tokens[:, :-1])["params"]

  def ce(params, w):
    logits = model.apply({"params": params}, w[:, :-1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]))

  def losses(params, key):
    del key
    return ce(params, tokens), ce(params, aux_tokens)

  return params, losses


def _digits_task(batch=256):
  """The ``digits`` experiment's network and losses on a batch of 256 digits.

  MLP 64-256-128-10; main = cross-entropy, aux = the log of the product of the
  layers' spectral norms by one power iteration (from fixed start vectors).
  """
  import jax
  import jax.numpy as jnp

  from benchmarks import tasks

  x, y, _, _ = tasks.digits_split()
  sizes = (64, 256, 128, 10)
  params = tasks._dense_init(jax.random.key(0), sizes)
  vs = [jax.random.normal(jax.random.key(i), (b,)) for i, b in enumerate(sizes[1:])]
  vs = [v / jnp.linalg.norm(v) for v in vs]

  def losses(params, key):
    idx = jax.random.choice(key, len(x), (batch,), replace=False)
    main = tasks._cross_entropy(tasks._mlp(params, x[idx]), y[idx])
    sigmas = [tasks.spectral_norm(p["w"], v, 1)[0] for p, v in zip(params, vs, strict=True)]
    aux = sum(jnp.log(s) for s in sigmas)
    return main, aux

  return params, losses


FULL_STEP_BASELINE = "mixed: jax.grad(main + lam aux) + adam"


def _full_step_for(model_name, params, losses, rounds, inner):
  import jax
  import optax

  import bloop_optax

  count = sum(x.size for x in jax.tree.leaves(params))
  lam = 0.1
  bloop_tx = optax.chain(bloop_optax.bloop(lam, ema_decay=0.99), optax.adam(1e-3))
  pcd_tx = optax.chain(bloop_optax.pcd(0.02), optax.adam(1e-3))
  naive_tx = optax.chain(common.naive_bloop(lam, 0.99), optax.adam(1e-3))
  adam = optax.adam(1e-3)

  # Each variant: the direction its optimizer takes from (params, PRNG key),
  # then the same update, apply and key split.
  def bloop_direction(p, sub):
    return bloop_optax.value_and_grads(losses)(p, sub)[1]

  def two_grads(p, sub):
    return tuple(jax.grad(lambda p, i=i: losses(p, sub)[i])(p) for i in (0, 1))

  def mixed_grad(p, sub):
    def total(p):
      main, aux = losses(p, sub)
      return main + lam * aux

    return jax.grad(total)(p)

  def main_grad(p, sub):
    return jax.grad(lambda p: losses(p, sub)[0])(p)

  def variant(tx, gradients):
    def step(carry):
      p, s, key = carry
      key, sub = jax.random.split(key)
      u, s = tx.update(gradients(p, sub), s, p)
      return optax.apply_updates(p, u), s, key

    def start():
      return jax.tree.map(lambda x: x.copy(), params), tx.init(params), jax.random.key(0)

    return start, jax.jit(step, donate_argnums=0)

  fns = {
    FULL_STEP_BASELINE: variant(adam, mixed_grad),
    "bloop: value_and_grads + bloop + adam": variant(bloop_tx, bloop_direction),
    "pcd: value_and_grads + pcd + adam": variant(pcd_tx, bloop_direction),
    "2x jax.grad + plain formula + adam": variant(naive_tx, two_grads),
    "main loss only: jax.grad + adam": variant(adam, main_grad),
  }
  times = common.time_interleaved(fns, rounds, inner)
  base = times[FULL_STEP_BASELINE]
  return [
    {
      "model": model_name,
      "params": count,
      "variant": name,
      "seconds": t,
      "ratio_to_mixed": t / base,
    }
    for name, t in times.items()
  ]


def full_step(rounds, inner):
  """Table 2: a whole training step, Bloop against Mixed and the alternatives."""
  rows = []
  for model_name, make in MODELS.items():
    params, losses = make()
    rows += _full_step_for(model_name, params, losses, rounds, inner)
  return rows


MODELS = {
  "digits_mlp_lipschitz": _digits_task,
  "mlp_dropout_l2": _mlp_task,
  "mlp_dropout_two_heads": lambda: _mlp_task(two_heads=True),
  "transformer_two_datasets": _transformer_task,
}
