"""Table 3: N devices with the params sharded; time per step against Mixed, and
the collectives each step runs."""

from benchmarks.speed import _common as common


def _scaling_at(per_device, rounds, inner):
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  import optax

  import bloop_optax

  devices = jax.device_count()
  mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

  def put(tree):
    def one(x):
      spec = P("data") if x.shape[0] % devices == 0 else P()
      return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(one, tree)

  params = put(common.params_tree(per_device * devices))
  pair = bloop_optax.MainAux(
    put(common.params_tree(per_device * devices, 1)),
    put(common.params_tree(per_device * devices, 2)),
  )
  fns, hlo_ops = {}, {}
  for name, tx in (
    ("mixed+adam", optax.chain(bloop_optax.mixed(0.1), optax.adam(1e-3))),
    ("bloop+adam", optax.chain(bloop_optax.bloop(0.1, ema_decay=0.99), optax.adam(1e-3))),
  ):
    _, jitted, init, call = common.optimizer_step(tx, params, pair, jax.jit(tx.init))
    fns[name] = (init, call)
    hlo_ops[name] = common.collectives(jitted.lower(*init()).compile().as_text())
  times = common.time_interleaved(fns, rounds, inner)
  return [
    {
      "devices": devices,
      "params_per_device": per_device,
      "variant": name,
      "seconds": t,
      "ratio_to_mixed_adam": t / times["mixed+adam"],
      "collectives": hlo_ops[name],
    }
    for name, t in times.items()
  ]


def scaling(sizes_per_device, rounds, inner):
  """Table 3: N devices, params sharded; time per step and collectives."""
  return [row for n in sizes_per_device for row in _scaling_at(n, rounds, inner)]
