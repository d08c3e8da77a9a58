"""Property tests: every layout op inverts exactly, agrees with torch's own op on real data, and every family's
fuse/unfuse composition is the identity on random per-expert tensors (bitwise)."""

from __future__ import annotations

import os
from math import prod

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_adapters.converters import ByteTensor, Concat, Rename, Split, Stack, Transpose, Unstack, even_split
from moe_adapters.converters.ops import Dequantize, NotReversible
from moe_adapters.errors import ModelError
from moe_adapters.families import REGISTRY
from moe_adapters.layout import ExpertMap, fuse, unfuse_param
from moe_adapters.tensor_io import materialize

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "U8": torch.uint8, "I64": torch.int64}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Store:
    """Tensors written into one scratch file so ByteTensors can point at them."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.f = open(path, "wb")
        self.pos = 0

    def put(self, t: torch.Tensor, dtype: str) -> ByteTensor:
        data = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self.f.write(data)
        self.f.flush()
        ref = ByteTensor.contiguous(dtype, tuple(t.shape), self.path, self.pos)
        self.pos += len(data)
        return ref


def rand(shape, dtype: str, g: torch.Generator) -> torch.Tensor:
    tdt = DTYPES[dtype]
    if tdt.is_floating_point:
        return torch.randn(shape, generator=g).to(tdt)
    return torch.randint(0, 100, shape, generator=g).to(tdt)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4)


@SETTINGS
@given(shape=shapes, n=st.integers(1, 4), dtype=st.sampled_from(list(DTYPES)), seed=st.integers(0, 2**31))
def test_stack_unstack(tmp_path, shape, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    store = Store(str(tmp_path / f"s{seed}.bin"))
    xs = [rand(shape, dtype, g) for _ in range(n)]
    refs = [store.put(x, dtype) for x in xs]
    (stacked,) = Stack().apply(refs)
    assert same(materialize(stacked), torch.stack(xs))
    back = Stack().inverse().apply([stacked])
    assert all(same(materialize(b), x) for b, x in zip(back, xs))
    assert isinstance(Unstack().inverse(), Stack)


@SETTINGS
@given(shape=shapes, sizes=st.lists(st.integers(0, 3), min_size=1, max_size=4), data=st.data(),
       dtype=st.sampled_from(list(DTYPES)), seed=st.integers(0, 2**31))
def test_concat_split(tmp_path, shape, sizes, data, dtype, seed):
    dim = data.draw(st.integers(0, len(shape) - 1))
    g = torch.Generator().manual_seed(seed)
    store = Store(str(tmp_path / f"c{seed}.bin"))
    xs = []
    for s in sizes:
        sh = list(shape)
        sh[dim] = s
        xs.append(rand(sh, dtype, g))
    refs = [store.put(x, dtype) for x in xs]
    op = Concat(dim, tuple(sizes))
    (cat,) = op.apply(refs)
    assert same(materialize(cat), torch.cat(xs, dim))
    back = op.inverse().apply([cat])
    assert all(same(materialize(b), x) for b, x in zip(back, xs))
    (again,) = op.inverse().inverse().apply(back)
    assert again.segments == cat.segments


@SETTINGS
@given(e=st.integers(1, 6), parts=st.integers(1, 6), rest=shapes, seed=st.integers(0, 2**31))
def test_ep_split_and_reshard(tmp_path, e, parts, rest, seed):
    n = e * parts
    g = torch.Generator().manual_seed(seed)
    store = Store(str(tmp_path / f"e{seed}.bin"))
    x = rand([n, *rest], "BF16", g)
    ref = store.put(x, "BF16")
    pieces = Split(0, even_split(n, parts)).apply([ref])
    for r, p in enumerate(pieces):
        assert same(materialize(p), x[r * e : (r + 1) * e])
        assert len(p.segments) == 1  # an EP slice is one contiguous range
    (whole,) = Concat(0).apply(pieces)
    other = Split(0, even_split(n, 1 if n % 2 else 2)).apply([whole])
    assert same(torch.cat([materialize(p) for p in other]), x)


@SETTINGS
@given(shape=st.lists(st.integers(1, 5), min_size=2, max_size=3), seed=st.integers(0, 2**31))
def test_transpose_is_its_own_inverse(shape, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    op = Transpose(-1, -2)
    (y,) = op.apply_tensors([x])
    assert same(y, x.transpose(-1, -2).contiguous())
    assert same(op.inverse().apply_tensors([y])[0], x)


@given(key=st.text("abk.", max_size=12), anchored=st.booleans())
def test_rename_inverts_on_keys_without_the_new_text(key, anchored):
    r = Rename("a.b", "k.", anchored)
    if "k." not in key:
        assert r.inverse().apply(r.apply(key)) == key


def test_planner_refuses_a_rename_that_does_not_round_trip():
    """Mixtral renames `.block_sparse_moe.` to `.mlp.`; a published key that already says `.mlp.` would come back
    as `.block_sparse_moe.`, so it must be refused rather than silently renamed."""
    fam = REGISTRY["mixtral"]
    emap = ExpertMap(fam, {"num_hidden_layers": 1, "num_local_experts": 2})
    assert emap.dense_fused_name("model.layers.0.block_sparse_moe.gate.weight") == "model.layers.0.mlp.gate.weight"
    with pytest.raises(ModelError, match="not reversible"):
        emap.dense_fused_name("model.layers.0.mlp.extra.weight")


def test_dequantize_is_one_way():
    with pytest.raises(NotReversible):
        Dequantize().inverse()


@pytest.mark.parametrize("name", sorted(n for n, f in REGISTRY.items() if not f.experts.stacked))
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_exp=st.sampled_from([2, 4, 8]), inter=st.integers(1, 5), hidden=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_family_fuse_unfuse_is_identity(tmp_path, name, n_exp, inter, hidden, seed):
    """Random per-expert tensors under the family's real key names -> fused at every EP size -> back, bitwise; and
    the fused tensors equal v5's own definition (stack experts; gate rows then up rows)."""
    fam = REGISTRY[name]
    cfg = {"num_hidden_layers": 2, "layers_block_type": ["moe", "moe"], "first_k_dense_replace": 0}
    for k in fam.num_experts:
        cfg[k] = n_exp
    emap = ExpertMap(fam, cfg)
    g = torch.Generator().manual_seed(seed)
    store = Store(str(tmp_path / f"f{name}{seed}.bin"))
    canonical, real = {}, {}
    for L in emap.moe_layers:
        for e in range(n_exp):
            for proj in {p for prm in emap.params for p in prm.projs}:
                shape = (hidden, inter) if proj == fam.experts.down else (inter, hidden)
                x = rand(shape, "BF16", g)
                key = emap.hf_name(L, e, proj, "weight")
                canonical[key], real[key] = store.put(x, "BF16"), x
    dense = rand((3, hidden), "F32", g)
    canonical["lm_head.weight"], real["lm_head.weight"] = store.put(dense, "F32"), dense
    for ep in [d for d in (1, 2, 4, 8) if n_exp % d == 0]:
        ft = fuse(canonical, emap, ep)
        assert [n for n, _ in ft.dense] == ["lm_head.weight"]
        rebuilt = {}
        for p in (p for p in emap.params if p.tensor == "weight"):
            parts = [dict(rank)[p.name] for rank in ft.ranks]
            full = Concat(0).apply(parts)[0]
            want = torch.stack([torch.cat([real[emap.hf_name(p.layer, e, proj, "weight")] for proj in p.projs])
                                for e in range(n_exp)])
            assert same(materialize(full), want)
            rebuilt.update(dict(unfuse_param(p, full, emap)))
        for k, v in rebuilt.items():
            assert same(materialize(v), real[k]), k
        assert set(rebuilt) | {"lm_head.weight"} == set(canonical)


