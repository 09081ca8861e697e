"""Rules that equalise the objectives: IMTL-G (equal projections), Aligned-MTL
(a well-conditioned Jacobian), ConFIG (equal cosines), DB-MTL (equal norms)."""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from bloop_optax import _qp
from bloop_optax.aggregators._base import _aggregator
from bloop_optax.aggregators._base import _no_key
from bloop_optax.aggregators._linalg import _cosines
from bloop_optax.aggregators._linalg import _normalized


def imtl_g_weights(gram: jax.Array) -> jax.Array:
  r"""IMTL-G: the combination whose projections on every unit gradient are equal.

  :math:`d = \sum_i w_i g_i` with :math:`\langle d, g_i / |g_i|\rangle` the same for every
  :math:`i` and :math:`\sum_i w_i = 1`: :math:`v = G^{+} n` with :math:`n_i = |g_i| = \sqrt{G_ii}`
  and :math:`w = v / sum(v)` (:math:`G^{+}` the pseudo-inverse, which extends the method to
  linearly dependent gradients); :math:`w = 0` when ``sum(v)`` vanishes (e.g.
  opposite gradients: no direction has equal positive projections).
  Scale: :math:`v` scales as :math:`1 / \sqrt{s}`, :math:`w` is invariant.
  """
  g = _normalized(gram)
  v = _qp.pinv_symmetric(g) @ jnp.sqrt(jnp.maximum(jnp.diag(g), 0))
  total = jnp.sum(v)
  alive = jnp.abs(total) > _qp._tolerance(g.dtype) * jnp.sum(jnp.abs(v))
  return jnp.where(alive, v / jnp.where(alive, total, 1), 0)


def aligned_mtl_weights(gram: jax.Array) -> jax.Array:
  r"""Aligned-MTL: the mean of the gradients made orthogonal and of equal norm.

  With :math:`G = V \operatorname{diag}(\lambda) V^T` restricted to its rank (eigenvalues above
  :math:`K \varepsilon \max \lambda`), the balance matrix
  :math:`B = \sqrt{\lambda_{\min}} V \operatorname{diag}(\lambda)^{-1/2} V^T` makes the rows of ``B
  J`` orthogonal with norm ``sqrt(λ_min)``; :math:`w = B 1 / K`. A zero :math:`G` gives
  :math:`w = 1 / K`. Scale: invariant.
  """
  g = _normalized(gram)
  k = g.shape[0]
  lam, vec = jnp.linalg.eigh(g)
  keep = lam > jnp.max(lam) * k * jnp.finfo(g.dtype).eps
  smallest = jnp.min(jnp.where(keep, lam, jnp.inf))
  inv_sqrt = jnp.where(keep, 1 / jnp.sqrt(jnp.where(keep, lam, 1)), 0)
  balance = jnp.sqrt(jnp.where(jnp.any(keep), smallest, 1)) * (vec * inv_sqrt) @ vec.T
  pref = jnp.full([k], 1 / k, g.dtype)
  return jnp.where(jnp.any(keep), jnp.sum(balance, axis=1) / k, pref)  # B 1 / K


def config_weights(gram: jax.Array) -> jax.Array:
  r"""ConFIG: one direction with the same cosine to every gradient.

  With unit gradients :math:`u_i = g_i / \|g_i\|` (zero for a zero gradient),
  :math:`\hat d \propto U^+ \mathbf{1}` (the least-norm vector with
  :math:`\langle \hat d, u_i\rangle` equal for all :math:`i`, through the pseudo-inverse),
  normalised, and scaled by the sum of the gradients' components along it:
  :math:`d = \big(\sum_i \langle g_i, \hat d\rangle\big) \hat d`. In Gram terms, with
  :math:`C` the cosine matrix and :math:`a = D^{-1} C^+ \mathbf{1}`
  (:math:`D = \operatorname{diag}(\|g_i\|)`),
  :math:`w = a \, (\mathbf{1}^T G a) / (a^T G a)`; :math:`w = 0` when :math:`a^T G a = 0`
  (e.g. two opposite gradients). Scale: invariant.
  """
  g = _normalized(gram)
  k = g.shape[0]
  cosines, inv, live = _cosines(g)
  a = inv * (_qp.pinv_symmetric(cosines) @ jnp.where(live, 1.0, 0.0).astype(g.dtype))
  length2 = a @ g @ a
  positive = length2 > jnp.finfo(g.dtype).eps * jnp.max(jnp.diag(g)) * k
  scale = jnp.sum(g @ a) / jnp.where(positive, length2, 1)
  return jnp.where(positive, scale * a, jnp.zeros([k], g.dtype))


