"""Speed and memory of the surgery against the alternatives, as ratios.

Usage (from the repository root)::

  python -m benchmarks.speed            # optimizer step (8 and ~200 leaves)
  python -m benchmarks.speed --full-step  # whole training steps: Bloop against Mixed
  python -m benchmarks.speed --quick    # small sizes, few rounds (smoke test)
  python -m benchmarks.speed --devices 8  # the 8-device scaling table (CPU) instead
  python -m benchmarks.speed --aggregators  # K-objective aggregators vs mean, instead

Every comparison is measured in one process, interleaving the variants round
by round (so machine noise hits all of them alike), with donated buffers, and
reported as the median over rounds divided by the baseline's median. Beside
the times, each optimizer-step row gives what a noisy machine cannot move:
XLA's cost-analysis bytes per parameter and the number of fusions, both for
the executed path of an ordinary step (the overflow branch of the surgery
stubbed out; it runs only when a float32 sum overflows) and for the whole
program. Results go to ``benchmarks/results/speed_<backend>.json``. Nothing
here is asserted.

Modules: ``optimizer`` (the optimizer step), ``aggregators`` (K objectives),
``full_step`` (whole training steps), ``scaling`` (sharded devices), and
``_common`` (parameters, the jitted step, timing, cost figures) they share.
"""

from benchmarks.speed._common import hlo_stats
from benchmarks.speed._common import naive_bloop
from benchmarks.speed._common import overflow_branch_stubbed

__all__ = ("hlo_stats", "naive_bloop", "overflow_branch_stubbed")
