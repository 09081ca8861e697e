r"""Forty tasks on one trunk: aggregating the shared parameters or every parameter.

Forty binary attributes of scikit-learn's handwritten digits: attribute ``a``
asks whether the digit belongs to a fixed random half of the ten classes (the
halves drawn once, each distinct). A shared MLP trunk 64 -> 128 -> 128 (ReLU)
feeds forty linear two-class heads; each task's loss is its cross-entropy.

Every method gets the same data split (1,200 training images, the rest held
out), initialisation, batches (128, reshuffled each epoch), Adam at 1e-3 and
the number of steps, for each seed:

* ``sum``: the plain sum of the forty losses (one backward pass);
* ``<rule> full``: the aggregator on the forty full-parameter gradients (the
  heads' gradients enter the Gram matrix; each head's update is scaled by its
  task's weight);
* ``<rule> shared``: ``aggregators.on_shared(<rule>)`` on the trunk, each head
  its own task's gradient (TorchJD's ``mtl_backward`` semantics);
* ``<rule> features``: MGDA-UB's features Jacobian: the weights are decided from
  the forty gradients with respect to the trunk's output, whose direction is
  pulled back through the trunk in one backward pass; each head its own task's
  gradient.

It reports, over seeds, the mean training cross-entropy over tasks, the mean
and the worst held-out accuracy over tasks, and writes
``many_tasks.json`` and ``many_tasks.png`` (training curves).

  python -m benchmarks.many_tasks --out benchmarks/results
"""

import argparse
import json
import pathlib
import time

import numpy as np

TASKS, WIDTH, BATCH = 40, 128, 128


def attributes(seed=0):
  """``[10, TASKS]`` booleans: which classes each attribute marks (distinct halves)."""
  rng = np.random.default_rng(seed)
  seen, rows = set(), []
  while len(rows) < TASKS:
    half = tuple(sorted(rng.choice(10, 5, replace=False)))
    complement = tuple(sorted(set(range(10)) - set(half)))
    if half in seen or complement in seen:
      continue
    seen.add(half)
    rows.append(np.isin(np.arange(10), half))
  return np.stack(rows, axis=1)


def dataset():
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = attributes()[digits.target].astype(np.int32)  # [N, TASKS]
  order = np.random.default_rng(0).permutation(len(x))
  train, test = order[:1200], order[1200:]
  return x[train], y[train], x[test], y[test]


def method(name, rule):
  from bloop_optax import aggregators

  if name == "sum":
    return None
  inner = getattr(aggregators, rule)(TASKS)
  if name.endswith("shared"):
    return aggregators.on_shared(inner, {"trunk": True, "heads": False})
  if name.endswith("features"):
    return aggregators.on_shared(inner, {"features": True, "heads": False})
  return inner


def init_params(seed):
  """The trunk's two layers and the forty heads (He initialisation)."""
  import jax
  import jax.numpy as jnp

  keys = jax.random.split(jax.random.key(seed), 2 + TASKS)

  def dense(key, n_in, n_out):
    return {
      "w": jax.random.normal(key, (n_in, n_out)) * jnp.sqrt(2.0 / n_in),
      "b": jnp.zeros(n_out),
    }

  return {
    "trunk": [dense(keys[0], 64, WIDTH), dense(keys[1], WIDTH, WIDTH)],
    "heads": [dense(keys[2 + i], WIDTH, 2) for i in range(TASKS)],
  }


def trunk(layers, x):
  import jax

  h = x
  for layer in layers:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  return h


def head_logits(features, heads):
  return [features @ head["w"] + head["b"] for head in heads]


def head_losses(f, y):
  """The forty cross-entropies of ``f = {"features": trunk output, "heads": [...]}``."""
  import jax
  import jax.numpy as jnp

  return tuple(
    -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, i : i + 1], 1))
    for i, z in enumerate(head_logits(f["features"], f["heads"]))
  )


def losses(p, x, y):
  return head_losses({"features": trunk(p["trunk"], x), "heads": p["heads"]}, y)


