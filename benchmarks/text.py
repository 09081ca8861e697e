"""The paper's joint training on two datasets (Figure 5), with text from Python.

Main: next-byte prediction on the Python documentation topics that ship with
CPython (``pydoc_data.topics``, about 465k characters). Aux: next-byte
prediction on the Zen of Python (``this``, 856 characters): small and
different, so it overfits alone, as RCV-1 does in the paper. A tiny byte-level
decoder-only transformer in Flax linen (2 layers, 4 heads, width 64, context
32), batches of 16 windows of each text, Adam 2e-3 as in the paper's LM
runs. Held out: the last 10% of the docs
and every fifth line of the Zen.
"""

import codecs
import contextlib
import functools
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.harness import Task
from benchmarks.tasks import baseline_methods
from benchmarks.tasks import pcd_grids

CONTEXT = 32
EPOCHS = 8  # of 100 steps each


def byte_entropy(text: np.ndarray) -> float:
  """Cross-entropy (nats) of the best constant prediction: the bytes' entropy."""
  counts = np.bincount(np.asarray(text), minlength=256)
  freq = counts[counts > 0] / counts.sum()
  return float(-(freq * np.log(freq)).sum())


@functools.cache
def corpora():
  """(main_train, main_test, aux_train, aux_test) as uint8 byte arrays."""
  import pydoc_data.topics

  with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints
    import this
  docs = "".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
  zen = codecs.decode(this.s, "rot13").splitlines()
  as_bytes = lambda s: np.frombuffer(s.encode("utf-8"), np.uint8)
  cut = int(0.9 * len(docs))
  aux_train = "\n".join(line for i, line in enumerate(zen) if i % 5 != 4)
  aux_test = "\n".join(line for i, line in enumerate(zen) if i % 5 == 4)
  return (
    as_bytes(docs[:cut]),
    as_bytes(docs[cut:]),
    as_bytes(aux_train),
    as_bytes(aux_test),
  )


class Block(nn.Module):
  width: int
  heads: int

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:-1], jnp.int32))
    h = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.width)(
      nn.LayerNorm()(x), mask=mask
    )
    x = x + h
    h = nn.Dense(4 * self.width)(nn.LayerNorm()(x))
    return x + nn.Dense(self.width)(nn.gelu(h))


class ByteTransformer(nn.Module):
  width: int = 64
  heads: int = 4
  layers: int = 2

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(256, self.width)(tokens)
    x = x + self.param("position", nn.initializers.normal(0.02), (CONTEXT, self.width))
    for _ in range(self.layers):
      x = Block(self.width, self.heads)(x)
    return nn.Dense(256)(nn.LayerNorm()(x))


def _windows(text, starts):
  take = lambda s: jax.lax.dynamic_slice_in_dim(text, s, CONTEXT + 1)
  return jax.vmap(take)(starts)


def _next_byte_loss(model, params, text, starts):
  w = _windows(text, starts).astype(jnp.int32)
  logits = model.apply({"params": params}, w[:, :-1])
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]))


def joint_text(epochs: int = EPOCHS, quick: bool = False) -> Task:
  """Main: docs next-byte loss; aux: Zen next-byte loss; 100 steps per epoch."""
  texts = corpora()
  main_train, main_test, aux_train, aux_test = (jnp.asarray(t) for t in texts)
  if quick:
    epochs = 1
  model = ByteTransformer()
  rng = np.random.default_rng(0)
  batch, steps = 16, (20 if quick else 100)
  count = batch * steps

  def starts(text, n):
    return jnp.asarray(rng.integers(0, len(text) - CONTEXT - 1, n), jnp.int32)

  train_main, train_aux = starts(main_train, count), starts(aux_train, count)
  eval_sets = {
    "main_train": (main_train, starts(main_train, 256)),
    "main_test": (main_test, starts(main_test, 256)),
    "aux": (aux_train, jnp.arange(len(aux_train) - CONTEXT - 1, dtype=jnp.int32)),
    "aux_test": (aux_test, jnp.arange(len(aux_test) - CONTEXT - 1, dtype=jnp.int32)),
  }

  def init(key):
    return model.init(key, jnp.zeros((1, CONTEXT), jnp.int32))["params"], ()

  def loss(params, state, batch_starts):
    main_starts, aux_starts = batch_starts
    main = _next_byte_loss(model, params, main_train, main_starts)
    aux = _next_byte_loss(model, params, aux_train, aux_starts)
    return (main, aux), state

  def evaluate(params, state):
    del state
    return {k: _next_byte_loss(model, params, t, s) for k, (t, s) in eval_sets.items()}

  weights = (0.01, 0.1, 1.0, 10.0) if not quick else (0.1, 1.0)
  methods = baseline_methods()
  return Task(
    name="text_joint",
    init=init,
    loss=loss,
    evaluate=evaluate,
    train_data=(train_main, train_aux),
    batch_size=batch,
    epochs=epochs,
    optimizer=lambda lam: optax.adam(2e-3),
    aux_weights=weights,
    methods=methods,
    grids=pcd_grids(methods, weights),
    scales=("linear", "linear"),
    labels=("main: docs next-byte CE", "aux: Zen next-byte CE"),
    chance={"train": byte_entropy(texts[0]), "test": byte_entropy(texts[1])},
    protocol={
      "figure": "5 and 6 (c4 main vs RCV-1 aux, 12-layer byte transformer)",
      "model": "byte transformer, 2 layers, 4 heads, width 64, context 32",
      "data": "main: Python's pydoc topics (~420k bytes train); aux: the Zen of Python"
      " (~690 bytes train); held out: last 10% of the docs, every fifth Zen line",
      "optimizer": "Adam",
      "learning_rate": "2e-3, constant",
      "ema_decay": 0.99,
      "metric": "held-out main and aux next-byte CE (headline), lowest main CE reached,"
      " and the Figure 6 view",
    },
  )
