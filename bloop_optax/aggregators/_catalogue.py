"""Every aggregator of :mod:`bloop_optax.aggregators`, with what a caller must know to
build and check it: its required arguments, its weight rule and its properties.

The tests (contract, export, sharding, the per-rule checks) and the benchmarks
(speed, the multi-objective comparisons) read this table, so a rule added here
is held to the contract and measured without further lists.
"""

from collections.abc import Callable
import dataclasses
from typing import Any

import optax

from bloop_optax import aggregators


@dataclasses.dataclass(frozen=True)
class Entry:
  """One aggregator.

  Attributes:
    name: its factory's name in :mod:`bloop_optax.aggregators`.
    required: the arguments after ``num_objectives`` that have no default, with
      the value a standard instance uses (FairGrad's ``alpha``).
    ema: whether it takes ``ema_decay`` (``"required"``: MoCo, whose tracked
      gradients are its EMAs).
    keyed: whether it draws random numbers (a ``key``).
    scale_invariant: whether its weights are unchanged when every gradient is
      scaled by one positive number.
    reads_gram: whether its weights depend on the gradients at all.
    min_objectives: the smallest K it accepts.
    rule: the name of its weight rule on a Gram matrix (``None``: none of its own).
  """

  name: str
  required: dict[str, Any] = dataclasses.field(default_factory=dict)
  ema: bool | str = True
  keyed: bool = False
  scale_invariant: bool = True
  reads_gram: bool = True
  min_objectives: int = 1
  rule: str | None = None

  @property
  def factory(self) -> Callable[..., optax.GradientTransformationExtraArgs]:
    return getattr(aggregators, self.name)

  def make(self, num_objectives: int, **options: Any) -> optax.GradientTransformationExtraArgs:
    """A standard instance for K objectives; ``options`` are its keyword arguments."""
    return self.factory(num_objectives, **self.required, **options)


ENTRIES: tuple[Entry, ...] = (
  Entry("mean", ema=False, reads_gram=False, rule="mean_weights"),
  Entry("mgda", rule="mgda_weights"),
  Entry("pcgrad", keyed=True, rule="pcgrad_weights"),
  Entry("cagrad", rule="cagrad_weights"),
  Entry("imtl_g", rule="imtl_g_weights"),
  Entry("aligned_mtl", rule="aligned_mtl_weights"),
  Entry("upgrad", rule="upgrad_weights"),
  Entry("dualproj", rule="dualproj_weights"),
  Entry("config", rule="config_weights"),
  Entry("db_mtl", rule="db_mtl_weights"),
  Entry("krum", min_objectives=3, rule="krum_weights"),
  Entry("nash_mtl", scale_invariant=False, rule="nash_mtl_weights"),
  Entry("fairgrad", required={"alpha": 2.0}, scale_invariant=False, rule="fairgrad_weights"),
  Entry("gradvac", keyed=True, rule="gradvac_weights"),
  Entry("moco", ema="required", rule="moco_weights"),
  Entry("random", ema=False, keyed=True, reads_gram=False, rule="random_weights"),
)
"""The aggregators that take ``num_objectives`` first. :func:`~bloop_optax.aggregators.constant`
(fixed weights, given with K) and :func:`~bloop_optax.aggregators.cr_mogm` (a wrapper of
another aggregator) are built by hand where a check needs them."""

BY_NAME: dict[str, Entry] = {e.name: e for e in ENTRIES}


def gram_based() -> list[Entry]:
  """The entries whose weights are decided from the Gram matrix."""
  return [e for e in ENTRIES if e.reads_gram]
