"""A plain-JAX decoder-only transformer whose layers are stacked and applied with `lax.scan`.

Every per-layer parameter has a leading `layers` dimension, so the traced step holds one scan
whose body is a single transformer layer: the shape a planner sees for models built at scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ._common import (Example, causal_attention, layer_norm, normal_init, optimizer_step,
                      token_batch)

_NORMAL = normal_init(0.02)  # GPT-2 style initialisation


def _init_params(key, *, layers, hidden, heads, vocab, seq):
    """Initial parameters: embeddings, stacked layers, final norm and an untied output head."""
    head_dim, ffn = hidden // heads, 4 * hidden
    keys = iter(jax.random.split(key, 9))

    def normal(*shape):
        """A normal(0, 0.02) weight."""
        return _NORMAL(next(keys), shape)

    def norm(*lead):
        """LayerNorm scale (ones) and bias (zeros)."""
        return {"scale": jnp.ones((*lead, hidden)), "bias": jnp.zeros((*lead, hidden))}

    l, n, d = layers, heads, head_dim
    stacked = {
        "ln1": norm(l),
        "attn": {
            "wq": normal(l, hidden, n, d), "bq": jnp.zeros((l, n, d)),
            "wk": normal(l, hidden, n, d),  # no key bias: softmax cancels it (see gpt.py)
            "wv": normal(l, hidden, n, d), "bv": jnp.zeros((l, n, d)),
            "wo": normal(l, n, d, hidden), "bo": jnp.zeros((l, hidden)),
        },
        "ln2": norm(l),
        "mlp": {
            "w1": normal(l, hidden, ffn), "b1": jnp.zeros((l, ffn)),
            "w2": normal(l, ffn, hidden), "b2": jnp.zeros((l, hidden)),
        },
    }
    return {
        "embed": normal(vocab, hidden),
        "pos_embed": normal(seq, hidden),
        "layers": stacked,
        "final_norm": norm(),
        "head": normal(hidden, vocab),
    }


def _layer(x, p):
    """One pre-LayerNorm transformer layer (p holds a single layer's parameters)."""
    a = p["attn"]
    h = layer_norm(x, **p["ln1"])
    q = jnp.einsum("bsh,hnd->bsnd", h, a["wq"]) + a["bq"]
    k = jnp.einsum("bsh,hnd->bsnd", h, a["wk"])
    v = jnp.einsum("bsh,hnd->bsnd", h, a["wv"]) + a["bv"]
    x = x + jnp.einsum("bsnd,ndh->bsh", causal_attention(q, k, v), a["wo"]) + a["bo"]
    m = p["mlp"]
    h = jax.nn.gelu(layer_norm(x, **p["ln2"]) @ m["w1"] + m["b1"])
    return x + h @ m["w2"] + m["b2"]


def _loss(params, batch):
    """Mean next-token cross-entropy."""
    tokens = batch["tokens"]
    x = jnp.take(params["embed"], tokens, axis=0) + params["pos_embed"][: tokens.shape[1]]
    x, _ = jax.lax.scan(lambda x, p: (_layer(x, p), None), x, params["layers"])
    logits = layer_norm(x, **params["final_norm"]) @ params["head"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def make_transformer_scan(batch: int = 8, seq: int = 32, hidden: int = 64, heads: int = 8,
                          layers: int = 4, vocab: int = 128, seed: int = 0,
                          abstract: bool = False, tx=None) -> Example:
    """Build the scanned transformer and its train step (AdamW unless `tx` is given).

    params: {"embed": [V, h], "pos_embed": [s, h], "layers": {"ln1"/"ln2": {"scale", "bias":
    [l, h]}, "attn": {"wq"/"wk"/"wv": [l, h, n, d], "bq"/"bv": [l, n, d], "wo": [l, n, d, h],
    "bo": [l, h]}, "mlp": {"w1": [l, h, 4h], "b1": [l, 4h], "w2": [l, 4h, h], "b2": [l, h]}},
    "final_norm": {"scale", "bias": [h]}, "head": [h, V]}; batch: {"tokens", "targets": int32
    [batch, seq]}. With `abstract=True` every leaf is a `jax.ShapeDtypeStruct`. `tx`: the
    optax optimizer (default `optax.adamw(1e-3)`).
    """
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    k_params, k_data = jax.random.split(jax.random.key(seed))
    tx = optax.adamw(1e-3) if tx is None else tx

    def init():
        """Parameters, optimizer state and a batch."""
        params = _init_params(k_params, layers=layers, hidden=hidden, heads=heads,
                              vocab=vocab, seq=seq)
        return params, tx.init(params), token_batch(k_data, batch, seq, vocab)

    args = jax.eval_shape(init) if abstract else jax.jit(init)()

    train_step = optimizer_step(_loss, tx)

    return Example(
        name="transformer_scan",
        train_step=train_step,
        args=args,
        description=(f"decoder-only transformer, {layers} layers stacked under lax.scan, "
                     f"hidden {hidden}, {heads} heads, vocab {vocab}, seq {seq}, batch {batch}"),
    )

