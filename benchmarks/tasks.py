"""Small-scale versions of the paper's experiments (Hsieh et al., ICML 2024).

Every task runs on synthetic data or scikit-learn's bundled digits; nothing is
downloaded. Each follows the paper's protocol for its figure (optimiser,
learning-rate schedule, batch size, aux-weight grid, EMA rate) as far as two
CPU cores allow; what differs, and why, is recorded in each task's
``protocol`` and on its page under ``docs/benchmarks/``. Every method of a task gets the
same grid, schedule, steps and seeds.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.harness import Task
import bloop_optax

# Epochs of the digits tasks (1347 training images, batches of 256: 5 steps
# an epoch) and of the multi-task one: sized so that the default job (digits,
# 4 methods x 9 aux weights x 5 seeds) finishes in about 8 minutes on 2 cores.
DIGITS_EPOCHS = 360
MULTITASK_EPOCHS = 200


def eval_every(epochs: int, evaluations: int = 20) -> int:
  """The largest divisor of ``epochs`` that gives at least ``evaluations`` points."""
  return next(k for k in range(max(1, epochs // evaluations), 0, -1) if epochs % k == 0)


def warmup_cosine(peak: float, total_steps: int, warmup: float = 0.05) -> optax.Schedule:
  """Linear warm-up over the first ``warmup`` fraction of the steps, then cosine
  decay to 0: the paper's 5 warm-up epochs of 100, then cosine."""
  shape = optax.warmup_cosine_decay_schedule(
    0.0, 1.0, max(1, int(warmup * total_steps)), total_steps, 0.0
  )
  return lambda step: peak * shape(step)  # peak may be traced (e.g. 0.1 / (1 + λ))


def label_entropy(labels) -> float:
  """Cross-entropy of the best constant prediction: the labels' entropy (nats)."""
  counts = np.bincount(np.asarray(labels))
  freq = counts[counts > 0] / counts.sum()
  return float(-(freq * np.log(freq)).sum())


def baseline_methods(ema_decay: float = 0.99) -> dict:
  """The paper's four methods (baselines without EMA, Bloop with one), then
  Priority-Constrained Descent as published (no gradient EMA) over its tau grid."""
  return {
    "mixed": bloop_optax.mixed,
    "dynamic_barrier": bloop_optax.dynamic_barrier,
    "pcgrad": bloop_optax.pcgrad_pair,
    "bloop": lambda lam: bloop_optax.bloop(lam, ema_decay=ema_decay),
    "pcd": lambda tau: bloop_optax.pcd(tau),
  }