def features_init(aggregator, params):
  """``aggregator``'s state for MGDA-UB's step: shaped like a batch's features."""
  import jax.numpy as jnp

  return aggregator.init({"features": jnp.zeros((BATCH, WIDTH)), "heads": params["heads"]})


def features_direction(aggregator, agg_state, p, x, y):
  """MGDA-UB's step: the aggregator (``on_shared`` with the features marked shared)
  decides from the forty gradients of the trunk's output; its direction there is
  pulled back through the trunk once, each head keeps its own task's gradient."""
  import jax

  import bloop_optax

  h, pullback = jax.vjp(lambda t: trunk(t, x), p["trunk"])
  f = {"features": h, "heads": p["heads"]}
  values, grads = bloop_optax.value_and_grads(head_losses)(f, y)
  direction, agg_state = aggregator.update(grads, agg_state)
  (trunk_direction,) = pullback(direction["features"])
  return values, {"trunk": trunk_direction, "heads": direction["heads"]}, agg_state


def run(name, rule, seed, steps):
  import jax
  import jax.numpy as jnp
  import optax

  import bloop_optax

  x_train, y_train, x_test, y_test = dataset()
  params = init_params(seed)
  aggregator = method(name, rule)
  adam = optax.adam(1e-3)
  features_mode = name.endswith("features")
  if features_mode:  # the aggregator, then the pullback, then Adam
    state = features_init(aggregator, params), adam.init(params)
  else:
    tx = adam if aggregator is None else optax.chain(aggregator, adam)
    state = tx.init(params)

  @jax.jit
  def step(p, s, x, y):
    if features_mode:
      agg_state, adam_state = s
      values, updates, agg_state = features_direction(aggregator, agg_state, p, x, y)
      updates, adam_state = adam.update(updates, adam_state, p)
      return optax.apply_updates(p, updates), (agg_state, adam_state), sum(values) / TASKS
    if aggregator is None:
      values, grads = jax.value_and_grad(lambda p: sum(losses(p, x, y)))(p)
    else:
      values, grads = bloop_optax.value_and_grads(losses)(p, x, y)
      values = sum(values)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, values / TASKS

  @jax.jit
  def evaluate(p, x, y):
    outputs = head_logits(trunk(p["trunk"], x), p["heads"])
    hits = [jnp.mean(jnp.argmax(z, 1) == y[:, i]) for i, z in enumerate(outputs)]
    accuracy = jnp.stack(hits)
    return accuracy, jnp.mean(jnp.stack(losses(p, x, y)))

  rng = np.random.default_rng(seed)
  curve, order, cursor = [], rng.permutation(len(x_train)), 0
  start = time.perf_counter()
  for t in range(steps):
    if cursor + BATCH > len(order):
      order, cursor = rng.permutation(len(x_train)), 0
    batch = order[cursor : cursor + BATCH]
    cursor += BATCH
    params, state, _ = step(params, state, x_train[batch], y_train[batch])
    if (t + 1) % 100 == 0:
      curve.append(float(evaluate(params, x_train, y_train)[1]))
  seconds = time.perf_counter() - start
  accuracy, _ = evaluate(params, x_test, y_test)
  return {
    "train_ce": curve[-1],
    "curve": curve,
    "test_acc_mean": float(jnp.mean(accuracy)),
    "test_acc_worst": float(jnp.min(accuracy)),
    "seconds": seconds,
  }


