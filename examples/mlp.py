"""A plain-JAX multilayer perceptron regressing a fixed random teacher with MSE and Adam."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ._common import Example, optimizer_step


def make_mlp(batch: int = 32, d_in: int = 64, hidden: int = 256, depth: int = 3,
             d_out: int = 16, seed: int = 0, dtype=jnp.float32) -> Example:
    """Build an MLP with `depth` linear layers (d_in -> hidden ... -> d_out) and its train step.

    params: {"layer_0": {"w": [d_in, hidden], "b": [hidden]}, ..., "layer_{depth-1}": {"w":
    [hidden, d_out], "b": [d_out]}}; batch: {"x": [batch, d_in], "y": [batch, d_out]}.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    widths = [d_in] + [hidden] * (depth - 1) + [d_out]
    k_params, k_x, k_teacher = jax.random.split(jax.random.key(seed), 3)
    tx = optax.adam(1e-3)

    def init():
        """Parameters, optimizer state and a batch whose targets come from a random teacher."""
        params = {
            f"layer_{i}": {
                "w": (jax.random.normal(k, (n_in, n_out)) / jnp.sqrt(n_in)).astype(dtype),
                "b": jnp.zeros((n_out,), dtype),
            }
            for i, (k, n_in, n_out) in enumerate(
                zip(jax.random.split(k_params, depth), widths[:-1], widths[1:]))
        }
        x = jax.random.normal(k_x, (batch, d_in), dtype)
        teacher = jax.random.normal(k_teacher, (d_in, d_out), dtype) / jnp.sqrt(d_in)
        return params, tx.init(params), {"x": x, "y": jnp.tanh(x @ teacher)}

    def forward(params, x):
        """Apply the layers, gelu between them, linear output."""
        for i in range(depth):
            layer = params[f"layer_{i}"]
            x = x @ layer["w"] + layer["b"]
            if i < depth - 1:
                x = jax.nn.gelu(x)
        return x

    def loss_fn(params, batch):
        """Mean squared error of the prediction."""
        return jnp.mean(jnp.square(forward(params, batch["x"]) - batch["y"]))

    train_step = optimizer_step(loss_fn, tx)

    return Example(
        name="mlp",
        train_step=train_step,
        args=jax.jit(init)(),
        description=f"MLP {'-'.join(map(str, widths))}, gelu, MSE, Adam; batch {batch}",
    )
