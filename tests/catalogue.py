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
      lambda: bloop_optax.bloop(0.3, 0.9),
      2,
      bloop_optax.bloop,
      {"aux_weight": 0.3, "ema_decay": 0.9},
    ),
    Case(
      "bloop_project_first",
      lambda: bloop_optax.bloop(0.3, 0.9, ema_order="project_first"),
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
    Case("pcgrad", lambda: bloop_optax.pcgrad(0.3), 2, bloop_optax.pcgrad, {"aux_weight": 0.3}),
    Case(
      "hierarchical_bloop",
      lambda: bloop_optax.hierarchical_bloop((0.3, 0.1), 0.9),
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
      lambda: bloop_optax.multi_steps(bloop_optax.bloop(0.3, 0.9), every_k=2),
      2,
    ),
    Case(
      "partition",
      lambda: bloop_optax.partition(
        {"a": bloop_optax.bloop(0.3, 0.9), "b": bloop_optax.mixed(0.3)},
        lambda p: {k: "b" if k == "b" else "a" for k in p},
      ),
      2,
    ),
    Case(
      "aggregators.mean",
      lambda: aggregators.mean(3),
      3,
      aggregators.mean,
      {"num_objectives": 3},
      ("num_objectives",),
    ),
  ]
  for name in ("mgda", "pcgrad", "cagrad", "imtl_g", "aligned_mtl", "upgrad", "dualproj", "config"):
    factory = getattr(aggregators, name)
    # DualProj and ConFIG share every code path but the rule with the others:
    # their EMA variant (the superset) is enough here.
    for decay in (0.9,) if name in ("dualproj", "config") else (None, 0.9):
      suffix = "" if decay is None else "_ema"
      hyper = {"num_objectives": 3, "ema_decay": decay}
      static = ("num_objectives",) + (("ema_decay",) if decay is None else ())
      cases.append(
        Case(
          f"aggregators.{name}{suffix}",
          lambda f=factory, d=decay: f(3, ema_decay=d),
          3,
          factory,
          hyper,
          static,
        )
      )
  cases += [
    Case(
      "aggregators.krum",
      lambda: aggregators.krum(3, n_selected=2),
      3,
      aggregators.krum,
      {"num_objectives": 3, "n_byzantine": 0, "n_selected": 2},
      ("num_objectives", "n_byzantine", "n_selected"),
    ),
    Case(
      "aggregators.random",
      lambda: aggregators.random(3, key=2),
      3,
      aggregators.random,
      {"num_objectives": 3, "key": 2},
      ("num_objectives",),
    ),
    Case(
      "aggregators.nash_mtl_ema",
      lambda: aggregators.nash_mtl(3, ema_decay=0.9),
      3,
      aggregators.nash_mtl,
      {"num_objectives": 3, "max_norm": 1.0, "ema_decay": 0.9},
      ("num_objectives",),
    ),
    Case(
      "aggregators.fairgrad",
      lambda: aggregators.fairgrad(3, 2.0),
      3,
      aggregators.fairgrad,
      {"num_objectives": 3, "alpha": 2.0},
      ("num_objectives",),
    ),
    Case(
      "aggregators.gradvac",
      lambda: aggregators.gradvac(3, 0.5, key=1),
      3,
      aggregators.gradvac,
      {"num_objectives": 3, "target_decay": 0.5, "key": 1},
      ("num_objectives",),
    ),
    Case(
      "aggregators.moco",
      lambda: aggregators.moco(3, 0.9, 0.2),
      3,
      aggregators.moco,
      {"num_objectives": 3, "ema_decay": 0.9, "step_size": 0.2, "rho": 0.0},
      ("num_objectives",),
    ),
    Case(
      "aggregators.cr_mogm",
      lambda: aggregators.cr_mogm(aggregators.upgrad(3, ema_decay=0.9), decay=0.8),
      3,
      lambda decay: aggregators.cr_mogm(aggregators.upgrad(3, ema_decay=0.9), decay),
      {"decay": 0.8},
      (),
    ),
    Case(
      "aggregators.constant",
      lambda: aggregators.constant((1.0, 0.5, 2.0)),
      3,
      aggregators.constant,
      {"weights": (1.0, 0.5, 2.0)},
      ("weights",),
    ),
  ]
  return cases


CASES = _cases()
IDS = [c.name for c in CASES]


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
