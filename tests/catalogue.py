"""Every transform the package exports, with the input it takes, for the tests
that hold all of them to one contract (optax's, the accelerator lowering)."""

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

import bloop_optax
from bloop_optax import aggregators
from bloop_optax.aggregators import _catalogue

# Which EMA settings of each aggregator the contract covers (default: the method
# as published). Rules that share every code path but the weight rule with
# another are covered by their EMA variant, the superset.
EMA_VARIANTS = {
  name: (None, 0.9) for name in ("mgda", "pcgrad", "cagrad", "imtl_g", "aligned_mtl", "upgrad")
} | {"dualproj": (0.9,), "config": (0.9,), "nash_mtl": (0.9,)}
# Keyword arguments of the instance each aggregator is checked with.
AGGREGATOR_OPTIONS = {
  "krum": {"n_byzantine": 0, "n_selected": 2},
  "random": {"key": 2},
  "gradvac": {"target_decay": 0.5, "key": 1},
  "moco": {"ema_decay": 0.9, "step_size": 0.2, "rho": 0.0},
  "nash_mtl": {"max_norm": 1.0},
}


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  make: Callable[[], optax.GradientTransformation]
  n: int  # 2: a MainAux pair; otherwise a tuple of n gradients
  # The factory and its hyperparameters, for inject_hyperparams (None: not a
  # plain factory, e.g. a wrapper of another transform).
  factory: Callable[..., Any] | None = None
  hyper: dict | None = None
  static: tuple[str, ...] = ()

  def updates(self, grads: list[Any]) -> Any:
    return bloop_optax.MainAux(*grads) if self.n == 2 else tuple(grads)


def _cases() -> list[Case]:
  cases = [
    Case(
      "bloop",
      lambda: bloop_optax.bloop(0.3, ema_decay=0.9),
      2,
      bloop_optax.bloop,
      {"aux_weight": 0.3, "ema_decay": 0.9},
    ),
    Case(
      "bloop_project_first",
      lambda: bloop_optax.bloop(0.3, ema_decay=0.9, ema_order="project_first"),
      2,
      bloop_optax.bloop,
      {"aux_weight": 0.3, "ema_decay": 0.9, "ema_order": "project_first"},
      ("ema_order",),
    ),
    Case("mixed", lambda: bloop_optax.mixed(0.3), 2, bloop_optax.mixed, {"aux_weight": 0.3}),
    Case(
      "dynamic_barrier",
      lambda: bloop_optax.dynamic_barrier(0.3),
      2,
      bloop_optax.dynamic_barrier,
      {"aux_weight": 0.3},
    ),
    Case(
      "pcgrad",
      lambda: bloop_optax.pcgrad_pair(0.3),
      2,
      bloop_optax.pcgrad_pair,
      {"aux_weight": 0.3},
    ),
    Case(
      "hierarchical_bloop",
      lambda: bloop_optax.hierarchical_bloop((0.3, 0.1), ema_decay=0.9),
      3,
      bloop_optax.hierarchical_bloop,
      {"aux_weights": (0.3, 0.1), "ema_decay": 0.9},
      ("aux_weights",),
    ),
    Case(
      "pcd",
      lambda: bloop_optax.pcd(0.3),
      2,
      bloop_optax.pcd,
      {"tau": 0.3},
      ("num_objectives",),
    ),
    Case(
      "pcd_3_ema",
      lambda: bloop_optax.pcd((0.3, 0.1), num_objectives=3, ema_decay=0.9),
      3,
      bloop_optax.pcd,
      {"tau": (0.3, 0.1), "num_objectives": 3, "ema_decay": 0.9},
      ("num_objectives", "tau"),
    ),
    Case(
      "multi_steps",
      lambda: bloop_optax.multi_steps(bloop_optax.bloop(0.3, ema_decay=0.9), every_k=2),
      2,
    ),
    Case(
      "partition",
      lambda: bloop_optax.partition(
        {"a": bloop_optax.bloop(0.3, ema_decay=0.9), "b": bloop_optax.mixed(0.3)},
        lambda p: {k: "b" if k == "b" else "a" for k in p},
      ),
      2,
    ),
  ]
  for entry in _catalogue.ENTRIES:
    options = AGGREGATOR_OPTIONS.get(entry.name, {})
    for decay in EMA_VARIANTS.get(entry.name, (None,)):
      suffix = "" if decay is None else "_ema"
      extra = {} if decay is None else {"ema_decay": decay}
      hyper = {"num_objectives": 3, **entry.required, **options, **extra}
      static = (
        "num_objectives",
        *(n for n, v in hyper.items() if isinstance(v, int) and n != "key"),
      )
      if entry.ema is True and decay is None:
        hyper["ema_decay"] = None
        static += ("ema_decay",)
      cases.append(
        Case(
          f"aggregators.{entry.name}{suffix}",
          lambda e=entry, kw={**options, **extra}: e.make(3, **kw),
          3,
          entry.factory,
          hyper,
          tuple(dict.fromkeys(static)),
        )
      )
  cases += [
    Case(
      "aggregators.cr_mogm",
      lambda: aggregators.cr_mogm(aggregators.upgrad(3, ema_decay=0.9), weights_decay=0.8),
      3,
      lambda weights_decay: aggregators.cr_mogm(
        aggregators.upgrad(3, ema_decay=0.9), weights_decay=weights_decay
      ),
      {"weights_decay": 0.8},
      (),
    ),
    Case(
      "aggregators.on_shared",
      lambda: aggregators.on_shared(
        aggregators.upgrad(3, ema_decay=0.9), lambda g: {name: name != "b" for name in g}
      ),
      3,
    ),
    Case(
      "aggregators.constant",
      lambda: aggregators.constant(3, (1.0, 0.5, 2.0)),
      3,
      lambda weights: aggregators.constant(3, weights),
      {"weights": (1.0, 0.5, 2.0)},
      ("weights",),
    ),
  ]
  return cases


