"""Shared pieces of the example models: the `Example` record and small numeric helpers."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Example:
    """A model ready to plan: a pure train step and the arguments to call it with.

    `train_step(params, opt_state, batch) -> (new_params, new_opt_state, loss)` is a pure
    function of pytrees, not jitted; `args == (params, opt_state, batch)` holds either arrays
    or `jax.ShapeDtypeStruct`s (for configurations too large to allocate).
    """

    name: str
    train_step: Callable[..., tuple[Any, Any, jax.Array]]
    args: tuple
    description: str


def abstract(args: Any) -> Any:
    """Return the same pytree with every leaf replaced by a `jax.ShapeDtypeStruct`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)


def normal_init(std: float) -> Callable[..., jax.Array]:
    """A normal(0, std) initializer with the nnx/jax.nn signature `(key, shape, dtype)`.

    Draws a flat vector and reshapes it: XLA:CPU compiles high-rank random draws several times
    more slowly, which dominated the build time of the examples.
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return std * jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)

    return init


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal softmax attention on [batch, seq, heads, head_dim] inputs."""
    seq, head_dim = q.shape[1], q.shape[-1]
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
    mask = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(scores, axis=-1), v)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-5) -> jax.Array:
    """LayerNorm over the last axis with a learned scale and bias."""
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def token_batch(key: jax.Array, batch: int, seq: int, vocab: int) -> dict[str, jax.Array]:
    """Random token sequences with next-token targets: {"tokens", "targets"}, int32 [batch, seq]."""
    stream = jax.random.randint(key, (batch, seq + 1), 0, vocab, dtype=jnp.int32)
    return {"tokens": stream[:, :-1], "targets": stream[:, 1:]}


def optimizer_step(loss_fn: Callable, tx) -> Callable:
    """`train_step(params, opt_state, batch) -> (params, opt_state, loss)` for an optax `tx`."""
    import optax

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step
