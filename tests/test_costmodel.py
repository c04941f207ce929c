"""Tests of meshplan.costmodel: devices, clusters, JSON files, collectives, compute."""

import doctest
import json
import math

import numpy as np
import pytest

import meshplan.costmodel as cm
from meshplan.costmodel import (
    A100_40GB,
    A100_80GB,
    CPU,
    H100_80GB,
    V100_32GB,
    Cluster,
    DeviceSpec,
    Efficiency,
    LinkTier,
    collective_algorithms,
    collective_time,
    comm_bytes,
    compute_time,
    custom,
    dgx_a100,
    dgx_h100,
    op_time,
    p2p_time,
)

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def close(a, b, rel=1e-12):
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def uniform(n, bw, lat):
    """n devices on one node, one tier."""
    return Cluster(devices=(A100_80GB,) * n, node_of=(0,) * n,
                   tiers=(LinkTier("uni", bw, lat),))


def three_site_cluster():
    return Cluster(
        devices=(A100_80GB, A100_80GB, H100_80GB, H100_80GB, V100_32GB, V100_32GB),
        node_of=(0, 0, 1, 1, 2, 2),
        site_of=(0, 0, 0, 0, 1, 1),
        tiers=(LinkTier("nvlink", 300e9, 1e-6), LinkTier("ib", 25e9, 5e-6),
               LinkTier("wan", 1.25e9, 10e-3)),
        pair_bandwidth=[[None, 1e11, None, None, None, None],
                        [9e10, None, None, None, None, None],
                        [None] * 6, [None] * 6, [None] * 6,
                        [None, None, None, None, 2e9, None]],  # diagonal: ignored
        pair_latency=np.full((6, 6), np.nan),
        name="three-sites",
    )


# ---------------------------------------------------------------------------------------
# Devices


def test_presets_have_the_cited_numbers():
    assert A100_80GB.flops_per_second("bfloat16") == 312e12
    assert A100_80GB.flops_per_second("float32") == 19.5e12
    assert A100_80GB.flops_per_second("tf32") == 156e12
    assert A100_80GB.memory_bytes == 80e9 and A100_80GB.memory_bandwidth == 2.039e12
    assert A100_40GB.memory_bytes == 40e9 and A100_40GB.memory_bandwidth == 1.555e12
    assert H100_80GB.flops_per_second("bfloat16") == 989e12
    assert H100_80GB.memory_bytes == 80e9 and H100_80GB.memory_bandwidth == 3.35e12
    assert V100_32GB.flops_per_second("float16") == 125e12
    assert V100_32GB.flops_per_second("float32") == 15.7e12
    assert V100_32GB.memory_bytes == 32e9 and V100_32GB.memory_bandwidth == 900e9
    assert CPU.flops_per_second("float32") == 50e9
    assert CPU.memory_bytes == 16 * 2**30 and CPU.memory_bandwidth == 20e9


def test_flops_per_second_accepts_dtypes_and_falls_back():
    jnp = pytest.importorskip("jax.numpy")
    assert A100_80GB.flops_per_second(jnp.bfloat16) == 312e12
    assert A100_80GB.flops_per_second(np.dtype("float16")) == 312e12
    assert A100_80GB.flops_per_second(np.float32) == 19.5e12
    assert A100_80GB.flops_per_second("float64") == 9.7e12
    # unlisted wide types -> float32; unlisted 8-bit types -> bfloat16
    assert A100_80GB.flops_per_second("int32") == 19.5e12
    assert A100_80GB.flops_per_second(jnp.float8_e4m3fn) == 312e12
    assert H100_80GB.flops_per_second(jnp.float8_e4m3fn) == 1979e12
    # V100 has no bf16 tensor cores: bf16 and int8 fall back to the float32 rate
    assert V100_32GB.flops_per_second("bfloat16") == 15.7e12
    assert V100_32GB.flops_per_second("int8") == 15.7e12
    assert CPU.flops_per_second("bfloat16") == 50e9