def imtl_g(
  num_objectives: int,
  *,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""IMTL-G: the combination with equal projections on every unit gradient.

  :math:`d = \sum_i w_i g_i` with :math:`\sum_i w_i = 1` and :math:`\langle d, g_i / |g_i|\rangle`
  the same for every :math:`i` (see :func:`imtl_g_weights`; the pseudo-inverse
  extends it to linearly dependent gradients).

  Args:
    num_objectives: the number :math:`K` of objectives.
    ema_decay: ``None`` (default) or :math:`\beta`: decide the weights from the EMAs'
      Gram matrix, as in :func:`mgda`.
    accumulator_dtype: dtype of the EMAs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.imtl_g(2)
    >>> g1, g2 = jnp.array([1.0, 0.0]), jnp.array([0.0, 3.0])
    >>> d, _ = tx.update((g1, g2), tx.init(g1))
    >>> d  # equal projections on e1 and e2
    Array([0.75, 0.75], dtype=float32)

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial
    Multi-task Learning", ICLR 2021; Quinton and Rey, "Jacobian Descent for
    Multi-Objective Optimization", arXiv:2406.16232 (dependent gradients).
  """
  rule = _no_key(imtl_g_weights)
  return _aggregator("aggregators.imtl_g", num_objectives, rule, ema_decay, accumulator_dtype)


def aligned_mtl(
  num_objectives: int,
  *,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Aligned-MTL: the mean of the gradients after aligning them.

  The balance matrix :math:`B = \sqrt{\lambda_{\min}} V \operatorname{diag}(\lambda)^{-1/2} V^T`
  (from the eigendecomposition of the Gram matrix, restricted to its rank) turns the
  gradients into orthogonal vectors of equal norm :math:`\sqrt{\lambda_{\min}}`; :math:`d` is
  their mean (see :func:`aligned_mtl_weights`).

  Args:
    num_objectives: the number :math:`K` of objectives.
    ema_decay: ``None`` (default) or :math:`\beta`: decide the weights from the EMAs'
      Gram matrix, as in :func:`mgda`.
    accumulator_dtype: dtype of the EMAs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.aligned_mtl(2)
    >>> g1, g2 = jnp.array([1.0, 0.0]), jnp.array([0.0, 3.0])
    >>> d, _ = tx.update((g1, g2), tx.init(g1))
    >>> d  # both rescaled to the smaller norm, then averaged
    Array([0.5, 0.5], dtype=float32)

  References:
    Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component Alignment
    for Multi-Task Learning", CVPR 2023, Algorithm 1.
  """
  rule = _no_key(aligned_mtl_weights)
  return _aggregator("aggregators.aligned_mtl", num_objectives, rule, ema_decay, accumulator_dtype)


def config(
  num_objectives: int,
  *,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""ConFIG: a conflict-free direction with equal cosines to every gradient.

  The direction :math:`\hat d` makes the same angle with every gradient (the
  least-norm solution of :math:`\langle \hat d, g_i / \|g_i\|\rangle = 1`, normalised),
  and its length is the sum of the gradients' components along it (see
  :func:`config_weights`). This is the variant TorchJD implements (the paper's
  Equation 4, without its momentum version).

  Args:
    num_objectives: the number :math:`K` of objectives.
    ema_decay: ``None`` (default) or :math:`\beta`: decide the weights from the EMAs'
      Gram matrix, as in :func:`mgda`.
    accumulator_dtype: dtype of the EMAs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.config(2)
    >>> g1, g2 = jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0])
    >>> d, _ = tx.update((g1, g2), tx.init(g1))
    >>> d  # along (1, 1), with length <g1 + g2, (1, 1) / sqrt(2)>
    Array([1.5, 1.5], dtype=float32)

  References:
    Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks", ICLR 2025 (arXiv:2408.11104).
  """
  rule = _no_key(config_weights)
  return _aggregator("aggregators.config", num_objectives, rule, ema_decay, accumulator_dtype)


def db_mtl_weights(gram: jax.Array) -> jax.Array:
  r"""DB-MTL's gradient-magnitude balancing: every gradient scaled to the largest norm.

  :math:`w_i = \max_j |g_j| / |g_i|` with :math:`|g_i| = \sqrt{G_{ii}}`, so that
  :math:`d = \sum_i w_i g_i` is the sum of the gradients' directions, each as long as
  the longest gradient; a zero gradient gets weight 0. Scale: invariant.
  """
  norms = jnp.sqrt(jnp.maximum(jnp.diag(_normalized(gram)), 0))
  alive = norms > 0
  return jnp.where(alive, jnp.max(norms) / jnp.where(alive, norms, 1), 0)


def db_mtl(
  num_objectives: int,
  *,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""DB-MTL's gradient balancing: the gradients' directions, each as long as the longest.

  :math:`d = \max_j |g_j| \sum_i g_i / |g_i|` (see :func:`db_mtl_weights`): no
  objective's gradient dominates by its size, and the step keeps the scale of the
  largest. DB-MTL also balances the losses' scales by differentiating
  :math:`\log \ell_i` instead of :math:`\ell_i`; do that in the loss function
  (``value_and_grads`` of the logs). DB-MTL sums EMAs of the gradients with a
  decaying rate; here ``ema_decay`` is the package's option (weights from the EMAs,
  applied to the current gradients).

  Args:
    num_objectives: the number :math:`K` of objectives.
    ema_decay: ``None`` (default) or :math:`\beta`: decide the weights from the EMAs'
      Gram matrix, as in :func:`mgda`.
    accumulator_dtype: dtype of the EMAs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.db_mtl(2)
    >>> g1, g2 = jnp.array([1.0, 0.0]), jnp.array([0.0, 3.0])
    >>> d, _ = tx.update((g1, g2), tx.init(g1))
    >>> d  # both directions, each of length 3
    Array([3., 3.], dtype=float32)

  References:
    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Kwok, "Dual-Balancing for
    Multi-Task Learning", arXiv:2308.12029.
  """
  rule = _no_key(db_mtl_weights)
  return _aggregator("aggregators.db_mtl", num_objectives, rule, ema_decay, accumulator_dtype)
