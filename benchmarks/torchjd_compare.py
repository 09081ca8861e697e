"""Every aggregator that TorchJD also has, against TorchJD, on random matrices.

TorchJD (PyTorch) is the reference implementation of Jacobian descent; this
script runs it and ``bloop_optax.aggregators`` on the same random K x P
matrices in float64 and records the largest difference of the aggregated
direction, relative to the largest entry of the matrix. It needs PyTorch and
TorchJD, which neither the library nor its tests install; set up a separate
environment:

  python3 -m venv .venv-torchjd
  .venv-torchjd/bin/pip install -e . torch "torchjd[quadprog_projector,cagrad]==0.18.0"
  .venv-torchjd/bin/python -m benchmarks.torchjd_compare

Two TorchJD settings are compared: its defaults (MGDA's Frank-Wolfe stops at a
step below 1e-3; UPGrad and CAGrad normalise the Gram matrix and UPGrad adds
1e-4 to its diagonal), and tight ones that remove those approximations (MGDA
1e-12 and 100,000 iterations; UPGrad without normalisation epsilon and with a
1e-12 ridge; CAGrad norm_eps 1e-12), which show the remaining difference of the
solvers themselves. PCGrad's random orders are drawn with torch's generator and
passed to ``pcgrad_weights``, so both visit the objectives in the same order.

For K <= 5 both are also measured against the exact answer of the test
suite's NumPy reference (``tests/reference_mtl.py``, which enumerates every
face of the constrained problems), so a difference can be attributed.
"""

import argparse
import json
import pathlib
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bloop_optax import aggregators as agg  # noqa: E402
from tests import reference_mtl  # noqa: E402

SHAPES = [(2, 10), (3, 2), (3, 50), (5, 4), (5, 100), (8, 6), (8, 1000)]


def torchjd_aggregators(tight):
  from torchjd import aggregation as tj
  from torchjd._linalg import QuadprogProjector

  if tight:
    return {
      "mean": tj.Mean(),
      "mgda": tj.MGDA(epsilon=1e-12, max_iters=100_000),
      "pcgrad": tj.PCGrad(),
      "cagrad": tj.CAGrad(c=0.5, norm_eps=1e-12),
      "imtl_g": tj.IMTLG(),
      "aligned_mtl": tj.AlignedMTL(),
      "upgrad": tj.UPGrad(projector=QuadprogProjector(norm_eps=0.0, reg_eps=1e-12)),
    }
  return {
    "mean": tj.Mean(),
    "mgda": tj.MGDA(),
    "pcgrad": tj.PCGrad(),
    "cagrad": tj.CAGrad(c=0.5),
    "imtl_g": tj.IMTLG(),
    "aligned_mtl": tj.AlignedMTL(),
    "upgrad": tj.UPGrad(),
  }


def ours(name, gram, orders):
  if name == "pcgrad":
    return agg.pcgrad_weights(gram, orders)
  if name == "cagrad":
    return agg.cagrad_weights(gram, 0.5)
  return getattr(agg, f"{name}_weights")(gram)


def compare(trials, seed):
  import torch

  rules = {
    name: jax.jit(lambda g, o, name=name: ours(name, g, o)) for name in torchjd_aggregators(False)
  }
  rng = np.random.default_rng(seed)
  results = {}
  for tight in (False, True):
    setting = "tight" if tight else "default"
    theirs = torchjd_aggregators(tight)
    for name, aggregator in theirs.items():
      worst, worst_case, failures = 0.0, None, 0
      ours_exact, theirs_exact = 0.0, 0.0
      for k, p in SHAPES:
        for trial in range(trials):
          jac = rng.standard_normal((k, p)) * rng.uniform(0.1, 10, size=(k, 1))
          if trial % 3 == 1:
            jac[1] = -0.5 * jac[0] + 0.3 * rng.standard_normal(p)  # conflict
          torch.manual_seed(trial)
          orders = np.stack([torch.randperm(k).numpy() for _ in range(k)])
          torch.manual_seed(trial)  # TorchJD's PCGrad draws the same orders
          try:
            got_theirs = aggregator(torch.from_numpy(jac)).numpy()
          except ValueError:
            failures += 1  # quadprog refuses a singular problem
            continue
          w = rules[name](jnp.asarray(jac @ jac.T), jnp.asarray(orders))
          diff = np.abs(np.asarray(w) @ jac - got_theirs).max() / np.abs(jac).max()
          if diff > worst:
            worst, worst_case = float(diff), [k, p, trial]
          if k <= 5 and (name != "imtl_g" or np.linalg.matrix_rank(jac) == k):
            args = (orders,) if name == "pcgrad" else (0.5,) if name == "cagrad" else ()
            exact = getattr(reference_mtl, name)(jac, *args)
            scale = np.abs(jac).max()
            ours_exact = max(ours_exact, np.abs(np.asarray(w) @ jac - exact).max() / scale)
            theirs_exact = max(theirs_exact, np.abs(got_theirs - exact).max() / scale)
      results[f"{name}/{setting}"] = {
        "largest_relative_difference": worst,
        "at_k_p_trial": worst_case,
        "torchjd_failures": failures,
        "ours_vs_exact_k_le_5": float(ours_exact),
        "torchjd_vs_exact_k_le_5": float(theirs_exact),
      }
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(
    description="Compare bloop_optax.aggregators with TorchJD on random matrices (float64).",
  )
  parser.add_argument("--trials", type=int, default=20, help="random matrices per shape")
  parser.add_argument("--seed", type=int, default=0, help="seed of the random matrices")
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=pathlib.Path("benchmarks/results/torchjd_comparison.json"),
    help="where to write the JSON",
  )
  args = parser.parse_args(argv)
  import torch
  import torchjd

  start = time.perf_counter()
  results = compare(args.trials, args.seed)
  report = {
    "torch": torch.__version__,
    "torchjd": getattr(torchjd, "__version__", None) or _version("torchjd"),
    "jax": jax.__version__,
    "shapes_k_p": SHAPES,
    "trials_per_shape": args.trials,
    "metric": "max |d_ours - d_torchjd| / max |J|, float64",
    "results": results,
  }
  print("max |d - d'| / max |J| over all matrices (exact: K <= 5, tests/reference_mtl.py)")
  head = ["ours-TorchJD", "TorchJD-exact", "ours-exact"]
  print(
    f"{'aggregator':<12} "
    + " ".join(f"{h + ' ' + s:>22}" for s in ("default", "tight") for h in head[:2])
    + f" {head[2]:>12}"
  )
  for name in torchjd_aggregators(False):
    row = [results[f"{name}/{s}"] for s in ("default", "tight")]
    cells = []
    for r in row:
      cells += [r["largest_relative_difference"], r["torchjd_vs_exact_k_le_5"]]
    fails = sum(r["torchjd_failures"] for r in row)
    note = f"   TorchJD failed on {fails} matrices" if fails else ""
    print(
      f"{name:<12} "
      + " ".join(f"{c:>22.2e}" for c in cells)
      + f" {row[1]['ours_vs_exact_k_le_5']:>12.2e}{note}"
    )
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(report, indent=1))
  print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


def _version(dist):
  from importlib import metadata

  return metadata.version(dist)


if __name__ == "__main__":
  main()