def test_device_spec_validation_and_dict_round_trip():
    d = DeviceSpec("toy", {"fp32": 1e12, "bf16": 2e12}, 8e9, 1e11)
    assert d.peak_flops == (("bfloat16", 2e12), ("float32", 1e12))  # canonical, sorted
    assert DeviceSpec.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    with pytest.raises(ValueError, match="float32"):
        DeviceSpec("toy", (("bfloat16", 1e12),), 8e9, 1e11)
    with pytest.raises(ValueError, match="memory_bandwidth"):
        DeviceSpec("toy", (("float32", 1e12),), 8e9, -1.0)
    with pytest.raises(ValueError, match="listed twice"):
        DeviceSpec("toy", (("float32", 1e12), ("fp32", 2e12)), 8e9, 1.0)
    with pytest.raises(ValueError, match=r"DeviceSpec\.memory_bytes is missing"):
        DeviceSpec.from_dict({"kind": "x", "peak_flops": {"float32": 1.0},
                              "memory_bandwidth": 1.0})


# ---------------------------------------------------------------------------------------
# Clusters


def test_presets_have_eight_devices_per_node_and_cited_links():
    for nodes in (1, 3):
        c = dgx_a100(nodes=nodes)
        assert c.num_devices == 8 * nodes and c.num_nodes == nodes
        assert all(d == A100_80GB for d in c.devices)
        assert c.devices_of_node(nodes - 1) == tuple(range(8 * (nodes - 1), 8 * nodes))
        h = dgx_h100(nodes=nodes)
        assert h.num_devices == 8 * nodes and all(d == H100_80GB for d in h.devices)
    c, h = dgx_a100(nodes=2), dgx_h100(nodes=2)
    assert c.link(0, 7) == (300e9, 1e-6) and c.link(7, 8) == (25e9, 5e-6)
    assert h.link(0, 7) == (450e9, 1e-6) and h.link(7, 8) == (50e9, 5e-6)
    assert c.tier_of(0, 7) == 0 and c.tier_of(0, 8) == 1
    assert c.link(3, 3) == (math.inf, 0.0)
    assert c.memory_bytes(5) == 80e9
    with pytest.raises(ValueError, match="nodes"):
        dgx_a100(nodes=0)


def test_custom_matches_the_public_contract():
    c = custom(node_of=[0, 1, 0, 1], device=A100_80GB, intra=(300e9, 1e-6),
               inter=(25e9, 5e-6), pair_bandwidth=None, pair_latency=None)
    assert c.num_devices == 4 and c.num_nodes == 2
    assert c.devices_of_node(0) == (0, 2) and c.link(0, 2) == (300e9, 1e-6)
    assert c.link(0, 1) == (25e9, 5e-6)
    mixed = custom(node_of=[0, 0], device=[A100_80GB, H100_80GB])
    assert mixed.devices == (A100_80GB, H100_80GB)
    with pytest.raises(ValueError, match="one DeviceSpec per device"):
        custom(node_of=[0, 0, 0], device=[A100_80GB, H100_80GB])
    with pytest.raises(ValueError, match=r"inter"):
        custom(node_of=[0, 1], inter=(25e9,))


def test_cluster_validation_names_the_field():
    t1, t2 = LinkTier("a", 1e9, 1e-6), LinkTier("b", 1e8, 1e-5)
    with pytest.raises(ValueError, match="node_of has 3 entries"):
        Cluster(devices=(CPU,) * 2, node_of=(0, 0, 0), tiers=(t1,))
    with pytest.raises(ValueError, match=r"tiers\[1\]"):
        Cluster(devices=(CPU,) * 2, node_of=(0, 1), tiers=(t1,))
    with pytest.raises(ValueError, match="skips"):
        Cluster(devices=(CPU,) * 2, node_of=(0, 2), tiers=(t1, t2))
    with pytest.raises(ValueError, match="site_of"):
        Cluster(devices=(CPU,) * 2, node_of=(0, 0), site_of=(0, 1),
                tiers=(t1, t2, LinkTier("c", 1e7, 1e-3)))
    with pytest.raises(ValueError, match="site_of"):
        Cluster(devices=(CPU,) * 2, node_of=(0, 1), tiers=(t1, t2, LinkTier("c", 1e7, 1e-3)))
    with pytest.raises(ValueError, match=r"pair_bandwidth has 1 rows; expected 2"):
        Cluster(devices=(CPU,) * 2, node_of=(0, 0), tiers=(t1,), pair_bandwidth=[[1, 1]])
    with pytest.raises(ValueError, match=r"pair_latency\[0\]\[1\]"):
        Cluster(devices=(CPU,) * 2, node_of=(0, 0), tiers=(t1,),
                pair_latency=[[0, -1.0], [1e-6, 0]])
    with pytest.raises(ValueError, match="LinkTier.bandwidth"):
        LinkTier("x", 0.0, 1e-6)
    with pytest.raises(TypeError, match=r"devices\[1\]"):
        Cluster(devices=(CPU, "cpu"), node_of=(0, 0), tiers=(t1,))
    c = dgx_a100()
    with pytest.raises(ValueError, match="not a device"):
        c.link(0, 8)
    with pytest.raises(ValueError, match="not a node"):
        c.devices_of_node(1)


