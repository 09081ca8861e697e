"""One of two JAX processes (4 CPU devices each, gloo collectives) training on
one global 8-device mesh. Run by tests/test_multiprocess.py as

  python multiprocess_worker.py PROCESS_ID PORT CHECKPOINT_DIR

Process 0 prints one JSON object on stdout: the largest difference from the
same steps on one local device, whether the EMAs keep the params' sharding, the
collectives of each compiled update, and whether a checkpoint saved by both
processes resumes bit for bit.
"""

import os

if __name__ == "__main__":  # before JAX starts; never when pytest imports this file
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bloop_optax  # noqa: E402
from bloop_optax import aggregators  # noqa: E402

# jax.set_mesh, or jax.sharding.use_mesh as jax 0.6 names it.
SET_MESH = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
SHAPES = {"w": (64, 6), "v": (8 * 5,), "b": (3,)}
SPECS = {"w": P("data", None), "v": P("data"), "b": P()}
ALL_REDUCE = re.compile(
  r"all-reduce(?:-start)?\(.*?replica_groups=(.*?), (?:use_global_device_ids|to_apply|channel_id)"
)


def data(seed, n):
  """The same numbers in both processes: ``n`` trees shaped like the params."""
  rng = np.random.default_rng(seed)
  return [
    {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(n)
  ]


def main(process, checkpoints):
  mesh = jax.make_mesh((8,), ("data",))
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  shard = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}

  def global_tree(tree):
    return {
      k: jax.make_array_from_callback(v.shape, shard[k], lambda idx, v=v: v[idx])
      for k, v in tree.items()
    }

  local = jax.local_devices()[0]
  params = data(0, 1)[0]
  report = {
    "transforms": {},
    "processes_of_devices": sorted({d.process_index for d in jax.devices()}),
  }
  cases = [
    ("bloop", bloop_optax.bloop(0.7, ema_decay=0.8), 2),
    ("hierarchical_bloop", bloop_optax.hierarchical_bloop((0.5, 0.3), ema_decay=0.8), 3),
    ("aggregators.upgrad_ema", aggregators.upgrad(3, ema_decay=0.8), 3),
    ("aggregators.mgda", aggregators.mgda(3), 3),
  ]
  for name, surgery, k in cases:
    tx = optax.chain(surgery, optax.adam(1e-2))
    steps = [data(10 + s, k) for s in range(4)]
    pack = (lambda g: bloop_optax.MainAux(*g)) if k == 2 else tuple

    def run(put, tx=tx, steps=steps, pack=pack):
      update = jax.jit(tx.update)
      p = put(params)
      state = jax.jit(tx.init)(p)
      for grads in steps:
        d, state = update(pack([put(g) for g in grads]), state, p)
        p = optax.apply_updates(p, d)
      return p, state, update

    p1, _, _ = run(lambda t: jax.device_put(t, local))
    with SET_MESH(mesh):
      p8, s8, update = run(global_tree)
      hlo = update.lower(pack([global_tree(g) for g in steps[0]]), s8, global_tree(params))
      hlo = hlo.compile().as_text()
    gathered = multihost_utils.process_allgather(p8, tiled=True)
    emas = [x for x in jax.tree.leaves(s8) if getattr(x, "ndim", 0) and x.shape in {(64, 6), (40,)}]
    report["transforms"][name] = {
      "params_max_diff": max(
        float(np.max(np.abs(np.asarray(gathered[key]) - np.asarray(p1[key])))) for key in SHAPES
      ),
      "state_sharded_over_8": bool(emas) and all(len(x.sharding.device_set) == 8 for x in emas),
      "all_reduce_groups": ALL_REDUCE.findall(hlo),
      "collective_ops": sorted(
        set(re.findall(r"(all-gather|reduce-scatter|all-to-all|collective-permute)\(", hlo))
      ),
      "all_reduce_shapes": re.findall(r"=\s*(\S.*?)\s+all-reduce(?:-start)?\(", hlo),
    }
  with SET_MESH(mesh):
    report["checkpoint"] = checkpoint_resumes(global_tree, params, checkpoints)
  if process == 0:
    print(json.dumps(report))


def checkpoint_resumes(global_tree, params, checkpoints):
  """Both processes save the sharded optimizer state with orbax, restore it
  into tx.init's template and continue: equal, bit for bit, to not stopping."""
  try:
    import orbax.checkpoint as ocp
  except ImportError:
    return "orbax not installed"
  tx = optax.chain(bloop_optax.bloop(0.7, ema_decay=0.8), optax.adam(1e-2))
  update = jax.jit(tx.update)
  steps = [data(40 + s, 2) for s in range(4)]
  p = global_tree(params)

  def go(p, state, grads_list):
    for g in grads_list:
      d, state = update(bloop_optax.MainAux(*[global_tree(x) for x in g]), state, p)
      p = optax.apply_updates(p, d)
    return p, state

  p_mid, s_mid = go(p, jax.jit(tx.init)(p), steps[:2])
  p_end, s_end = go(p_mid, s_mid, steps[2:])
  checkpointer = ocp.StandardCheckpointer()
  path = os.path.join(checkpoints, "state")
  checkpointer.save(path, {"params": p_mid, "opt_state": s_mid})
  checkpointer.wait_until_finished()
  template = {"params": p_mid, "opt_state": jax.jit(tx.init)(p_mid)}
  restored = checkpointer.restore(path, template)
  p_res, s_res = go(restored["params"], restored["opt_state"], steps[2:])
  same = jax.tree.map(
    lambda a, b: bool(
      np.array_equal(
        multihost_utils.process_allgather(a, tiled=True),
        multihost_utils.process_allgather(b, tiled=True),
      )
    ),
    (p_res, s_res),
    (p_end, s_end),
  )
  return all(jax.tree.leaves(same))


if __name__ == "__main__":
  process, port, checkpoints = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process)
  main(process, checkpoints)
  jax.distributed.shutdown()
