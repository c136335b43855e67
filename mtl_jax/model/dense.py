"""Dense layers as XLA:CPU multiplies fastest in bfloat16: :func:`affine` (``x @ kernel +
bias``) and :class:`Dense`, ``nn.Dense`` computed by it.

XLA:CPU sends a bfloat16 product to its fast kernels (YNNPACK; twice float32's rate on CPUs
with bf16 dot instructions) only when the result is float32 and the left operand contracts
its last axis. A bfloat16 product with a bfloat16 result, as ``nn.Dense`` writes it, is
computed in float32 (slower than float32 itself, with the conversions); the kernel gradient
``x^T g`` as autodiff writes it contracts the left operand's first axis and runs at a third of
the fast rate; the bias gradient becomes a slow windowed reduction. :func:`affine`'s forward
and backward pass are written so that a bfloat16 layer takes the fast path for all three
products. In float32 and on other backends it is the plain ``x @ kernel + bias`` on a 2-D view
of ``x`` (the bfloat16 rewrite is slower there in float32: docs/performance.md).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _row_major_transpose(a: jax.Array) -> jax.Array:
    """``a.T`` of a 2-D array as a row-major copy of ``a`` as it is (XLA would otherwise fold
    the transpose into the product's dimension numbers or recompute ``a``'s producer in it)."""
    rows, cols = a.shape
    return jax.lax.optimization_barrier(jax.lax.optimization_barrier(a).T.reshape(-1)).reshape(cols, rows)


def _accumulated(a: jax.Array, b: jax.Array, contract: int) -> jax.Array:
    """``a [M, K]`` times ``b`` (``[K, N]``, contract 0; ``[N, K]``, contract 1), accumulated in float32."""
    return jax.lax.dot_general(a, b, (((1,), (contract,)), ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def cpu_affine(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``x [M, K] @ kernel [K, N] + bias`` in the dtype of ``x``, every product on the fast path."""
    return (_accumulated(x, kernel, 0) + bias.astype(jnp.float32)).astype(x.dtype)


def _cpu_affine_fwd(x, kernel, bias):
    return cpu_affine(x, kernel, bias), (x, kernel, bias)


def _cpu_affine_bwd(saved, grad):
    x, kernel, bias = saved
    g = grad.astype(x.dtype)
    dx = _accumulated(g, kernel, 1).astype(x.dtype)
    dkernel = _accumulated(_row_major_transpose(x), g, 0).astype(kernel.dtype)
    dbias = g.astype(jnp.float32).sum(axis=0).astype(bias.dtype)
    return dx, dkernel, dbias


cpu_affine.defvjp(_cpu_affine_fwd, _cpu_affine_bwd)


def affine(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``x [..., K] @ kernel [K, N] + bias [N]`` in the dtype of ``x``, as ``nn.Dense`` computes it.

    Always on a 2-D view of ``x`` (a free reshape): XLA:CPU computes the kernel gradient of a
    ``[rows, tokens, K]`` x as a product contracting two axes much more slowly (docs/performance.md);
    other backends see the same product. In 16 bits on the
    CPU (see the module's text) :func:`cpu_affine` accumulates the products in float32,
    multiplies a row-major copy of ``x^T`` for the kernel gradient and sums the bias gradient
    in float32: the plain arithmetic, rounded to 16 bits at the same places, in another
    summation order.
    """
    k, n = kernel.shape
    x2 = x.reshape(-1, k)
    if jax.default_backend() != "cpu" or x.dtype == jnp.float32:
        y = x2 @ kernel + bias
    else:
        y = cpu_affine(x2, kernel, bias)
    return y.reshape(*x.shape[:-1], n)


class Dense(nn.Module):
    """``nn.Dense`` (same parameters, initialisers and dtype handling) computed by :func:`affine`."""

    features: int
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return affine(x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype))