@pytest.mark.parametrize("make", [lambda: dgx_a100(nodes=2), dgx_h100, three_site_cluster,
                                  lambda: custom([0, 0, 1], device=[CPU, V100_32GB, H100_80GB])])
def test_json_round_trip_equals_original(make, tmp_path):
    c = make()
    assert Cluster.from_json(c.to_json()) == c
    path = tmp_path / "c.json"
    c.save(path)
    back = Cluster.load(path)
    assert back == c and hash(back) == hash(c)
    assert back.fingerprint() == c.fingerprint()
    json.loads(path.read_text())  # strict JSON (no NaN/Infinity)


def test_three_site_cluster_links_and_overrides():
    c = three_site_cluster()
    assert c.tier_of(0, 1) == 0 and c.tier_of(1, 2) == 1 and c.tier_of(3, 4) == 2
    assert c.link(0, 1) == (1e11, 1e-6) and c.link(1, 0) == (9e10, 1e-6)  # asymmetric
    assert c.link(3, 4) == (1.25e9, 10e-3)
    assert c.link(5, 4) == (2e9, 1e-6)
    assert c.pair_bandwidth[5][5] is None  # diagonal is ignored
    assert c.pair_latency[0][1] is None  # NaN means "use the tier"


def test_fingerprint_ignores_name_but_not_values():
    import dataclasses
    c = dgx_a100(nodes=2)
    assert dataclasses.replace(c, name="other").fingerprint() == c.fingerprint()
    slower = dataclasses.replace(c, tiers=(c.tiers[0], LinkTier("infiniband", 12.5e9, 5e-6)))
    assert slower.fingerprint() != c.fingerprint()
    assert len(c.fingerprint()) == 64


def _bad_file(tmp_path, mutate):
    doc = json.loads(dgx_a100(nodes=2).to_json())
    mutate(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["tiers"][1].__setitem__("bandwidth", -25e9), r"tiers\[1\]\.bandwidth"),
    (lambda d: d["tiers"][0].__setitem__("latency", "fast"), r"tiers\[0\]\.latency"),
    (lambda d: d["tiers"][0].pop("latency"), r"tiers\[0\]"),
    (lambda d: d.__setitem__("pair_bandwidth", [[1e9] * 16] * 15), "pair_bandwidth"),
    (lambda d: d.__setitem__("pair_bandwidth", [[1e9] * 15] * 16), r"pair_bandwidth\[0\]"),
    (lambda d: d.__setitem__("pair_latency", [[1e-6] * 16] * 15 + [[-1] + [1e-6] * 15]),
     r"pair_latency\[15\]\[0\]"),
    (lambda d: d["devices"][3].pop("memory_bandwidth"), r"devices\[3\]\.memory_bandwidth"),
    (lambda d: d["devices"].__setitem__(0, {"kind": "TPU-v9", "peak_flops": {"float32": 1e15},
                                            "memory_bytes": 1e11}),
     r"devices\[0\]\.memory_bandwidth"),
    (lambda d: d["devices"][2]["peak_flops"].__setitem__("bfloat16", 0),
     r"devices\[2\]\.peak_flops\['bfloat16'\]"),
    (lambda d: d["devices"].__setitem__(0, "TPU-v9"), r"devices\[0\].*unknown device kind"),
    (lambda d: d["node_of"].pop(), "node_of has 15 entries"),
    (lambda d: d["node_of"].__setitem__(0, 1.5), r"node_of\[0\]"),
    (lambda d: d.__setitem__("version", 7), "version"),
    (lambda d: d.__setitem__("bandwith", 1), "unknown keys"),
    (lambda d: d.pop("tiers"), "tiers is missing"),
])
def test_load_rejects_bad_field_naming_it(tmp_path, mutate, field):
    path = _bad_file(tmp_path, mutate)
    with pytest.raises(ValueError, match=field) as info:
        Cluster.load(path)
    assert str(path) in str(info.value)


