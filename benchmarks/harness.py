"""Trains one method over a grid of aux weights and seeds in one compiled program.

A :class:`Task` is a pure-functional description of a problem: how to build
params, the pair of losses on a batch, how to evaluate, the data and the base
optimizer. :func:`run_method` vmaps the whole training run over the flattened
(aux_weight, seed) grid and scans over the steps of each epoch, so every method
costs one compilation whatever the size of the grid.
"""

from collections.abc import Callable
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import bloop_optax

PyTree = Any
# A method maps a (traced) aux weight to a pair-consuming transformation.
Method = Callable[[jax.Array], optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class Task:
  """A main/aux training problem.

  Attributes:
    name: short name, used for files.
    init: ``key -> (params, model_state)``; model_state holds non-trained
      state (e.g. power-iteration vectors), ``()`` if none.
    loss: ``(params, model_state, batch) -> ((main, aux), model_state)``.
    evaluate: ``(params, model_state) -> dict`` of scalar metrics; must hold
      ``main_train``, ``main_test`` and ``aux`` (and may hold ``aux_test``).
    train_data: tuple of arrays with a leading example axis.
    batch_size: examples per step.
    epochs: passes over the training data.
    optimizer: ``aux_weight -> optax transformation`` applied after the surgery.
    aux_weights: the grid of aux weights.
    methods: name -> :data:`Method`.
    grids: name -> the values a method sweeps instead of ``aux_weights``
      (PCD's tau, a fraction rather than a weight). Such a method gets the
      optimizer of aux weight 0: its step has the main gradient's norm.
    reshuffle: draw a new batch order every epoch (else one fixed order).
    scales: ("log" or "linear") for the (main, aux) axes of plots and
      hypervolumes.
    labels: axis labels (main, aux).
    eval_every: epochs between two evaluations (``epochs`` must be a
      multiple); the trajectories hold ``epochs // eval_every + 1`` points.
    augment: ``(key, train_data) -> train_data`` drawn anew every epoch
      (e.g. fresh overlay partners), or None.
    chance: the main loss of the best constant prediction per panel
      (``{"train": ..., "test": ...}``), or None where there is no such
      thing; a run that ends there has learnt nothing.
    protocol: the settings to record beside the results.
  """

  name: str
  init: Callable[[jax.Array], tuple[PyTree, PyTree]]
  loss: Callable[..., Any]
  evaluate: Callable[[PyTree, PyTree], dict[str, jax.Array]]
  train_data: tuple[jax.Array, ...]
  batch_size: int
  epochs: int
  optimizer: Callable[[jax.Array], optax.GradientTransformation]
  aux_weights: tuple[float, ...]
  methods: dict[str, Method]
  grids: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
  reshuffle: bool = True
  scales: tuple[str, str] = ("log", "linear")
  labels: tuple[str, str] = ("main loss", "aux loss")
  eval_every: int = 1
  augment: Callable[[jax.Array, tuple[jax.Array, ...]], tuple[jax.Array, ...]] | None = None
  chance: dict[str, float] | None = None
  protocol: dict[str, Any] = dataclasses.field(default_factory=dict)

  def grid(self, method: str) -> tuple[float, ...]:
    """The values ``method`` is trained at: its own grid, or the aux weights."""
    return self.grids.get(method, self.aux_weights)

  @property
  def steps_per_epoch(self) -> int:
    return len(self.train_data[0]) // self.batch_size

  @property
  def total_steps(self) -> int:
    return self.epochs * self.steps_per_epoch

  @property
  def evaluations(self) -> int:
    return self.epochs // self.eval_every


def run_method(
  task: Task,
  method: Method,
  seeds: int,
  *,
  grid: tuple[float, ...] | None = None,
  chunk: int | None = None,
  progress: tqdm | None = None,
) -> dict[str, np.ndarray]:
  """Trains ``method`` for every (value of the grid, seed); returns per-epoch
  metrics. The grid is ``task.aux_weights`` unless ``grid`` is given (the
  optimizer then gets aux weight 0; see :class:`Task`).

  Returns:
    metric name -> array of shape ``[len(grid), seeds, evaluations + 1]``
    (index 0 of the last axis is before training).
  """
  if task.epochs % task.eval_every:
    raise ValueError(f"{task.name}: epochs={task.epochs} is not a multiple of eval_every")
  own_grid = grid is not None
  grid = task.aux_weights if grid is None else grid
  lams = jnp.repeat(jnp.asarray(grid, jnp.float32), seeds)
  keys = jax.random.split(jax.random.key(0), seeds)
  keys = jnp.tile(keys, (len(grid),))
  n = task.steps_per_epoch * task.batch_size
  grad_fn = bloop_optax.value_and_grads(task.loss, has_aux=True)

  def chain(lam):
    return optax.chain(method(lam), task.optimizer(jnp.zeros_like(lam) if own_grid else lam))

  def start(lam, key):
    params, model_state = task.init(jax.random.fold_in(key, 0))
    return params, model_state, chain(lam).init(params)

  def blocks(carry, lam, key, first_block, count):
    tx = chain(lam)

    def step(carry, batch):
      params, model_state, opt_state = carry
      (_, model_state), grads = grad_fn(params, model_state, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), model_state, opt_state), None

    def epoch(carry, index):
      epoch_key = jax.random.fold_in(key, 1 + index * task.reshuffle)
      data = task.train_data
      if task.augment is not None:
        data = task.augment(jax.random.fold_in(jax.random.fold_in(key, 2**20), index), data)
      order = jax.random.permutation(epoch_key, len(data[0]))[:n]
      batches = jax.tree.map(
        lambda x: x[order].reshape(task.steps_per_epoch, task.batch_size, *x.shape[1:]), data
      )
      carry, _ = jax.lax.scan(step, carry, batches)
      return carry, None

    def block(carry, index):  # eval_every epochs, then one evaluation
      epochs = index * task.eval_every + jnp.arange(task.eval_every)
      carry, _ = jax.lax.scan(epoch, carry, epochs)
      return carry, task.evaluate(carry[0], carry[1])

    return jax.lax.scan(block, carry, first_block + jnp.arange(count))

  carry = jax.jit(jax.vmap(start))(lams, keys)
  first = jax.jit(jax.vmap(lambda c: task.evaluate(c[0], c[1])))(carry)
  history = [jax.tree.map(lambda x: x[:, None], first)]
  run_chunk = jax.jit(jax.vmap(blocks, in_axes=(0, 0, 0, None, None)), static_argnums=(4,))
  if chunk is None:  # evaluations per compiled call: the progress bar's granularity
    chunk = max(1, task.evaluations // 20)
  done = 0
  while done < task.evaluations:
    count = min(chunk, task.evaluations - done)
    carry, metrics = run_chunk(carry, lams, keys, done, count)
    # Dispatch is asynchronous: wait, so the progress bar shows finished work.
    history.append(jax.block_until_ready(metrics))
    done += count
    if progress is not None:
      progress.update(count * task.eval_every * task.steps_per_epoch)
  out = {k: np.concatenate([np.asarray(h[k]) for h in history], axis=1) for k in first}
  shape = (len(grid), seeds, task.evaluations + 1)
  return {k: v.reshape(shape) for k, v in out.items()}


def run_task(
  task: Task, seeds: int, methods: list[str] | None = None, seconds: dict | None = None
) -> dict[str, Any]:
  """Runs every method of ``task`` (or of ``methods``); returns ``{method:
  metrics}`` and, into ``seconds`` if given, each method's training time."""
  names = list(task.methods) if methods is None else methods
  results = {}
  with tqdm(total=len(names) * task.total_steps, desc=task.name, unit="step") as bar:
    for name in names:
      bar.set_postfix_str(name)
      grid = task.grids.get(name)
      start = time.perf_counter()
      results[name] = run_method(task, task.methods[name], seeds, grid=grid, progress=bar)
      if seconds is not None:
        seconds[name] = time.perf_counter() - start
  return results