CASES = _cases()
IDS = [c.name for c in CASES]


def one_per_aggregator() -> list[Case]:
  """One case per aggregator of the K = 3 tuple: its EMA variant where it has
  both (the superset of the code paths), CR-MOGM and the fixed weights."""
  aggregator_cases = [c for c in CASES if c.name.startswith("aggregators.")]
  names = {c.name for c in aggregator_cases}
  return [c for c in aggregator_cases if f"{c.name}_ema" not in names]


def params(dtype=jnp.float32) -> dict:
  """Leaf shapes unlike any state scalar or K-vector, so that tests can tell the
  state's parameter-shaped leaves apart."""
  return {
    "w": jnp.linspace(-1.0, 1.0, 20, dtype=dtype).reshape(4, 5),
    "b": jnp.linspace(0.5, -1.0, 7, dtype=dtype),
  }


def grads(case: Case, step: int = 0, dtype=jnp.float32, like: Any = None) -> Any:
  """``case.n`` conflicting gradients shaped like :func:`params` (or ``like``),
  moving with step."""
  p = params(jnp.float32) if like is None else like
  out = []
  for i in range(case.n):
    sign = -1.0 if i % 2 else 1.0
    out.append(
      jax.tree.map(
        lambda x, i=i, sign=sign: (sign * (x + 0.3 * i + 0.1 * step) + 0.2 * (i + 1)).astype(dtype),
        p,
      )
    )
  return case.updates(out)


# On 8 devices (tests/test_sharding.py) the README's test command checks these
# aggregators (those whose rules differ most: no Gram matrix, the active set,
# random orders, the Newton solve, the shared-parameter wrapper); the slow tier
# checks every one.
QUICK_ON_DEVICES = {
  "aggregators.mean",
  "aggregators.mgda_ema",
  "aggregators.pcgrad_ema",
  "aggregators.upgrad_ema",
  "aggregators.nash_mtl_ema",
  "aggregators.on_shared",
}


def covered_on_devices(name, coverage):
  """Whether a catalogue case is checked at this coverage ("quick" or "full"):
  in quick, every transform that is not an aggregator and QUICK_ON_DEVICES."""
  return coverage == "full" or not name.startswith("aggregators.") or name in QUICK_ON_DEVICES