def test_load_rejects_non_json_and_non_finite(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Cluster.load(path)
    text = dgx_a100().to_json().replace('"latency": 5e-06', '"latency": NaN')
    with pytest.raises(ValueError, match="NaN"):
        Cluster.from_json(text)


def test_from_json_accepts_preset_kind_names():
    text = json.dumps({"devices": ["H100-SXM5-80GB"] * 2, "node_of": [0, 0],
                       "tiers": [{"name": "nvlink", "bandwidth": 450e9, "latency": 1e-6}]})
    c = Cluster.from_json(text)
    assert c.devices == (H100_80GB, H100_80GB) and c.name == "custom"


def test_cluster_local_has_one_cpu_device_per_jax_device():
    jax = pytest.importorskip("jax")
    c = Cluster.local()
    assert c.num_devices == len(jax.devices())
    assert all(d == CPU for d in c.devices) and set(c.node_of) == {0}
    assert c.tiers == (LinkTier("local", 10e9, 5e-6),) and c.name == "local"


def test_subset_keeps_links_and_renumbers_nodes():
    big = dgx_a100(nodes=3)
    c = big.subset([16, 17, 8, 0])
    assert c.node_of == (0, 0, 1, 2) and c.num_nodes == 3
    for i, a in enumerate([16, 17, 8, 0]):
        for j, b in enumerate([16, 17, 8, 0]):
            assert c.link(i, j) == big.link(a, b)
    with pytest.raises(ValueError, match="more than once"):
        big.subset([1, 1])


# ---------------------------------------------------------------------------------------
# Collectives


def test_comm_bytes_formulas():
    s = 1024.0
    for kind in KINDS:
        assert comm_bytes(kind, s, 1) == 0.0
    assert comm_bytes("all-reduce", s, 2) == s
    assert comm_bytes("all-reduce", s, 8) == 2 * 7 / 8 * s
    for kind in ("all-gather", "reduce-scatter", "all-to-all"):
        assert comm_bytes(kind, s, 2) == s / 2
        assert comm_bytes(kind, s, 8) == 7 / 8 * s
    assert comm_bytes("collective-permute", s, 2) == s
    assert comm_bytes("collective-permute", s, 8) == s
    with pytest.raises(ValueError, match="all_reduce"):
        comm_bytes("all_reduce", s, 2)
    with pytest.raises(ValueError, match="n"):
        comm_bytes("all-reduce", s, 0)
    with pytest.raises(ValueError, match="nbytes"):
        comm_bytes("all-reduce", -1, 2)


@pytest.mark.parametrize("n", [2, 5, 8])
def test_ring_equals_closed_form_on_uniform_cluster(n):
    bw, lat, s = 100e9, 3e-6, 123e6
    c = uniform(n, bw, lat)
    g = list(range(n))
    t = collective_algorithms("all-reduce", s, g, c)["ring"]
    assert close(t, 2 * (n - 1) * lat + 2 * (n - 1) / n * s / bw)
    for kind in ("all-gather", "reduce-scatter"):
        t = collective_algorithms(kind, s, g, c)["ring"]
        assert close(t, (n - 1) * lat + (n - 1) / n * s / bw)


def test_tree_algorithms_equal_their_closed_forms_on_uniform_cluster():
    bw, lat, s, n = 50e9, 2e-6, 64e6, 8
    c = uniform(n, bw, lat)
    g = range(n)
    ar = collective_algorithms("all-reduce", s, g, c)
    assert close(ar["halving_doubling"], 2 * 3 * lat + 2 * (n - 1) / n * s / bw)
    assert close(ar["recursive_doubling"], 3 * (lat + s / bw))
    assert close(ar["star"], 2 * lat + 2 * (n - 1) * s / bw)
    ag = collective_algorithms("all-gather", s, g, c)
    assert close(ag["bruck"], 3 * lat + (n - 1) / n * s / bw)
    a2a = collective_algorithms("all-to-all", s, g, c)
    assert close(a2a["pairwise"], (n - 1) * (lat + s / n / bw))
    assert close(a2a["bruck"], 3 * (lat + s / 2 / bw))


def test_ring_spanning_two_nodes_is_limited_by_inter_node_tier():
    c, s = dgx_a100(nodes=2), 1e9
    t16 = collective_algorithms("all-reduce", s, range(16), c)["ring"]
    assert close(t16, 2 * 15 * 5e-6 + 2 * 15 / 16 * s / 25e9)
    t8 = collective_algorithms("all-reduce", s, range(8), c)["ring"]
    assert close(t8, 2 * 7 * 1e-6 + 2 * 7 / 8 * s / 300e9)
    assert t16 > 10 * t8
    # the same ring with one member moved to the other node pays the slow tier too
    t_mixed = collective_algorithms("all-reduce", s, [0, 1, 2, 3, 4, 5, 6, 8], c)["ring"]
    assert close(t_mixed, 2 * 7 * 5e-6 + 2 * 7 / 8 * s / 25e9)


def test_hierarchical_beats_flat_ring_across_two_dgx_nodes():
    c, s = dgx_a100(nodes=2), 1e9
    algos = collective_algorithms("all-reduce", s, range(16), c)
    assert algos["hierarchical"] < algos["ring"] / 5
    # rings inside nodes, ring across nodes on 1/8 of the data
    intra = 7 * 1e-6 + 7 / 8 * s / 300e9
    inter = 2 * 1 * 5e-6 + 2 * 1 / 2 * (s / 8) / 25e9
    assert algos["hierarchical"] <= 2 * intra + inter * (1 + 1e-12)
    assert collective_time("all-reduce", s, range(16), c) == min(algos.values())
    for kind in ("all-gather", "reduce-scatter"):
        algos = collective_algorithms(kind, s, range(16), c)
        assert algos["hierarchical"] < algos["ring"] / 5
    # one node only: no hierarchical variant
    assert "hierarchical" not in collective_algorithms("all-reduce", s, range(8), c)


def test_latency_dominates_small_messages_on_slow_links():
    # 1 Gb/s links with 2 ms latency, e.g. edge devices over Ethernet
    c = custom(node_of=list(range(8)), intra=(125e6, 2e-3), inter=(125e6, 2e-3))
    small = collective_algorithms("all-reduce", 1e3, range(8), c)
    best = min(small, key=small.get)
    assert best in ("star", "recursive_doubling")
    assert small["ring"] > 3 * small[best]
    big = collective_algorithms("all-reduce", 1e9, range(8), c)
    # bandwidth-optimal algorithms win at 1 GB; the latency-optimal ones lose badly
    assert big["ring"] <= min(big.values()) * 1.005
    assert big["star"] > 5 * big["ring"] and big["recursive_doubling"] > 1.5 * big["ring"]
    # with 6 devices (not a power of two) the ring is strictly the best at 1 GB
    big6 = collective_algorithms("all-reduce", 1e9, range(6), c)
    assert min(big6, key=big6.get) == "ring"
    small6 = collective_algorithms("all-reduce", 1e3, range(6), c)
    assert min(small6, key=small6.get) in ("star", "recursive_doubling")


def test_one_slow_pair_slows_only_rings_through_it():
    n, s = 4, 1e8
    slow = [[None] * n for _ in range(n)]
    slow[1][2] = slow[2][1] = 1e9
    base = custom(node_of=[0] * n, intra=(100e9, 1e-6))
    c = custom(node_of=[0] * n, intra=(100e9, 1e-6), pair_bandwidth=slow)
    assert c.link(1, 2) == (1e9, 1e-6) and c.link(0, 1) == (100e9, 1e-6)
    through = collective_algorithms("all-reduce", s, [0, 1, 2, 3], c)["ring"]
    around = collective_algorithms("all-reduce", s, [0, 1, 3, 2], c)["ring"]
    reference = collective_algorithms("all-reduce", s, [0, 1, 2, 3], base)["ring"]
    assert close(around, reference)
    assert close(through, 2 * 3 * 1e-6 + 2 * 3 / 4 * s / 1e9)
    assert through > 50 * around
    # a slow latency override on one pair raises the ring's alpha
    lat = np.full((n, n), np.nan)
    lat[3, 0] = 1e-3
    c2 = custom(node_of=[0] * n, intra=(100e9, 1e-6), pair_latency=lat)
    t = collective_algorithms("all-gather", 0, [0, 1, 2, 3], c2)["ring"]
    assert close(t, 3 * 1e-3)


def test_every_kind_single_device_and_best_of_algorithms():
    c = dgx_a100(nodes=2)
    for kind in KINDS:
        assert collective_time(kind, 1e6, [5], c) == 0.0
        algos = collective_algorithms(kind, 1e6, list(range(0, 16, 3)), c)
        assert collective_time(kind, 1e6, list(range(0, 16, 3)), c) == min(algos.values())
        assert all(t > 0 for t in algos.values())


def test_collective_permute_and_p2p():
    c, s = dgx_a100(nodes=2), 1e8
    # pipeline hops 0 -> 8 (IB) and 8 -> 9 (NVLink): the slow pair decides
    t = collective_time("collective-permute", s, [(0, 8), (8, 9)], c)
    assert close(t, 5e-6 + s / 25e9)
    # ids form a cyclic shift
    assert close(collective_time("collective-permute", s, [0, 1, 2], c), 1e-6 + s / 300e9)
    assert collective_time("collective-permute", s, [(3, 3)], c) == 0.0
    assert close(p2p_time(s, 0, 8, c), 5e-6 + s / 25e9)
    assert p2p_time(s, 4, 4, c) == 0.0


def test_collective_input_errors():
    c = dgx_a100()
    with pytest.raises(ValueError, match="more than once"):
        collective_time("all-reduce", 1.0, [0, 1, 1], c)
    with pytest.raises(ValueError, match="not a device"):
        collective_time("all-reduce", 1.0, [0, 9], c)
    with pytest.raises(ValueError, match="empty"):
        collective_time("all-gather", 1.0, [], c)
    with pytest.raises(ValueError, match="HLO"):
        collective_time("allreduce", 1.0, [0, 1], c)
    with pytest.raises(TypeError, match="Cluster"):
        collective_time("all-reduce", 1.0, [0, 1], "dgx")


# ---------------------------------------------------------------------------------------
# Compute


def test_roofline_compute_and_memory_bound():
    eff = Efficiency(matmul=0.5, elementwise=0.25, memory=0.8)
    # compute-bound matmul: 312e12 FLOPs at 50% of 312 TFLOP/s
    assert close(op_time(312e12, 1e9, A100_80GB, "bfloat16", True, eff), 2.0)
    assert close(compute_time(312e12, 1e9, A100_80GB, "bfloat16", eff), 2.0)
    # memory-bound: 2.039e12 bytes at 80% of 2.039 TB/s
    assert close(op_time(1e9, 2.039e12, A100_80GB, "bfloat16", True, eff), 1.25)
    # non-matmul FLOPs run at the vector (float32) rate, not the tensor-core rate
    assert close(op_time(19.5e12, 0, A100_80GB, "bfloat16", False, eff), 4.0)
    assert close(op_time(9.7e12, 0, A100_80GB, "float64", False, eff), 4.0)
    assert op_time(0, 0, CPU, "float32", False) == 0.0


def test_efficiency_validation():
    for bad in (0.0, 1.01, -0.1, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="Efficiency.memory"):
            Efficiency(memory=bad)
    with pytest.raises(ValueError, match="flops"):
        op_time(-1, 0, A100_80GB, "bfloat16", True)


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["", "_device", "_cluster", "_collectives", "_compute",
                                    "_pipeline", "_presets"])
def test_docstring_examples(module):
    import importlib
    mod = importlib.import_module("meshplan.costmodel" + ("." + module if module else ""))
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_public_names():
    for name in cm.__all__:
        assert hasattr(cm, name)