@pytest.mark.parametrize("name", sorted(n for n, f in REGISTRY.items() if f.experts.stacked))
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_exp=st.sampled_from([2, 4, 8]), inter=st.integers(1, 5), hidden=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_stacked_family_fuse_unfuse_is_identity(tmp_path, name, n_exp, inter, hidden, seed):
    """Experts already stacked in the checkpoint (GraniteMoE, Llama 4, gpt-oss): random [E, ...] tensors under the
    published names (every declared form: weights, biases, MXFP4 blocks/scales) -> fused at every EP size -> back,
    bitwise; each rank's part is rows [r*E/ep, (r+1)*E/ep) of the stored tensor, never transposed."""
    fam = REGISTRY[name]
    ex = fam.experts
    cfg = {"num_hidden_layers": 2, "hidden_size": hidden, "intermediate_size": inter}
    for k in fam.num_experts:
        cfg[k] = n_exp
    emap = ExpertMap(fam, cfg)
    g = torch.Generator().manual_seed(seed)
    store = Store(str(tmp_path / f"s{name}{seed}.bin"))
    canonical, real = {}, {}
    quantized = bool(ex.quantized) and seed % 2 == 1  # odd seeds: the weights in their quantized (MXFP4) form
    n_in = 2 * inter if ex.gated else inter
    for p in emap.params:
        base = p.tensor
        w = ex.in_proj if base.startswith(ex.in_proj) else ex.down
        out_dim, in_dim = (n_in, hidden) if w == ex.in_proj else (hidden, inter)
        if base == w:
            if quantized:
                continue
            shape, dtype = ((n_exp, in_dim, out_dim) if ex.transposed else (n_exp, out_dim, in_dim)), "BF16"
        elif base == w + "_bias":
            shape, dtype = (n_exp, out_dim), "BF16"
        elif base == w + "_blocks":
            if not quantized:
                continue
            shape, dtype = (n_exp, out_dim, 1, 16), "U8"
        elif base == w + "_scales":
            if not quantized:
                continue
            shape, dtype = (n_exp, out_dim, 1), "U8"
        else:
            raise AssertionError(base)
        x = rand(shape, dtype, g)
        canonical[p.stored], real[p.stored] = store.put(x, dtype), x
    dense = rand((3, hidden), "F32", g)
    canonical["lm_head.weight"], real["lm_head.weight"] = store.put(dense, "F32"), dense
    for ep in [d for d in (1, 2, 4, 8) if n_exp % d == 0]:
        ft = fuse(canonical, emap, ep)
        assert [n for n, _ in ft.dense] == ["lm_head.weight"]
        rebuilt = {}
        for p in emap.params:
            parts = [dict(rank).get(p.name) for rank in ft.ranks]
            if p.stored not in canonical:
                assert parts == [None] * ep
                continue
            for r, part in enumerate(parts):
                n = n_exp // ep
                assert same(materialize(part), real[p.stored][r * n : (r + 1) * n])
            rebuilt.update(dict(unfuse_param(p, Concat(0).apply(parts)[0], emap)))
        for k, v in rebuilt.items():
            assert same(materialize(v), real[k]), k
        assert set(rebuilt) | {"lm_head.weight"} == set(canonical)