def direction_gap(rule, seed=0):
  """On the first batch at initialisation: the relative difference of the trunk's
  direction with every parameter aggregated, and with MGDA-UB's features, from
  the shared-parameter one, and the spread of the weights each decides."""
  import jax
  import jax.numpy as jnp

  import bloop_optax

  x_train, y_train, _, _ = dataset()
  params = init_params(seed)
  x, y = x_train[:BATCH], y_train[:BATCH]

  _, grads = bloop_optax.value_and_grads(losses)(params, x, y)
  full, shared, by_features = (method(f"{rule} {m}", rule) for m in ("full", "shared", "features"))
  d_full, s_full = full.update(grads, full.init(params))
  d_shared, s_shared = shared.update(grads, shared.init(params))
  _, d_features, s_features = features_direction(
    by_features, features_init(by_features, params), params, x, y
  )
  flat = lambda t: jnp.concatenate([v.ravel() for v in jax.tree.leaves(t)])  # noqa: E731
  norm = jnp.linalg.norm(flat(d_shared["trunk"]))
  gap = jnp.linalg.norm(flat(d_full["trunk"]) - flat(d_shared["trunk"]))
  features_gap = jnp.linalg.norm(flat(d_features["trunk"]) - flat(d_shared["trunk"]))
  w_full, w_shared = s_full.objective_weights, s_shared.inner.objective_weights
  w_features = s_features.inner.objective_weights
  return {
    "trunk_relative_gap": float(gap / norm),
    "features_relative_gap": float(features_gap / norm),
    "weights_features_min_max": [float(w_features.min()), float(w_features.max())],
    "weights_full_min_max": [float(w_full.min()), float(w_full.max())],
    "weights_shared_min_max": [float(w_shared.min()), float(w_shared.max())],
  }


def summary(results):
  lines = [
    f"{'method':>16} {'train CE':>10} {'test acc (mean)':>16} {'test acc (worst)':>17} {'s/run':>7}"
  ]
  for name, runs in results.items():
    ce = np.array([r["train_ce"] for r in runs])
    acc = np.array([r["test_acc_mean"] for r in runs])
    worst = np.array([r["test_acc_worst"] for r in runs])
    secs = np.mean([r["seconds"] for r in runs])
    lines.append(
      f"{name:>16} {ce.mean():10.4f} {acc.mean():9.4f} ± {acc.std():.4f}"
      f" {worst.mean():10.4f} ± {worst.std():.4f} {secs:7.1f}"
    )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rules", default="upgrad,mgda")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--out", default="results")
  args = parser.parse_args()
  names = [("sum", None)]
  for rule in args.rules.split(","):
    names += [(f"{rule} full", rule), (f"{rule} shared", rule), (f"{rule} features", rule)]
  results = {}
  try:
    from tqdm import tqdm
  except ImportError:  # the progress bar is optional
    tqdm = None
  jobs = [(n, r, s) for n, r in names for s in range(args.seeds)]
  bar = tqdm(total=len(jobs)) if tqdm else None
  for name, rule, seed in jobs:
    results.setdefault(name, []).append(run(name, rule, seed, args.steps))
    if bar:
      bar.update()
  if bar:
    bar.close()
  print(summary(results))
  gaps = {rule: direction_gap(rule) for rule in args.rules.split(",")}
  for rule, gap in gaps.items():
    print(
      f"{rule}, first batch: the trunk's direction with every parameter aggregated differs from"
      f" the shared-parameter one by {100 * gap['trunk_relative_gap']:.1f}% (relative norm);"
      f" weights {gap['weights_full_min_max']} against {gap['weights_shared_min_max']}; with"
      f" the features' gradients by {100 * gap['features_relative_gap']:.1f}%"
      f" (weights {gap['weights_features_min_max']})"
    )
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  record = {"steps": args.steps, "runs": results, "first_batch": gaps}
  (out / "many_tasks.json").write_text(json.dumps(record, indent=1))
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4))
  for i, (name, runs) in enumerate(results.items()):
    curves = np.array([r["curve"] for r in runs])
    steps = 100 * np.arange(1, curves.shape[1] + 1)
    ax.plot(steps, curves.mean(0), color=f"C{i}", label=name)
  ax.set(xlabel="step", ylabel="mean training cross-entropy over 40 tasks", yscale="log")
  ax.legend()
  ax.set_title("40 digit attributes on one trunk")
  fig.tight_layout()
  fig.savefig(out / "many_tasks.png", dpi=120)


if __name__ == "__main__":
  main()
