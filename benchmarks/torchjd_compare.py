r"""Every aggregator that TorchJD also has, against TorchJD, on random matrices.

TorchJD (PyTorch) is the reference implementation of Jacobian descent; this
script runs it and ``bloop_optax.aggregators`` on the same random K x P
matrices in float64 and records the largest difference of the aggregated
direction, relative to the largest entry of the matrix. It needs PyTorch and
TorchJD, which neither the library nor its tests install; set up a separate
environment:

  python3 -m venv .venv-torchjd
  .venv-torchjd/bin/pip install -e . torch ecos \
    "torchjd[full]==0.18.0"
  .venv-torchjd/bin/python -m benchmarks.torchjd_compare

Two TorchJD settings are compared: its defaults (MGDA's Frank-Wolfe stops at a
step below 1e-3; UPGrad and CAGrad normalise the Gram matrix and UPGrad adds
1e-4 to its diagonal), and tight ones that remove those approximations (MGDA
1e-12 and 100,000 iterations; UPGrad without normalisation epsilon and with a
1e-12 ridge; CAGrad norm_eps 1e-12), which show the remaining difference of the
solvers themselves (and for DualProj the same projector settings as UPGrad's;
for GradVac its epsilon 1e-8 against none). PCGrad's and GradVac's random
orders are drawn with torch's generator and passed to ``pcgrad_weights`` and
``gradvac_weights``, so both visit the objectives in the same order. GradVac is
stateful: one instance per shape sees that shape's matrices in turn, and ours
carries its cosine targets along. Nash-MTL (TorchJD's port of the authors'
code: at most 20 convex sub-problems, warm-started, stopping at a residual of
1e-3; ``max_norm`` 1) is made anew for each matrix, as its state is the
previous answer. FairGrad uses alpha = 2 (TorchJD: SciPy's ``least_squares``
with its default tolerances, no ridge; ours: the default ridge 1e-6). Krum keeps
one gradient with no Byzantine ones (K >= 3), Constant has weights
``(1 .. K) / K``, Sum is ``constant(K, ones)``. TorchJD's Random draws from torch's
generator and is not compared. CR-MOGM wraps UPGrad (decay 0.5): our transform,
its state carried over each shape's matrices, against TorchJD's ``CRMOGMWeighting``
of ``UPGradWeighting`` (default and exact projector), on matrices from a
second generator so the other rules' matrices do not change; it has no exact
column (the weights depend on the history). PCD (Priority-Constrained Descent,
tau 0.3, the first row primary) is stateful too: ``bloop_optax.pcd`` with its
state carried over each shape's matrices, against TorchJD's ``PCD`` and
against the brute-force reference ``tests/reference_pcd.py`` with the same
history, on matrices from a third generator. MoCo is not in TorchJD.

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

import bloop_optax  # noqa: E402
from bloop_optax import aggregators as agg  # noqa: E402
from bloop_optax.aggregators import _catalogue  # noqa: E402
from tests import reference_mtl  # noqa: E402
from tests import reference_pcd  # noqa: E402

SHAPES = [(2, 10), (3, 2), (3, 50), (5, 4), (5, 100), (8, 6), (8, 1000)]


def torchjd_aggregators(tight):
  """name -> (K -> a TorchJD aggregator); the stateful ones are made anew per
  shape (GradVac) or per matrix (Nash-MTL)."""
  import torch
  from torchjd import aggregation as tj
  from torchjd._linalg import QuadprogProjector

  def fixed(aggregator):
    return lambda k: aggregator

  exact_qp = QuadprogProjector(norm_eps=0.0, reg_eps=1e-12)
  common = {
    "mean": fixed(tj.Mean()),
    "pcgrad": fixed(tj.PCGrad()),
    "imtl_g": fixed(tj.IMTLG()),
    "aligned_mtl": fixed(tj.AlignedMTL()),
    "config": fixed(tj.ConFIG()),
    "krum": fixed(tj.Krum(n_byzantine=0, n_selected=1)),
    "nash_mtl": lambda k: tj.NashMTL(n_tasks=k, max_norm=1.0),
    "fairgrad": fixed(tj.FairGrad(alpha=FAIRGRAD_ALPHA)),
    "constant": lambda k: tj.Constant(torch.arange(1, k + 1, dtype=torch.float64) / k),
    "sum": fixed(tj.Sum()),
    "pcd": lambda k: tj.PCD(tau=PCD_TAU),
  }

  def cr_mogm(projector):
    upgrad = tj.UPGradWeighting() if projector is None else tj.UPGradWeighting(projector=projector)
    return lambda k: tj.GramianWeightedAggregator(tj.CRMOGMWeighting(upgrad, alpha=CR_MOGM_DECAY))

  if tight:
    return common | {
      "mgda": fixed(tj.MGDA(epsilon=1e-12, max_iters=100_000)),
      "cagrad": fixed(tj.CAGrad(c=0.5, norm_eps=1e-12)),
      "upgrad": fixed(tj.UPGrad(projector=exact_qp)),
      "dualproj": fixed(tj.DualProj(projector=exact_qp)),
      "gradvac": lambda k: tj.GradVac(beta=0.5, eps=0.0),
      "cr_mogm": cr_mogm(exact_qp),
    }
  return common | {
    "mgda": fixed(tj.MGDA()),
    "cagrad": fixed(tj.CAGrad(c=0.5)),
    "upgrad": fixed(tj.UPGrad()),
    "dualproj": fixed(tj.DualProj()),
    "gradvac": lambda k: tj.GradVac(beta=0.5),
    "cr_mogm": cr_mogm(None),
  }


FAIRGRAD_ALPHA = _catalogue.BY_NAME["fairgrad"].required["alpha"]  # the authors' usual choice
CR_MOGM_DECAY = 0.5  # CR-MOGM over UPGrad: the weight on the old weights (TorchJD's alpha)
PCD_TAU = 0.3
STATEFUL = ("cr_mogm", "pcd")  # our transform with its state carried over a shape's matrices
MIN_K = {"krum": 3}  # Krum needs K >= n_byzantine + 3


def ours(name, gram, orders, targets):
  """Our weights (and GradVac's new targets) on the Gram matrix."""
  k = gram.shape[0]
  if name == "pcgrad":
    return agg.pcgrad_weights(gram, orders), targets
  if name == "gradvac":
    # TorchJD's beta is the weight on the new cosine: target_decay = 1 - beta.
    return agg.gradvac_weights(gram, targets, orders, target_decay=0.5)
  if name == "cagrad":
    return agg.cagrad_weights(gram, c=0.5), targets
  if name == "krum":
    return agg.krum_weights(gram, n_byzantine=0, n_selected=1), targets
  if name == "nash_mtl":
    return agg.nash_mtl_weights(gram, max_norm=1.0), targets
  if name == "fairgrad":
    return agg.fairgrad_weights(gram, FAIRGRAD_ALPHA), targets
  if name == "constant":
    return agg.constant_weights(gram, jnp.arange(1, k + 1) / k), targets
  if name == "sum":
    return agg.constant_weights(gram, jnp.ones(k)), targets
  return getattr(agg, f"{name}_weights")(gram), targets


def exact(name, jac, orders, targets):
  k = len(jac)
  if name == "pcgrad":
    return reference_mtl.pcgrad(jac, orders)
  if name == "gradvac":
    return reference_mtl.gradvac(jac, targets, orders, 0.5)[0]
  if name == "cagrad":
    return reference_mtl.cagrad(jac, 0.5)
  if name == "krum":
    return reference_mtl.krum(jac, 0, 1)
  if name == "nash_mtl":
    return reference_mtl.nash_mtl(jac, max_norm=1.0)
  if name == "fairgrad":
    return reference_mtl.fairgrad(jac, FAIRGRAD_ALPHA)
  if name == "constant":
    return np.arange(1, k + 1) / k @ jac
  if name == "sum":
    return jac.sum(axis=0)
  return getattr(reference_mtl, name)(jac)


def torch_orders(k):
  """The visiting orders TorchJD's PCGrad and GradVac draw after a reseed: per
  objective, PCGrad a permutation of all, GradVac one of the others."""
  import torch

  pc = np.stack([torch.randperm(k).numpy() for _ in range(k)])
  return pc


def gradvac_orders(k):
  import torch

  rows = []
  for i in range(k):
    others = [j for j in range(k) if j != i]
    perm = torch.randperm(len(others)).tolist()
    rows.append([i] + [others[t] for t in perm])  # i is skipped
  return np.asarray(rows)


def compare(trials, seed, only=None):
  import torch

  rules = {
    name: jax.jit(lambda g, o, t, name=name: ours(name, g, o, t))
    for name in torchjd_aggregators(False)
    if name not in STATEFUL
  }
  rng = np.random.default_rng(seed)
  # CR-MOGM draws from its own generator, so the other rules see the same
  # matrices with or without it.
  rng_cr_mogm = np.random.default_rng(seed + 1)
  rng_pcd = np.random.default_rng(seed + 2)
  results = {}
  for tight in (False, True):
    setting = "tight" if tight else "default"
    for name, make in torchjd_aggregators(tight).items():
      if only is not None and name not in only:
        continue
      worst, worst_case, failures = 0.0, None, 0
      ours_exact, theirs_exact = 0.0, 0.0
      for k, p in SHAPES:
        if k < MIN_K.get(name, 1):
          continue
        aggregator = make(k)
        targets = np.zeros((k, k))  # GradVac's, carried over the trials of a shape
        source = {"cr_mogm": rng_cr_mogm, "pcd": rng_pcd}.get(name, rng)
        if name in STATEFUL:  # the transform itself, its state carried over the shape
          stateful = (
            agg.cr_mogm(agg.upgrad(k), weights_decay=CR_MOGM_DECAY)
            if name == "cr_mogm"
            else bloop_optax.pcd(PCD_TAU, num_objectives=k)
          )
          stateful_state = stateful.init(jnp.zeros(p))
          stateful_update = jax.jit(stateful.update)
          pcd_exact = reference_pcd.PCD(PCD_TAU)
        for trial in range(trials):
          jac = source.standard_normal((k, p)) * source.uniform(0.1, 10, size=(k, 1))
          if trial % 3 == 1:
            jac[1] = -0.5 * jac[0] + 0.3 * source.standard_normal(p)  # conflict
          torch.manual_seed(trial)
          orders = gradvac_orders(k) if name == "gradvac" else torch_orders(k)
          torch.manual_seed(trial)  # TorchJD draws the same orders
          if name == "nash_mtl":
            aggregator = make(k)  # stateful across calls: a fresh one per matrix
          try:
            got_theirs = aggregator(torch.from_numpy(jac)).numpy()
          except ValueError:
            failures += 1  # quadprog refuses a singular problem
            continue
          if name in STATEFUL:
            d, stateful_state = stateful_update(tuple(jnp.asarray(r) for r in jac), stateful_state)
            scale = np.abs(jac).max()
            diff = np.abs(np.asarray(d) - got_theirs).max() / scale
            if diff > worst:
              worst, worst_case = float(diff), [k, p, trial]
            if name == "pcd":  # the reference carries the same history
              want = pcd_exact(jac)
              if k <= 5:
                ours_exact = max(ours_exact, np.abs(np.asarray(d) - want).max() / scale)
                theirs_exact = max(theirs_exact, np.abs(got_theirs - want).max() / scale)
            continue  # CR-MOGM: no exact reference (the smoothed weights depend on the history)
          w, new_targets = rules[name](
            jnp.asarray(jac @ jac.T), jnp.asarray(orders), jnp.asarray(targets)
          )
          diff = np.abs(np.asarray(w) @ jac - got_theirs).max() / np.abs(jac).max()
          if diff > worst:
            worst, worst_case = float(diff), [k, p, trial]
          if k <= 5 and (name != "imtl_g" or np.linalg.matrix_rank(jac) == k):
            want = exact(name, jac, orders, targets)
            scale = np.abs(jac).max()
            ours_exact = max(ours_exact, np.abs(np.asarray(w) @ jac - want).max() / scale)
            theirs_exact = max(theirs_exact, np.abs(got_theirs - want).max() / scale)
          targets = np.asarray(new_targets)
      results[f"{name}/{setting}"] = {
        "largest_relative_difference": worst,
        "at_k_p_trial": worst_case,
        "torchjd_failures": failures,
        "ours_vs_exact_k_le_5": None if name == "cr_mogm" else float(ours_exact),
        "torchjd_vs_exact_k_le_5": None if name == "cr_mogm" else float(theirs_exact),
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
  parser.add_argument(
    "--rules",
    type=lambda text: text.split(","),
    default=None,
    help="compare only these rules (comma-separated) and update their rows of --out",
  )
  args = parser.parse_args(argv)
  import torch
  import torchjd

  start = time.perf_counter()
  results = compare(args.trials, args.seed, args.rules)
  versions = {
    "torch": torch.__version__,
    "torchjd": getattr(torchjd, "__version__", None) or _version("torchjd"),
    "jax": jax.__version__,
  }
  report = {
    **versions,
    "shapes_k_p": SHAPES,
    "trials_per_shape": args.trials,
    "metric": "max |d_ours - d_torchjd| / max |J|, float64",
    "results": results,
  }
  if args.rules is not None and args.out.exists():  # the other rules' rows stay as they were
    report = json.loads(args.out.read_text())
    report["results"].update(results)
    report.setdefault("rows_updated_later", {}).update({rule: versions for rule in args.rules})
    results = report["results"]
  print("max |d - d'| / max |J| over all matrices (exact: K <= 5, tests/reference_mtl.py)")
  head = ["ours-TorchJD", "TorchJD-exact", "ours-exact"]
  print(
    f"{'aggregator':<12} "
    + " ".join(f"{h + ' ' + s:>22}" for s in ("default", "tight") for h in head[:2])
    + f" {head[2]:>12}"
  )
  for name in torchjd_aggregators(False):
    if f"{name}/default" not in results:
      continue
    row = [results[f"{name}/{s}"] for s in ("default", "tight")]
    cells = []
    for r in row:
      cells += [r["largest_relative_difference"], r["torchjd_vs_exact_k_le_5"]]
    fails = sum(r["torchjd_failures"] for r in row)
    note = f"   TorchJD failed on {fails} matrices" if fails else ""
    show = lambda c, width: f"{c:>{width}.2e}" if c is not None else f"{'-':>{width}}"  # noqa: E731
    print(
      f"{name:<12} "
      + " ".join(show(c, 22) for c in cells)
      + f" {show(row[1]['ours_vs_exact_k_le_5'], 12)}{note}"
    )
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(report, indent=1))
  print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


def _version(dist):
  from importlib import metadata

  return metadata.version(dist)


if __name__ == "__main__":
  main()
