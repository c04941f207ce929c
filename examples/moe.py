"""A GShard-style mixture-of-experts model in plain JAX: top-1 gating with expert capacity.

Each sequence is a routing group. Tokens are dispatched to per-expert buffers of `capacity`
slots with one-hot einsums, the experts run as one batched einsum over a leading expert
dimension (which a planner can shard: expert parallelism), and the outputs are combined back.
Tokens past an expert's capacity are dropped and pass through on the residual only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from ._common import Example, normal_init, optimizer_step

_AUX_WEIGHT = 1e-2  # weight of the load-balancing loss


def _route(logits, capacity):
    """Top-1 routing: dispatch mask and combine weights [g, s, e, c], and the balance loss."""
    experts = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)                        # [g, s, e]
    choice = jax.nn.one_hot(jnp.argmax(probs, -1), experts)        # [g, s, e]
    # Slot of each token in its expert's buffer: -1 where not chosen; -1 and >= c one-hot to 0.
    slot = (jnp.cumsum(choice, axis=1) * choice - 1).astype(jnp.int32)
    dispatch = jax.nn.one_hot(slot, capacity)                      # [g, s, e, c]
    combine = dispatch * jnp.sum(probs * choice, -1)[..., None, None]
    # Switch/GShard auxiliary loss: experts * sum_e(fraction routed to e * mean gate prob of e).
    aux = experts * jnp.sum(choice.mean((0, 1)) * probs.mean((0, 1)))
    return dispatch, combine, aux


def _moe_layer(x, p, capacity):
    """One MoE layer with a residual connection; returns (output, auxiliary loss)."""
    dispatch, combine, aux = _route(jnp.einsum("gsm,me->gse", x, p["router"]), capacity)
    expert_in = jnp.einsum("gsec,gsm->egcm", dispatch, x)
    h = jax.nn.gelu(jnp.einsum("egcm,emf->egcf", expert_in, p["w_in"]) + p["b_in"][:, None, None])
    expert_out = jnp.einsum("egcf,efm->egcm", h, p["w_out"]) + p["b_out"][:, None, None]
    return x + jnp.einsum("gsec,egcm->gsm", combine, expert_out), aux


def make_moe(batch: int = 8, seq: int = 16, hidden: int = 32, experts: int = 8, ffn: int = 64,
             capacity_factor: float = 2.0, layers: int = 2, seed: int = 0) -> Example:
    """Build the MoE regression model and its Adam train step.

    params: {"layer_0": {"router": [hidden, experts], "w_in": [experts, hidden, ffn], "b_in":
    [experts, ffn], "w_out": [experts, ffn, hidden], "b_out": [experts, hidden]}, ...};
    batch: {"x", "y": float32 [batch, seq, hidden]} (groups = sequences).
    """
    capacity = max(1, math.ceil(capacity_factor * seq / experts))
    k_params, k_x, k_teacher = jax.random.split(jax.random.key(seed), 3)
    tx = optax.adam(1e-3)

    def init_layer(key):
        """One layer's router and expert weights."""
        kr, ki, ko = jax.random.split(key, 3)
        return {
            "router": normal_init(hidden**-0.5)(kr, (hidden, experts)),
            "w_in": normal_init(hidden**-0.5)(ki, (experts, hidden, ffn)),
            "b_in": jnp.zeros((experts, ffn)),
            "w_out": normal_init(ffn**-0.5)(ko, (experts, ffn, hidden)),
            "b_out": jnp.zeros((experts, hidden)),
        }

    def init():
        """Parameters, optimizer state and a batch whose targets come from a random teacher."""
        params = {f"layer_{i}": init_layer(k)
                  for i, k in enumerate(jax.random.split(k_params, layers))}
        x = normal_init(1.0)(k_x, (batch, seq, hidden))
        teacher = normal_init(hidden**-0.5)(k_teacher, (hidden, hidden))
        return params, tx.init(params), {"x": x, "y": x + jnp.tanh(x @ teacher)}

    def loss_fn(params, batch):
        """MSE to the targets plus the weighted load-balancing loss of every layer."""
        x, aux = batch["x"], 0.0
        for i in range(layers):
            x, layer_aux = _moe_layer(x, params[f"layer_{i}"], capacity)
            aux = aux + layer_aux
        return jnp.mean(jnp.square(x - batch["y"])) + _AUX_WEIGHT * aux / layers

    train_step = optimizer_step(loss_fn, tx)

    return Example(
        name="moe",
        train_step=train_step,
        args=jax.jit(init)(),
        description=(f"GShard top-1 MoE, {layers} layers, {experts} experts, hidden {hidden}, "
                     f"ffn {ffn}, capacity {capacity}, {batch} groups of {seq} tokens"),
    )
