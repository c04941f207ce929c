"""Tests of the example models: they build, train, keep their pytree shapes, and plan big."""

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshplan.examples as ex
from meshplan.examples import ALL_EXAMPLES, Example, abstract, gpt_param_count, make

# GPT-3 175B (Brown et al. 2020); batch kept small, it only sizes the abstract batch.
GPT3 = dict(layers=96, hidden=12288, heads=96, seq=2048, batch=8, vocab=51200)


@functools.cache
def _default(name):
    """The example `name` at default sizes, built once for the whole module (it is immutable)."""
    return make(name)


def _count(tree):
    """Total number of elements in a pytree of arrays or ShapeDtypeStructs."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _same_avals(a, b):
    """True when two pytrees have the same structure, shapes and dtypes."""
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and jax.tree.leaves(abstract(a)) == jax.tree.leaves(abstract(b)))


@pytest.mark.parametrize("name", ALL_EXAMPLES)
def test_example_trains(name):
    example = _default(name)
    assert isinstance(example, Example) and example.name == name and example.description
    params, opt_state, batch = example.args
    step = jax.jit(example.train_step)
    losses = []
    for _ in range(5):
        new_params, new_opt_state, loss = step(params, opt_state, batch)
        assert _same_avals(new_params, params) and _same_avals(new_opt_state, opt_state)
        assert loss.shape == () and np.isfinite(float(loss))
        params, opt_state = new_params, new_opt_state
        losses.append(float(loss))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("name", ALL_EXAMPLES)
def test_default_dims_shard_8_ways(name):
    params, _, batch = _default(name).args
    dims = {d for x in jax.tree.leaves((params, batch)) for d in x.shape}
    assert all(d % 8 == 0 for d in dims if d >= 8), sorted(dims)  # below 8: layer counts


@pytest.mark.parametrize("name", ["gpt", "gpt_scan"])
def test_gpt_param_count(name):
    # The examples drop the key bias (h per layer), whose gradient is exactly zero.
    assert _count(_default(name).args[0]) == gpt_param_count(layers=2, hidden=64, vocab=128,
                                                             seq=32) - 2 * 64
    cfg = dict(layers=3, hidden=48, vocab=40, seq=16)
    params = make(name, heads=6, abstract=True, **cfg).args[0]
    assert _count(params) == gpt_param_count(**cfg) - 3 * 48


def test_gpt_param_count_formula():
    l, h, v, s = 96, 12288, 51200, 2048
    formula = 12 * l * h**2 * (1 + 13 / (12 * h) + (v + s) / (12 * l * h))
    assert gpt_param_count(l, h, v, s) == round(formula)
    assert round(gpt_param_count(l, h, v, s) / 1e9) == 175  # GPT-3


@pytest.mark.parametrize("name", ["gpt", "gpt_scan", "transformer_scan"])
def test_abstract_gpt3_size(name):
    start = time.perf_counter()
    example = make(name, abstract=True, **GPT3)
    assert time.perf_counter() - start < 20
    leaves = jax.tree.leaves(example.args)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    params, opt_state, batch = example.args
    l, h, v, s = GPT3["layers"], GPT3["hidden"], GPT3["vocab"], GPT3["seq"]
    expected = gpt_param_count(l, h, v, s) - l * h  # no key biases
    if name == "transformer_scan":
        expected += v * h + 2 * h  # untied output head, final LayerNorm scale and bias
    assert _count(params) == expected
    assert batch["tokens"].shape == (GPT3["batch"], s) and batch["tokens"].dtype == jnp.int32
    if name != "gpt":  # scanned: tracing the whole step at this size is cheap
        out = jax.eval_shape(example.train_step, *example.args)
        assert _same_avals(out[:2], (params, opt_state)) and out[2].shape == ()


def test_abstract_matches_concrete():
    for name in ["gpt", "gpt_scan", "transformer_scan"]:
        concrete, spec = _default(name).args, make(name, abstract=True).args
        assert jax.tree.structure(concrete) == jax.tree.structure(spec)
        assert jax.tree.leaves(abstract(concrete)) == jax.tree.leaves(spec)


def test_gpt_scan_equals_unrolled():
    unrolled, scanned = _default("gpt"), _default("gpt_scan")
    p_u, p_s = unrolled.args[0], scanned.args[0]
    blocks = p_u["blocks"]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(blocks[i] for i in sorted(blocks)))
    jax.tree.map(np.testing.assert_array_equal, stacked, p_s["blocks"])
    for key in ("tok", "pos"):
        np.testing.assert_array_equal(p_u[key]["embedding"], p_s[key]["embedding"])
    loss_u = jax.jit(unrolled.train_step)(*unrolled.args)[2]
    loss_s = jax.jit(scanned.train_step)(*scanned.args)[2]
    np.testing.assert_allclose(loss_u, loss_s, rtol=1e-5)


@pytest.mark.parametrize("name,scanned", [("transformer_scan", True), ("gpt_scan", True),
                                          ("gpt", False)])
def test_layers_under_scan(name, scanned):
    example = _default(name)
    assert ("scan[" in str(jax.make_jaxpr(example.train_step)(*example.args))) == scanned


def test_moe_expert_dim_leads():
    params = _default("moe").args[0]
    for layer in params.values():
        assert layer["w_in"].shape[0] == layer["w_out"].shape[0] == 8
        assert layer["router"].shape[-1] == 8


def test_deterministic_and_seeded():
    a, b, c = _default("mlp"), ex.make_mlp(seed=0), ex.make_mlp(seed=1)
    np.testing.assert_array_equal(a.args[0]["layer_0"]["w"], b.args[0]["layer_0"]["w"])
    assert not np.array_equal(a.args[0]["layer_0"]["w"], c.args[0]["layer_0"]["w"])


def test_make_unknown_name():
    with pytest.raises(ValueError, match="unknown example"):
        make("resnet")
