"""The paper's Figure 2: projecting on a noisy main gradient drifts to Mixed.

Fix ``g_main, g_aux ~ N(0, I_p)`` with p = 100 and λ = 1. A mini-batch main
gradient is ``g_main + σ ε``. Without an EMA, the expected direction
``E[g_main + π(g_aux; g_main + σ ε)]`` goes from Bloop's full-batch direction
``g_main + π(g_aux; g_main)`` (σ → 0) to Mixed's ``g_main + (1 - 1/p) g_aux``
(σ → ∞); the paper reads the crossing near σ = 1, where the noise norm σ √p
matches ‖g_main‖ ≈ √p. With an EMA of rate ρ = 1 - ema_decay, the projection
vector averages many draws, so the expected direction stays near Bloop's for
larger σ. The EMA runs through ``bloop_optax.bloop`` itself (update_first),
vmapped over independent chains.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import bloop_optax

P = 100


def _project_out(a, p):
  return a - (a @ p) / (p @ p) * p


def expected_directions(sigmas, draws, ema_decays, chains, seed=0):
  """Returns the distances to Bloop's and Mixed's directions for every σ."""
  key_g, key_noise = jax.random.split(jax.random.key(seed))
  g_main, g_aux = jax.random.normal(key_g, (2, P))
  d_bloop = g_main + _project_out(g_aux, g_main)
  d_mixed = g_main + (1 - 1 / P) * g_aux
  out = {
    "distance_bloop_mixed": float(jnp.linalg.norm(d_bloop - d_mixed)),
    "curves": {},
  }

  @jax.jit
  def no_ema(sigma, key):
    noise = jax.random.normal(key, (draws, P))
    proj = jax.vmap(lambda m: _project_out(g_aux, m))(g_main + sigma * noise)
    return g_main + proj.mean(axis=0)

  def with_ema(ema_decay, steps):
    tx = bloop_optax.bloop(aux_weight=1.0, ema_decay=ema_decay)

    def chain(sigma, key):
      def step(state, k):
        m = g_main + sigma * jax.random.normal(k, (P,))
        d, state = tx.update(bloop_optax.MainAux(m, g_aux), state)
        # D = M + λ(A - rP) and E[M] = g_main exactly: averaging D - M +
        # g_main removes the first term's sampling noise, not its mean.
        return state, d - m + g_main

      _, ds = jax.lax.scan(step, tx.init(g_main), jax.random.split(key, steps))
      return ds[-1]

    return jax.jit(lambda s, k: jax.vmap(chain, (None, 0))(s, jax.random.split(k, chains)).mean(0))

  curves = {"no EMA (ema_decay=0)": lambda s, k: no_ema(s, k)}
  for decay in ema_decays:
    curves[f"EMA, ema_decay={decay:g}"] = with_ema(decay, int(4 / (1 - decay)))
  for name, fn in curves.items():
    to_bloop, to_mixed = [], []
    for i, sigma in enumerate(sigmas):
      d = fn(jnp.float32(sigma), jax.random.fold_in(key_noise, i))
      to_bloop.append(float(jnp.linalg.norm(d - d_bloop)))
      to_mixed.append(float(jnp.linalg.norm(d - d_mixed)))
    out["curves"][name] = {"to_bloop": to_bloop, "to_mixed": to_mixed}
  return out


def run(out_dir: pathlib.Path, quick: bool = False) -> str:
  """Runs the Monte Carlo, writes the plot and JSON, returns the table."""
  sigmas = np.logspace(-1, 2, 13)
  draws, chains = (2_000, 200) if quick else (100_000, 4_000)
  result = expected_directions(sigmas, draws, ema_decays=(0.9, 0.99), chains=chains)
  result.update(sigmas=sigmas.tolist(), draws=draws, chains=chains, p=P)
  result["protocol"] = {
    "figure": "2 (Monte Carlo on the projection bias)",
    "setup": f"p = {P}, g_main and g_aux ~ N(0, I) fixed, lambda = 1, batch gradient"
    " g_main + sigma N(0, I)",
    "sigmas": "13 values, logspace(-1, 2)",
    "ema_decay": "0 (no EMA), 0.9, 0.99 (through bloop_optax.bloop, update_first)",
    "draws": draws,
    "chains": chains,
    "seed": 0,
  }
  (out_dir / "monte_carlo.json").write_text(json.dumps(result))
  _plot(result, out_dir / "monte_carlo.png")

  names = list(result["curves"])
  lines = [
    "== monte_carlo (Figure 2): distance of the expected direction to Bloop's / Mixed's",
    f"   (p = {P}, {draws} draws without EMA, {chains} chains with EMA;"
    f" |d_bloop - d_mixed| = {result['distance_bloop_mixed']:.3f})",
    f"{'sigma':>8}" + "".join(f"{n:>34}" for n in names),
  ]
  for i, sigma in enumerate(sigmas):
    cells = "".join(
      f"{result['curves'][n]['to_bloop'][i]:>17.3f}{result['curves'][n]['to_mixed'][i]:>17.3f}"
      for n in names
    )
    lines.append(f"{sigma:>8.3g}{cells}")
  lines.append("   (each curve: to_bloop, to_mixed)")
  lines.append(f"wrote {out_dir / 'monte_carlo.png'} and {out_dir / 'monte_carlo.json'}\n")
  return "\n".join(lines)


def _plot(result, path):
  from matplotlib.figure import Figure  # no pyplot: leaves the global backend alone

  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  sig = result["sigmas"]
  for c, (name, curve) in enumerate(result["curves"].items()):
    color = f"C{c}"
    ax.plot(sig, curve["to_bloop"], color=color, marker="o", ms=3, label=f"{name}: to Bloop")
    ax.plot(
      sig,
      curve["to_mixed"],
      color=color,
      ls="--",
      marker="x",
      ms=3,
      label=f"{name}: to Mixed",
    )
  ax.set_xscale("log")
  ax.set_xlabel("main-gradient noise σ")
  ax.set_ylabel("distance of the expected direction")
  ax.set_title("Projection on a noisy gradient drifts to Mixed; an EMA holds it")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