# PCD's tau is the fraction of its own normalised first-order progress each aux
# loss keeps, in [0, 1]: the grids run from 0 (only conflicting components
# removed) through the published default 0.02 to 1 (the largest guarantee), as
# many values as the task's aux-weight grid, roughly evenly in log(tau) between.
PCD_TAUS = {
  3: (0.02, 0.2, 1.0),
  4: (0.02, 0.1, 0.4, 1.0),
  9: (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0),
  10: (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
}


def pcd_grids(methods: dict, aux_weights: tuple[float, ...]) -> dict:
  """The tau grid of every PCD method of ``methods``."""
  taus = PCD_TAUS.get(len(aux_weights), PCD_TAUS[3])
  return {name: taus for name in methods if name.startswith("pcd")}


# ---------------------------------------------------------------- 1. quadratics


def quadratics(epochs: int = 1000, cyclic: bool = False) -> Task:
  """Over-parameterised least squares vs the distance to a far point.

  The paper's notebook: p = 300 > n = 256, column scales 1..10, aux
  ``0.5 ||theta - theta*||^2`` with ``theta* = 10 N(0, I)``, theta from 0,
  plain SGD with step 1e-3 and batches of 64. ``cyclic=True`` replays the
  notebook's fixed batch order; the default reshuffles every epoch. A second
  draw of 256 examples is the held-out set.
  """
  p, n = 300, 256
  rng = np.random.default_rng(0)
  theta_true = rng.standard_normal(p)
  scales = np.linspace(1.0, 10.0, p)

  def draw(count):
    x = rng.standard_normal((count, p)) * scales
    return x, x @ theta_true + 0.05 * rng.standard_normal(count)

  x, y = draw(n)
  x_test, y_test = draw(n)
  target = 10.0 * rng.standard_normal(p)
  x, y, x_test, y_test, target = (
    jnp.asarray(a, jnp.float32) for a in (x, y, x_test, y_test, target)
  )

  def main_loss(theta, xb, yb):
    return 0.5 * jnp.mean((xb @ theta - yb) ** 2)

  def aux_loss(theta):
    return 0.5 * jnp.sum((theta - target) ** 2)

  def loss(theta, state, batch):
    return (main_loss(theta, *batch), aux_loss(theta)), state

  def evaluate(theta, state):
    del state
    return {
      "main_train": main_loss(theta, x, y),
      "main_test": main_loss(theta, x_test, y_test),
      "aux": aux_loss(theta),
    }

  weights = tuple(float(v) for v in np.logspace(-3, 3, 10))
  methods = baseline_methods()
  return Task(
    name="quadratics" + ("_cyclic" if cyclic else ""),
    init=lambda key: (jnp.zeros(p, jnp.float32), ()),
    loss=loss,
    evaluate=evaluate,
    train_data=(x, y),
    batch_size=64,
    epochs=epochs,
    optimizer=lambda lam: optax.sgd(1e-3),
    aux_weights=weights,
    methods=methods,
    grids=pcd_grids(methods, weights),
    reshuffle=not cyclic,
    scales=("log", "log"),
    labels=("main: least squares", "aux: 0.5 ||theta - theta*||^2"),
    eval_every=eval_every(epochs, 50),
    protocol={
      "figure": "the authors' quadratics notebook",
      "model": "linear, p = 300 > n = 256",
      "optimizer": "SGD",
      "learning_rate": "1e-3, constant",
      "ema_decay": 0.99,
      "metric": "least squares (main), 0.5 ||theta - theta*||^2 (aux); no constant-prediction"
      " chance level, so the untrained theta = 0 is the reference",
    },
  )


# ---------------------------------------------------------------- digits data


@functools.cache
def digits_split():
  """scikit-learn's bundled 8x8 digits, scaled to [0, 1], 75/25 split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  x, y = load_digits(return_X_y=True)
  x_train, x_test, y_train, y_test = train_test_split(
    x / 16.0, y, test_size=0.25, random_state=0, stratify=y
  )
  f = lambda a: jnp.asarray(a, jnp.float32)
  i = lambda a: jnp.asarray(a, jnp.int32)
  return f(x_train), i(y_train), f(x_test), i(y_test)


def _dense_init(key, sizes):
  keys = jax.random.split(key, len(sizes) - 1)
  return [
    {
      "w": jax.random.normal(k, (a, b), jnp.float32) * jnp.sqrt(2.0 / a),
      "b": jnp.zeros(b, jnp.float32),
    }
    for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
  ]


def _mlp(layers, x):
  for layer in layers[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ layers[-1]["w"] + layers[-1]["b"]


def _cross_entropy(logits, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


# ---------------------------------------------------------------- 2. smooth MLP


def spectral_norm(w, v, iterations=1):
  """Largest singular value of ``w`` by power iteration from ``v``.

  Returns ``(sigma, v_next)``. The singular vectors are held constant in the
  gradient, so ``d sigma / d w = u v^T``: cheap, and free of the SVD whose
  gradient is slow (and has hung on CPU under vmap + scan).
  """

  def body(_, v):
    u = w @ v
    u = u / (jnp.linalg.norm(u) + 1e-12)
    v = w.T @ u
    return v / (jnp.linalg.norm(v) + 1e-12)

  v = jax.lax.stop_gradient(jax.lax.fori_loop(0, iterations, body, v))
  u = jax.lax.stop_gradient(w @ v)
  u = u / (jnp.linalg.norm(u) + 1e-12)
  return u @ (w @ v), v


def smooth_mlp(
  epochs: int = DIGITS_EPOCHS,
  methods: dict | None = None,
  name: str = "digits_smooth_mlp",
  quick: bool = False,
) -> Task:
  """The paper's Figure 3a on digits: cross-entropy vs log Lipschitz bound.

  MLP 64-256-128-10 with ReLU; main = cross-entropy; aux = ``sum_l log
  sigma_max(W_l)``, the log of the product of the layers' spectral norms (an
  upper bound on the network's Lipschitz constant), by one warm-started power
  iteration per step (30 at evaluation). The paper's protocol: Adam 3e-4 with a
  linear warm-up over the first 5% of the steps, then cosine decay; batches of
  256; aux weights 1e-4 to 1 in half-decades; Bloop's EMA rate 0.01.
  """
  x, y, x_test, y_test = digits_split()
  sizes = (64, 256, 128, 10)
  if quick:
    epochs = 10
  batch = 256
  total = epochs * (len(x) // batch)

  def init(key):
    layers = _dense_init(key, sizes)
    vs = [
      jax.random.normal(jax.random.fold_in(key, 100 + i), (b,), jnp.float32)
      for i, b in enumerate(sizes[1:])
    ]
    return layers, [v / jnp.linalg.norm(v) for v in vs]

  def log_lipschitz(layers, vs, iterations):
    total, new_vs = 0.0, []
    for layer, v in zip(layers, vs, strict=True):
      sigma, v = spectral_norm(layer["w"], v, iterations)
      total, new_vs = total + jnp.log(sigma), [*new_vs, v]
    return total, new_vs

  def loss(layers, vs, batch):
    xb, yb = batch
    aux, vs = log_lipschitz(layers, vs, 1)
    return (_cross_entropy(_mlp(layers, xb), yb), aux), vs

  def evaluate(layers, vs):
    return {
      "main_train": _cross_entropy(_mlp(layers, x), y),
      "main_test": _cross_entropy(_mlp(layers, x_test), y_test),
      "aux": log_lipschitz(layers, vs, 30)[0],
    }

  grid = (1e-2, 1e-1, 1.0) if quick else tuple(float(v) for v in np.logspace(-4, 0, 9))
  methods = baseline_methods() if methods is None else methods
  return Task(
    name=name,
    init=init,
    loss=loss,
    evaluate=evaluate,
    train_data=(x, y),
    batch_size=batch,
    epochs=epochs,
    optimizer=lambda lam: optax.adam(warmup_cosine(3e-4, total)),
    aux_weights=grid,
    methods=methods,
    grids=pcd_grids(methods, grid),
    scales=("log", "linear"),
    labels=("main: cross-entropy", "aux: log prod_l ||W_l||_2"),
    eval_every=eval_every(epochs),
    chance={"train": label_entropy(y), "test": label_entropy(y_test)},
    protocol={
      "figure": "3a (smooth MLP on MNIST)",
      "model": "MLP 64-256-128-10, ReLU",
      "data": f"scikit-learn digits, {len(x)} train / {len(x_test)} held-out",
      "optimizer": "Adam",
      "learning_rate": "3e-4, linear warm-up over the first 5% of steps, then cosine decay to 0",
      "ema_decay": 0.99,
      "metric": "train and held-out cross-entropy vs log prod_l ||W_l||_2 (power iteration)",
    },
  )


def ema_ablation(epochs: int = DIGITS_EPOCHS, quick: bool = False) -> Task:
  """The paper's Figure 7 on the digits task: Bloop's ``ema_decay`` in
  {0, .9, .99, .999}, under the same protocol.

  ``ema_decay = 0`` projects on the current batch gradient (no EMA);
  ``0.999`` is the paper's rate 0.001. Mixed is the reference.
  """
  methods = {"mixed": bloop_optax.mixed}
  for decay in (0.0, 0.9, 0.99, 0.999):
    methods[f"bloop(ema_decay={decay:g})"] = functools.partial(
      lambda lam, d: bloop_optax.bloop(lam, ema_decay=d), d=decay
    )
  # PCD as published, and deciding from EMAs of both gradients (its option).
  methods["pcd"] = lambda tau: bloop_optax.pcd(tau)
  for decay in (0.9, 0.99):
    methods[f"pcd(ema_decay={decay:g})"] = functools.partial(
      lambda tau, d: bloop_optax.pcd(tau, ema_decay=d), d=decay
    )
  return smooth_mlp(epochs, methods=methods, name="digits_ema_ablation", quick=quick)


# ---------------------------------------------------------------- 3. multi-task


def multitask(epochs: int = MULTITASK_EPOCHS, quick: bool = False) -> Task:
  """The paper's Cifar10Mnist (Figure 4) with digits on digits.

  Each input overlays a bright digit A and a faint digit B (``A + 0.4 B``).
  Main = the label of the faint digit (the harder task), aux = the label of
  the bright one. As Cifar10Mnist's combinations are effectively unlimited,
  every epoch draws new partners B for the training digits, so the main task
  cannot be memorised; the held-out set pairs held-out digits once. A shared
  trunk 64-256-128 with two linear heads; the paper's SGD: Nesterov momentum
  0.9, learning rate 0.1 / (1 + aux_weight), warm-up then cosine decay, batches
  of 256; aux weights 1e-3 to 1e3. Bloop with the paper's EMA rate 0.001 for
  this task (``bloop``) and with its default 0.01.
  """
  x, y, x_test, y_test = digits_split()
  rng = np.random.default_rng(1)
  if quick:
    epochs = 2
  batch = 256
  total = epochs * (len(x) // batch)

  def overlay(x, y, partner):
    return x[partner] * 0.4 + x, y[partner], y

  fixed = overlay(x, y, jnp.asarray(rng.permutation(len(x))))
  held_out = overlay(x_test, y_test, jnp.asarray(rng.permutation(len(x_test))))

  def augment(key, data):
    del data
    return overlay(x, y, jax.random.permutation(key, len(x)))

  def init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
      "trunk": _dense_init(k1, (64, 256, 128)),
      "main_head": _dense_init(k2, (128, 10)),
      "aux_head": _dense_init(k3, (128, 10)),
    }, ()

  def heads(params, xb):
    h = xb
    for layer in params["trunk"]:
      h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return _mlp(params["main_head"], h), _mlp(params["aux_head"], h)

  def losses(params, xb, ym, ya):
    main_logits, aux_logits = heads(params, xb)
    return _cross_entropy(main_logits, ym), _cross_entropy(aux_logits, ya)

  def loss(params, state, batch):
    return losses(params, *batch), state

  def evaluate(params, state):
    del state
    main, aux = losses(params, *fixed)
    main_test, aux_test = losses(params, *held_out)
    return {"main_train": main, "main_test": main_test, "aux": aux, "aux_test": aux_test}

  methods = baseline_methods(0.999)
  methods["bloop(ema_decay=0.99)"] = lambda lam: bloop_optax.bloop(lam, ema_decay=0.99)
  methods["pcd"] = methods.pop("pcd")  # after the Bloop variants, as in the other tasks
  grid = (1e-1, 1.0, 10.0) if quick else tuple(float(v) for v in np.logspace(-3, 3, 9))
  # Bloop at the rate of aux weight 0 (0.1, as PCD gets) instead of the paper's
  # 0.1 / (1 + lambda): how much of PCD's lead here the learning rate explains.
  # It diverges from lambda = 5.62 on; the smoke test's grid stops below.
  methods["bloop(lr=0.1)"] = lambda lam: bloop_optax.bloop(lam, ema_decay=0.999)
  grids = {**pcd_grids(methods, grid), "bloop(lr=0.1)": grid[:2] if quick else grid}
  return Task(
    name="digits_multitask",
    init=init,
    loss=loss,
    evaluate=evaluate,
    train_data=fixed,
    batch_size=batch,
    epochs=epochs,
    optimizer=lambda lam: optax.sgd(
      warmup_cosine(0.1 / (1.0 + lam), total), momentum=0.9, nesterov=True
    ),
    aux_weights=grid,
    methods=methods,
    grids=grids,
    scales=("log", "log"),
    labels=("main: faint-digit CE", "aux: bright-digit CE"),
    eval_every=eval_every(epochs),
    augment=augment,
    chance={"train": label_entropy(fixed[1]), "test": label_entropy(held_out[1])},
    protocol={
      "figure": "4 (Cifar10Mnist, ResNet18 with two heads)",
      "model": "MLP trunk 64-256-128, two linear heads",
      "data": "digit A + 0.4 x digit B, new partners B every epoch; held-out pairs fixed",
      "optimizer": "SGD, Nesterov momentum 0.9",
      "learning_rate": "0.1 / (1 + aux_weight), 5% linear warm-up, then cosine decay to 0"
      " (PCD, whose step has the main gradient's norm, and 'bloop(lr=0.1)': 0.1, the"
      " aux-weight-0 rate)",
      "ema_decay": "0.999 (the paper's rate 0.001 for this task; 'bloop'), and 0.99",
      "metric": "held-out main CE vs held-out aux CE (headline); train likewise",
    },
  )


# ---------------------------------------------------------------- 7. three objectives


def _summed_aux(pair_transform):
  """Feeds ``(M, A_1, ..., A_K)`` to a pair transform as ``(M, A_1 + ... + A_K)``."""

  def update(updates, state, params=None, **extra):
    main, *auxes = updates
    total = jax.tree.map(lambda *leaves: sum(leaves[1:], leaves[0]), *auxes)
    return pair_transform.update(bloop_optax.MainAux(main, total), state, params, **extra)

  return optax.GradientTransformationExtraArgs(pair_transform.init, update)


def three_objectives(epochs: int = DIGITS_EPOCHS, quick: bool = False) -> Task:
  """Digits with two regularisers in priority: main > Lipschitz bound > weights.

  The smooth MLP of :func:`smooth_mlp` with aux_1 = ``sum_l log ||W_l||_2``
  and aux_2 = ``0.5 ||theta||^2 / 1000``; both weighted by the same ``λ``.
  Hierarchical Bloop (the paper's §2.3) adds aux_1 orthogonally to the main
  EMA and aux_2 orthogonally to both; Mixed sums all three; "bloop(sum)"
  projects the summed aux gradient off the main EMA, ignoring the hierarchy.
  """
  base = smooth_mlp(epochs, quick=quick)

  def weight_norm(layers):
    return 0.5 * sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(layers)) / 1000.0

  def loss(layers, vs, batch):
    (main, lipschitz), vs = base.loss(layers, vs, batch)
    return (main, lipschitz, weight_norm(layers)), vs

  def evaluate(layers, vs):
    return {**base.evaluate(layers, vs), "aux_2": weight_norm(layers)}

  return Task(
    name="digits_three_objectives",
    init=base.init,
    loss=loss,
    evaluate=evaluate,
    train_data=base.train_data,
    batch_size=base.batch_size,
    epochs=base.epochs,
    optimizer=base.optimizer,
    aux_weights=base.aux_weights,
    methods={
      "mixed": lambda lam: _summed_aux(bloop_optax.mixed(lam)),
      "bloop(sum)": lambda lam: _summed_aux(bloop_optax.bloop(lam, ema_decay=0.99)),
      "hierarchical_bloop": lambda lam: bloop_optax.hierarchical_bloop((lam, lam), ema_decay=0.99),
      "pcd": lambda tau: bloop_optax.pcd(tau, num_objectives=3),
    },
    grids=pcd_grids({"pcd": None}, base.aux_weights),
    scales=("log", "linear"),
    labels=("main: cross-entropy", "aux_1: log prod_l ||W_l||_2"),
    eval_every=base.eval_every,
    chance=base.chance,
    protocol={**base.protocol, "figure": "none (the paper's Section 2.3, never run there)"},
  )
