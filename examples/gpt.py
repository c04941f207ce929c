"""A GPT in flax nnx (Megatron layout), unrolled or with its blocks stacked under `nnx.scan`.

Biases on every linear but the key projection, two LayerNorms per block, learned position
embedding, and an output head tied to the token embedding, so the parameter count is the
Megatron formula `gpt_param_count` less one key bias (h) per layer. A key bias shifts every
attention score of a query by the same amount, which softmax cancels: its gradient is exactly
zero and only rounding noise reaches it, which Adam's first step (g / (|g| + eps)) would blow
up to full-size updates that differ between any two summation orders. That formula leaves out the final LayerNorm, so ours has no learned scale or
bias. The train step is pure: parameters travel as a plain nested dict of arrays and the model
is rebuilt with `nnx.merge` inside it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ._common import Example, causal_attention, normal_init, optimizer_step, token_batch

_INIT = normal_init(0.02)  # GPT-2 style initialisation


def gpt_param_count(layers: int, hidden: int, vocab: int, seq: int) -> int:
    """Megatron's GPT parameter count: 12*l*h^2*(1 + 13/(12h) + (V+s)/(12*l*h))."""
    l, h = layers, hidden
    return 12 * l * h * h + 13 * l * h + (vocab + seq) * h  # the formula, expanded exactly


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: causal multi-head attention, then a 4h gelu MLP."""

    def __init__(self, hidden: int, heads: int, *, rngs: nnx.Rngs, dtype=None):
        n, d = heads, hidden // heads
        qkv = dict(kernel_shape=(hidden, n, d), bias_shape=(n, d), kernel_init=_INIT, rngs=rngs,
                   dtype=dtype)
        self.ln1 = nnx.LayerNorm(hidden, epsilon=1e-5, rngs=rngs, dtype=dtype)
        self.wq = nnx.Einsum("bsh,hnd->bsnd", **qkv)
        self.wk = nnx.Einsum("bsh,hnd->bsnd", **{**qkv, "bias_shape": None})
        self.wv = nnx.Einsum("bsh,hnd->bsnd", **qkv)
        self.wo = nnx.Einsum("bsnd,ndh->bsh", (n, d, hidden), (hidden,), kernel_init=_INIT,
                             rngs=rngs, dtype=dtype)
        self.ln2 = nnx.LayerNorm(hidden, epsilon=1e-5, rngs=rngs, dtype=dtype)
        self.fc1 = nnx.Linear(hidden, 4 * hidden, kernel_init=_INIT, rngs=rngs, dtype=dtype)
        self.fc2 = nnx.Linear(4 * hidden, hidden, kernel_init=_INIT, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.ln1(x)
        x = x + self.wo(causal_attention(self.wq(h), self.wk(h), self.wv(h)))
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class GPT(nnx.Module):
    """Token + position embedding, `layers` blocks, final norm, head tied to the embedding."""

    def __init__(self, *, layers: int, hidden: int, heads: int, vocab: int, seq: int,
                 scan: bool, rngs: nnx.Rngs, dtype=None):
        self.scan = scan
        self.tok = nnx.Embed(vocab, hidden, embedding_init=_INIT, rngs=rngs, dtype=dtype)
        self.pos = nnx.Embed(seq, hidden, embedding_init=_INIT, rngs=rngs, dtype=dtype)
        # One key per block, drawn the same way in both variants, so their inits are equal.
        # nnx.jit gives each block its own small trace: building 96 blocks inside one
        # eval_shape/jit trace is otherwise quadratic (nnx inspects every traced RNG count).
        keys = jax.random.split(rngs.params(), layers)
        make = nnx.jit(lambda key: Block(hidden, heads, rngs=nnx.Rngs(params=key),
                                         dtype=dtype))
        self.blocks = nnx.vmap(make)(keys) if scan else nnx.List([make(k) for k in keys])
        self.norm = nnx.LayerNorm(hidden, epsilon=1e-5, use_scale=False, use_bias=False,
                                  rngs=rngs, dtype=dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.tok(tokens) + self.pos(jnp.arange(tokens.shape[1]))
        if self.scan:
            x = nnx.scan(lambda x, block: block(x), in_axes=(nnx.Carry, 0),
                         out_axes=nnx.Carry)(x, self.blocks)
        else:
            for block in self.blocks:
                x = block(x)
        h = self.norm(x)
        return h @ self.tok.embedding[...].T.astype(h.dtype)


def make_gpt(batch: int = 8, seq: int = 32, hidden: int = 64, heads: int = 8, layers: int = 2,
             vocab: int = 128, seed: int = 0, scan: bool = False,
             abstract: bool = False, dtype: str | None = None, tx=None) -> Example:
    """Build the nnx GPT and its pure train step (AdamW unless `tx` is given).

    params (a nested dict of arrays): {"tok": {"embedding": [V, h]}, "pos": {"embedding":
    [s, h]}, "blocks": {i: block, ...} unrolled or one block with a leading [l] dim when
    `scan`}; a block is {"ln1"/"ln2": {"scale", "bias": [h]}, "wq"/"wk"/"wv": {"kernel":
    [h, n, d], "bias": [n, d]}, "wo": {"kernel": [n, d, h], "bias": [h]}, "fc1": {"kernel":
    [h, 4h], "bias": [4h]}, "fc2": {"kernel": [4h, h], "bias": [h]}}. batch: {"tokens",
    "targets": int32 [batch, seq]}. With `abstract=True` every leaf is a `jax.ShapeDtypeStruct`.
    `dtype="bfloat16"` computes in bfloat16 with float32 weights and Adam state (mixed
    precision: with AdamW, 16 bytes of model state per parameter, as Megatron-LM counts it).
    `tx`: the optax optimizer (default `optax.adamw(1e-3)`).
    """
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    k_params, k_data = jax.random.split(jax.random.key(seed))
    tx = optax.adamw(1e-3) if tx is None else tx

    def new_model():
        """A freshly initialised model."""
        return GPT(layers=layers, hidden=hidden, heads=heads, vocab=vocab, seq=seq, scan=scan,
                   rngs=nnx.Rngs(params=k_params), dtype=dtype and jnp.dtype(dtype))

    def init():
        """Parameters (a pure dict), optimizer state and a batch."""
        params = nnx.to_pure_dict(nnx.state(new_model(), nnx.Param))
        return params, tx.init(params), token_batch(k_data, batch, seq, vocab)

    graphdef = nnx.graphdef(nnx.eval_shape(new_model))
    args = jax.eval_shape(init) if abstract else jax.jit(init)()

    def loss_fn(params, batch):
        """Mean next-token cross-entropy of the model rebuilt from `params`."""
        logits = nnx.merge(graphdef, params)(batch["tokens"]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    train_step = optimizer_step(loss_fn, tx)

    return Example(
        name="gpt_scan" if scan else "gpt",
        train_step=train_step,
        args=args,
        description=(f"nnx GPT, {layers} blocks {'under nnx.scan' if scan else 'unrolled'}, "
                     f"hidden {hidden}, {heads} heads, vocab {vocab}, seq {seq}, batch {batch}"),
    )
