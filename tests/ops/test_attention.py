"""mmvl.ops.attention: backends agree with the math reference, selection rules, and patched timm/MONAI modules
give the unpatched outputs and gradients."""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import pickle
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

from mmvl.ops import AttentionBackendError, attention, available_backends, current_backend, patch_attention

OPS = importlib.import_module("mmvl.ops._attention")  # the implementation module


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("MMVL_ATTENTION", raising=False)


@contextlib.contextmanager
def mmvl_records(level=logging.DEBUG):
    """Records of the ``mmvl`` logger, which does not propagate to pytest's root handler."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level)
    handler.emit = records.append
    root = logging.getLogger("mmvl")
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def qkv(batch=2, heads=3, n_query=7, n_key=11, dim=16, dim_v=8, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, d, generator=generator).to(dtype)
                 for n, d in ((n_query, dim), (n_key, dim), (n_key, dim_v)))


def make_mask(kind, batch=2, heads=3, n_query=7, n_key=11, seed=1):
    generator = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool":
        mask = torch.rand(batch, 1, n_query, n_key, generator=generator) > 0.3
        mask[..., 0] = True  # every query keeps a key
        return mask
    if kind == "additive":
        mask = torch.randn(batch, heads, n_query, n_key, generator=generator)
        mask[..., 1::3] = float("-inf")
        return mask
    if kind == "key_padding":
        lengths = torch.tensor([n_key, n_key - 4])[:batch]
        return torch.arange(n_key)[None] < lengths[:, None]  # (B, Nk)
    if kind == "keys_1d":
        return torch.arange(n_key) % 4 != 3  # (Nk,)
    if kind == "heads_3d":
        return torch.randn(heads, n_query, n_key, generator=generator)  # (H, Nq, Nk) additive
    raise ValueError(kind)


MASKS = [None, "bool", "additive", "key_padding", "keys_1d", "heads_3d"]


# Tolerances. Two computations of the same attention (SDPA's fused kernel vs the math path, a patched module vs
# the library's own) differ only in the order their sums run in, and so does one computation on two CPUs: torch
# and oneDNN pick their matmul and reduction kernels by instruction set (default, AVX2, AVX-512, AMX), and each
# blocks and vectorises the sums differently. Rounding a sum of n terms errs by up to about n * eps times the
# largest term (Higham's bound for recursive summation; the typical error grows like sqrt(n) * eps), and every
# layer the result goes through adds its own. The error is proportional to the size of the values, not fixed:
# a gradient summed over the batch and every token (cls_token, biases) can be ~100, and a fixed atol of 1e-5 is
# then only a few eps of it -- which is how test_vit_patched_matches_unpatched[timm-math] failed on a Xeon with
# AVX-512/AMX. So atol scales with the reference's largest value and the bound is eps of the dtype times the
# longest reduction times the number of stacked reductions (``depth``; a gradient counts the forward and the
# backward). Measured on this code (ATEN_CPU_CAPABILITY=default/avx2/avx512, ONEDNN_MAX_CPU_ISA=AVX2): the
# outputs and gradients moved by at most 7.5 eps * max|reference| between kernels or backends, while these
# bounds are >= 32 eps (single attention calls) to 1024 eps (the 2-block ViTs' gradients); a wrong patch (scale,
# mask, head split, dropout in eval) moves results by 1e-2 of their size or more, far above any of them.


def summation_tolerance(reference, reduction, depth, dtype=torch.float32):
    """``assert_close`` tolerances for comparing with ``reference``: ``reduction`` is the longest sum (head dim,
    keys, hidden width, tokens), ``depth`` how many such sums are stacked between input and compared value."""
    bound = torch.finfo(dtype).eps * reduction * depth
    return dict(atol=bound * reference.detach().abs().max().item(), rtol=bound)


# ---------------------------------------------------------------------------------------------------------------
# attention(): numerics


@pytest.mark.parametrize("kind", MASKS)
def test_sdpa_matches_math_float32(kind):
    q, k, v = qkv()
    mask = make_mask(kind)
    sdpa = attention(q, k, v, mask=mask, backend="sdpa")
    reference = attention(q, k, v, mask=mask, backend="math")
    assert sdpa.shape == (2, 3, 7, 8) and sdpa.dtype == torch.float32
    # head dim 16 and 11 keys; two stacked sums: scores, then weights times values
    torch.testing.assert_close(sdpa, reference, **summation_tolerance(reference, reduction=16, depth=2))
    if kind == "key_padding":  # padded keys get no weight: changing their values changes nothing
        k2, v2 = k.clone(), v.clone()
        k2[1, :, -4:], v2[1, :, -4:] = 100.0, -100.0
        torch.testing.assert_close(attention(q, k2, v2, mask=mask, backend="math"), reference)


@pytest.mark.parametrize("kind", [None, "bool", "additive", "key_padding"])
def test_sdpa_matches_math_bfloat16(kind):
    q, k, v = qkv(dtype=torch.bfloat16)
    mask = make_mask(kind)
    sdpa = attention(q, k, v, mask=mask, backend="sdpa")
    reference = attention(q, k, v, mask=mask, backend="math")
    assert sdpa.dtype == reference.dtype == torch.bfloat16
    # both accumulate in float32 and round to bfloat16 where a result is stored (the math path: scores, weights,
    # output; SDPA: the output): what differs is those roundings, eps_bf16 = 7.8e-3 each, not the sums' order.
    # Measured: at most 0.54 eps_bf16 * max|reference| apart, and 0.43 from the float32 result
    bf16 = dict(reduction=1, dtype=torch.bfloat16)
    sdpa, reference = sdpa.float(), reference.float()
    torch.testing.assert_close(sdpa, reference, **summation_tolerance(reference, depth=3, **bf16))
    # the math path accumulates in float32: it stays within two of those roundings of the float32 result
    exact = attention(*(t.float() for t in (q, k, v)), mask=mask, backend="math")
    torch.testing.assert_close(reference, exact, **summation_tolerance(exact, depth=2, **bf16))


def test_math_gradients_match_sdpa_and_scale():
    q, k, v = (t.requires_grad_() for t in qkv())
    mask = make_mask("additive")
    grads = {}
    for backend in ("sdpa", "math"):
        out = attention(q, k, v, mask=mask, scale=0.3, backend=backend)
        grads[backend] = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b in zip(grads["sdpa"], grads["math"]):  # two sums forward, two more backward
        torch.testing.assert_close(a, b, **summation_tolerance(b, reduction=16, depth=4))
    default = attention(q, k, v, backend="math")
    explicit = attention(q, k, v, scale=16**-0.5, backend="math")
    torch.testing.assert_close(default, explicit)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_fully_masked_rows_give_zeros_not_nan(backend):
    q, k, v = (t.requires_grad_() for t in qkv())
    mask = torch.ones(2, 1, 7, 11, dtype=torch.bool)
    mask[0, 0, 2] = False
    out = attention(q, k, v, mask=mask, backend=backend)
    assert torch.equal(out[0, :, 2], torch.zeros(3, 8))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_bad_masks_and_shapes_are_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"\(B, Nk\) = \(2, 11\) key-padding mask, got \(7, 11\)"):
        attention(q, k, v, mask=torch.ones(7, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        attention(q, k, v, mask=torch.ones(2, 3, 7, 10))
    with pytest.raises(TypeError, match="bool .* or floating"):
        attention(q, k, v, mask=torch.ones(2, 11, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expects \(B, H, N, D\)"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="do not match"):
        attention(q, k[:, :2], v)
    with pytest.raises(ValueError, match="dropout"):
        attention(q, k, v, dropout=1.5)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_dropout_is_applied_when_passed_and_reproducible_with_a_seed(backend):
    q, k, v = qkv()
    plain = attention(q, k, v, backend=backend)
    torch.testing.assert_close(attention(q, k, v, dropout=0.0, backend=backend), plain)
    torch.manual_seed(0)
    first = attention(q, k, v, dropout=0.5, backend=backend)
    torch.manual_seed(0)
    second = attention(q, k, v, dropout=0.5, backend=backend)
    assert torch.equal(first, second)
    assert not torch.allclose(first, plain)


def test_patched_module_drops_attention_only_in_training():
    from timm.layers import Attention

    torch.manual_seed(0)
    module = Attention(32, num_heads=4, qkv_bias=True, attn_drop=0.5).eval()
    reference = copy.deepcopy(module)
    patch_attention(module)
    x = torch.randn(2, 9, 32)
    expected = reference(x)  # eval: no dropout; width 32, four stacked sums (qkv, scores, values, proj)
    torch.testing.assert_close(module(x), expected, **summation_tolerance(expected, reduction=32, depth=4))
    module.train()
    torch.manual_seed(1)
    first = module(x)
    torch.manual_seed(1)
    second = module(x)
    assert torch.equal(first, second)
    assert not torch.allclose(first, reference(x))


# ---------------------------------------------------------------------------------------------------------------
# attention(): choosing the backend


def spy_backends(monkeypatch) -> list[str]:
    calls: list[str] = []
    for name, implementation in list(OPS._IMPLEMENTATIONS.items()):
        def spy(*args, _name=name, _implementation=implementation):
            calls.append(_name)
            return _implementation(*args)
        monkeypatch.setitem(OPS._IMPLEMENTATIONS, name, spy)
    return calls


def test_env_var_and_argument_choose_the_backend(monkeypatch):
    calls = spy_backends(monkeypatch)
    q, k, v = qkv()
    assert current_backend("cpu") == "sdpa"
    attention(q, k, v)
    monkeypatch.setenv("MMVL_ATTENTION", "math")
    assert current_backend("cpu") == "math"
    attention(q, k, v)
    attention(q, k, v, backend="sdpa")  # the argument wins over the environment
    monkeypatch.setenv("MMVL_ATTENTION", " Auto ")
    attention(q, k, v)
    assert calls == ["sdpa", "math", "sdpa", "sdpa"]
    monkeypatch.setenv("MMVL_ATTENTION", "flash")
    with pytest.raises(AttentionBackendError, match="MMVL_ATTENTION=flash: unknown attention backend 'flash'"):
        attention(q, k, v)
    with pytest.raises(AttentionBackendError, match="MMVL_ATTENTION"):
        current_backend("cpu")
    with pytest.raises(AttentionBackendError, match="backend='naive': unknown .* xformers, sdpa, math"):
        attention(q, k, v, backend="naive")


def test_xformers_on_cpu_is_a_clear_error(monkeypatch):
    q, k, v = qkv()
    if OPS._load_xformers()[0] is None:
        with pytest.raises(AttentionBackendError, match="xformers does not import .*CUDA tensors only"):
            attention(q, k, v, backend="xformers")
    monkeypatch.setattr(OPS, "_load_xformers", lambda: (types.SimpleNamespace(), ""))  # "installed"
    with pytest.raises(AttentionBackendError, match=r"backend='xformers' asks for xformers.*on 'cpu'") as info:
        attention(q, k, v, backend="xformers")
    assert "does not import" not in str(info.value)
    monkeypatch.setenv("MMVL_ATTENTION", "xformers")
    with pytest.raises(AttentionBackendError, match="MMVL_ATTENTION=xformers asks for xformers"):
        attention(q, k, v)
    with pytest.raises(AttentionBackendError, match="CUDA tensors only"):
        current_backend("cpu")


def test_automatic_choice_by_device_and_availability(monkeypatch):
    monkeypatch.setattr(OPS, "_load_xformers", lambda: (None, "xformers does not import (test)"))
    assert current_backend("cuda") == "sdpa" and current_backend("cpu") == "sdpa"
    assert available_backends() == ("sdpa", "math") == available_backends("cuda")
    monkeypatch.setattr(OPS, "_load_xformers", lambda: (types.SimpleNamespace(), ""))
    assert current_backend("cuda") == "xformers"
    assert current_backend(torch.device("cuda", 0), torch.bfloat16) == "xformers"
    assert current_backend("cuda", torch.float64) == "sdpa"  # no xformers kernel for float64
    assert current_backend("cpu") == "sdpa"
    assert available_backends() == ("xformers", "sdpa", "math") == available_backends("cuda")
    assert available_backends("cpu") == ("sdpa", "math")


def test_automatic_xformers_falls_back_to_sdpa_with_one_warning(monkeypatch):
    calls = spy_backends(monkeypatch)

    def no_kernel(*args):
        calls.append("xformers")
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n...")

    monkeypatch.setitem(OPS._IMPLEMENTATIONS, "xformers", no_kernel)
    monkeypatch.setattr(OPS, "_xformers_problems", lambda device: [])  # pretend: installed and on CUDA
    monkeypatch.setattr(OPS, "_logged_fallbacks", set())
    q, k, v = qkv()
    with mmvl_records() as records:
        out = attention(q, k, v)
        attention(q, k, v)
    expected = attention(q, k, v, backend="math")
    torch.testing.assert_close(out, expected, **summation_tolerance(expected, reduction=16, depth=2))
    assert calls == ["xformers", "sdpa", "xformers", "sdpa", "math"]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert warnings == ["xformers cannot run this attention (No operator found for "
                        "`memory_efficient_attention_forward` with inputs:); using torch SDPA instead"]
    with pytest.raises(NotImplementedError):  # an explicit request is not rerouted
        attention(q, k, v, backend="xformers")


def test_backend_is_logged_once_per_backend_and_device(monkeypatch):
    monkeypatch.setattr(OPS, "_logged_choices", set())
    q, k, v = qkv()
    with mmvl_records(logging.INFO) as records:
        for _ in range(3):
            attention(q, k, v)
            attention(q, k, v, backend="math")
    assert [r.getMessage() for r in records] == [
        "attention backend on cpu: sdpa (automatic)",
        "attention backend on cpu: math (backend='math')",
    ]


# ---------------------------------------------------------------------------------------------------------------
# patch_attention(): timm


def tiny_vit(family):
    """The two ViTs mmvl builds on, 2 blocks each, in eval mode, and an input: timm 2D and MONAI 3D."""
    torch.manual_seed(0)
    if family == "timm":
        import timm

        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64,
                                  num_heads=2, num_classes=0, in_chans=1)
        shape = (2, 1, 32, 32)
    else:
        from monai.networks.nets import ViT

        model = ViT(in_channels=1, img_size=(16, 16, 16), patch_size=(8, 8, 8), hidden_size=64, mlp_dim=128,
                    num_layers=2, num_heads=2, classification=False)
        shape = (2, 1, 16, 16, 16)
    return model.eval(), torch.randn(shape, generator=torch.Generator().manual_seed(1))


def outputs_and_grads(model, x, first_output=False):
    """Output and the gradients of a fixed random projection of it w.r.t. the input and every parameter."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    out = out[0] if first_output else out
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def assert_same(reference, patched, reduction, depth):
    """Outputs, input gradients and every parameter gradient, each within the tolerance of its own size."""
    torch.testing.assert_close(patched[0], reference[0], **summation_tolerance(reference[0], reduction, depth))
    torch.testing.assert_close(patched[1], reference[1], **summation_tolerance(reference[1], reduction, 2 * depth))
    assert patched[2].keys() == reference[2].keys() and len(reference[2]) > 0
    for name, expected in reference[2].items():
        torch.testing.assert_close(patched[2][name], expected, msg=name,
                                   **summation_tolerance(expected, reduction, 2 * depth))


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("family", ["timm", "monai"])
def test_vit_patched_matches_unpatched(monkeypatch, family, backend):
    monkeypatch.setenv("MMVL_ATTENTION", backend)
    calls = spy_backends(monkeypatch)
    reference, x = tiny_vit(family)
    model = copy.deepcopy(reference)
    keys = list(model.state_dict())
    assert patch_attention(model) == 2
    assert patch_attention(model) == 0  # idempotent
    assert list(model.state_dict()) == keys
    attn = model.blocks[0].attn
    assert type(attn).__name__ == {"timm": "PatchedTimmAttention", "monai": "PatchedSABlock"}[family]
    assert isinstance(attn, type(reference.blocks[0].attn))
    first_output = family == "monai"  # MONAI's ViT returns (tokens, hidden states of every block)
    # the longest sum is the MLP's hidden width (timm 4 * 64, MONAI mlp_dim 128); two blocks, and gradients
    # go back through them again (assert_same doubles the depth for them)
    reduction = {"timm": 256, "monai": 128}[family]
    assert_same(outputs_and_grads(reference, x, first_output), outputs_and_grads(model, x, first_output),
                reduction=reduction, depth=2)
    assert calls == [backend] * 2  # one call per block, none left on the library's own path
    if family == "monai":
        for a, b in zip(model(x)[1], reference(x)[1]):
            torch.testing.assert_close(a, b, **summation_tolerance(b, reduction, depth=2))


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_timm_attention_options_and_masks(monkeypatch, backend):
    from timm.layers import Attention

    monkeypatch.setenv("MMVL_ATTENTION", backend)
    torch.manual_seed(0)
    reference = Attention(32, num_heads=4, attn_head_dim=6, dim_out=24, qkv_bias=True, qk_norm=True,
                          scale_norm=True, gated=True, norm_layer=nn.LayerNorm).eval()
    module = copy.deepcopy(reference)
    assert patch_attention(module) == 1
    x = torch.randn(2, 9, 32)
    bool_mask = torch.rand(2, 1, 9, 9) > 0.3
    bool_mask[..., 0] = True
    square_bias = torch.randn(9, 9)  # 2-D: timm hands it to SDPA as (Nq, Nk), not as key padding
    for kwargs in (dict(), dict(attn_mask=bool_mask), dict(attn_mask=square_bias), dict(is_causal=True)):
        expected = reference(x, **kwargs)  # width 32, then norms, scores, values, gate and proj
        torch.testing.assert_close(module(x, **kwargs), expected, msg=str(kwargs),
                                   **summation_tolerance(expected, reduction=32, depth=6))
    with pytest.raises(ValueError, match="cannot be combined"):
        module(x, attn_mask=bool_mask, is_causal=True)


def test_patched_model_pickles_and_deep_copies():
    reference, x = tiny_vit("timm")
    model = copy.deepcopy(reference)
    patch_attention(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone.blocks[1].attn).__name__ == "PatchedTimmAttention"
        expected = reference(x)
        torch.testing.assert_close(clone(x), expected, **summation_tolerance(expected, reduction=256, depth=2))


def test_a_class_whose_forward_changed_is_refused(monkeypatch):
    class RopeAttention(nn.Module):  # what a timm release adding a forward argument would look like
        def forward(self, x, rope=None, attn_mask=None, is_causal=False):
            return x

    fake = types.ModuleType("fake_timm_layers")
    fake.Attention = RopeAttention
    monkeypatch.setitem(sys.modules, "fake_timm_layers", fake)
    monkeypatch.setattr(OPS, "_PATCHABLE", (("fake_timm_layers", "Attention", "PatchedFake", OPS._timm_forward,
                                             OPS._timm_unsupported),))
    with mmvl_records() as records:
        entry = OPS._patched_class.__wrapped__(0)
    assert entry is None and "PatchedFake" not in vars(OPS)
    assert any("keep their own attention" in r.getMessage() and r.levelno == logging.WARNING for r in records)


# ---------------------------------------------------------------------------------------------------------------
# patch_attention(): MONAI


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(qkv_bias=True, use_combined_linear=False),
    dict(include_fc=False),
    dict(dim_head=6, hidden_input_size=24),
    dict(causal=True, sequence_length=12),
    dict(use_flash_attention=True),
], ids=["default", "separate_qkv", "no_fc", "dim_head", "causal", "flash"])
def test_monai_sablock_options(kwargs):
    from monai.networks.blocks.selfattention import SABlock

    torch.manual_seed(0)
    reference = SABlock(32, 4, **kwargs).eval()
    module = copy.deepcopy(reference)
    assert patch_attention(module) == 1
    x = torch.randn(2, 9, kwargs.get("hidden_input_size", 32), requires_grad=True)
    out, expected = module(x), reference(x)  # width 32, four stacked sums (qkv, scores, values, out_proj)
    torch.testing.assert_close(out, expected, **summation_tolerance(expected, reduction=32, depth=4))
    grad, grad_expected = (torch.autograd.grad(y.square().sum(), x)[0] for y in (out, expected))
    torch.testing.assert_close(grad, grad_expected, **summation_tolerance(grad_expected, reduction=32, depth=8))
    if not kwargs.get("causal") and not kwargs.get("use_flash_attention"):
        padding = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])  # MONAI: (B, N), 0 = padded key
        expected = reference(x, attn_mask=padding)
        torch.testing.assert_close(module(x, attn_mask=padding), expected,
                                   **summation_tolerance(expected, reduction=32, depth=4))
    if kwargs.get("causal"):
        with pytest.raises(ValueError, match="Causal attention does not support attention masks"):
            module(x, attn_mask=torch.ones(2, 9))


@pytest.mark.parametrize("kwargs, reason", [
    (dict(save_attn=True), "save_attn=True"),
    (dict(rel_pos_embedding="decomposed", input_size=(3, 3)), "rel_pos_embedding"),
    (dict(attention_dtype=torch.float32), "attention_dtype"),
])
def test_monai_options_without_a_patch_keep_monai_attention(kwargs, reason):
    from monai.networks.blocks.selfattention import SABlock

    torch.manual_seed(0)
    model = nn.Sequential(SABlock(32, 4, **kwargs), SABlock(32, 4))
    with mmvl_records() as records:
        assert patch_attention(model) == 1
    assert type(model[0]) is SABlock and type(model[1]).__name__ == "PatchedSABlock"
    assert any(reason in r.getMessage() and r.getMessage().startswith("0 (SABlock) keeps its own attention")
               for r in records)
    model[0](torch.randn(1, 9, 32))  # still runs MONAI's own forward


# ---------------------------------------------------------------------------------------------------------------
# xformers: its layout and bias checks on CPU, then the real kernels on CUDA


def fake_memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
    """xformers' contract: (B, M, H, K) inputs, a tensor bias of exactly (B, H, Mq, Mk) whose strides but the
    last are multiples of 8 (half precision) and whose last stride is 1 (xformers/ops/fmha/cutlass.py)."""
    batch, n_query, heads, _ = query.shape
    if attn_bias is not None:
        assert attn_bias.shape == (batch, heads, n_query, key.shape[1]) and attn_bias.dtype == query.dtype
        assert all(s % 8 == 0 for s in attn_bias.stride()[:-1]) and attn_bias.stride(-1) == 1, attn_bias.stride()
    out = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(1, 2).float(), key.transpose(1, 2).float(), value.transpose(1, 2).float(),
        attn_mask=None if attn_bias is None else attn_bias.float(), dropout_p=p, scale=scale,
    )
    return out.transpose(1, 2).to(query.dtype)


@pytest.mark.parametrize("kind", MASKS)
def test_xformers_wrapper_layout_and_bias_on_cpu(monkeypatch, kind):
    fake = types.SimpleNamespace(memory_efficient_attention=fake_memory_efficient_attention)
    monkeypatch.setattr(OPS, "_load_xformers", lambda: (fake, ""))
    q, k, v = qkv(dtype=torch.float16)
    mask = make_mask(kind)
    out = OPS._IMPLEMENTATIONS["xformers"](q, k, v, OPS._broadcast_mask(mask, q, k), 0.0, 0.2)
    assert out.shape == (2, 3, 7, 8) and out.dtype == torch.float16
    reference = attention(q, k, v, mask=mask, scale=0.2, backend="math")
    # float16 inputs: the fake kernel computes in float32 and rounds the output once (eps 9.8e-4), the math path
    # also stores scores and weights in float16: those three roundings, not the sums' order, set the difference
    torch.testing.assert_close(out.float(), reference.float(),
                               **summation_tolerance(reference.float(), reduction=1, depth=3, dtype=torch.float16))


def test_xformers_bias_is_materialised_when_it_needs_a_gradient():
    q, k, _ = qkv(dtype=torch.float16)
    broadcast = OPS._xformers_bias(torch.ones(2, 1, 1, 11, dtype=torch.bool), q, k)
    assert broadcast.stride()[1:3] == (0, 0)  # a key-padding mask is not copied per head and query
    bias = torch.randn(1, 3, 7, 11, requires_grad=True)
    materialised = OPS._xformers_bias(bias, q, k)
    assert materialised.shape == (2, 3, 7, 11) and 0 not in materialised.stride()
    (grad,) = torch.autograd.grad(materialised.float().sum(), bias)
    assert torch.equal(grad, torch.full_like(bias, 2.0))  # used once per batch element


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", [None, "bool", "additive", "key_padding"])
def test_xformers_matches_math_on_cuda(dtype, kind):
    pytest.importorskip("xformers")
    if not torch.cuda.is_available():
        pytest.skip("xformers needs a CUDA device")
    if dtype is torch.bfloat16 and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("xformers runs bfloat16 on Ampere or newer")
    assert current_backend("cuda", dtype) == "xformers"
    # 17 keys: not a multiple of 8, so the bias needs the padded layout xformers asks for
    q, k, v = (t.cuda().requires_grad_() for t in qkv(n_query=13, n_key=17, dim=32, dim_v=32, dtype=dtype))
    mask = make_mask(kind, n_query=13, n_key=17)
    mask = None if mask is None else mask.cuda()
    results = {}
    for backend in ("xformers", "math"):
        out = attention(q, k, v, mask=mask, backend=backend)
        results[backend] = (out, *torch.autograd.grad(out.float().square().sum(), (q, k, v)))
    tolerance = dict(atol=2e-2, rtol=2e-2) if dtype is torch.float16 else dict(atol=6e-2, rtol=6e-2)
    for a, b in zip(results["xformers"], results["math"]):
        torch.testing.assert_close(a.float(), b.float(), **tolerance)
    if kind == "additive":  # a bias that needs a gradient is materialised for xformers' backward
        bias = mask.to(dtype).requires_grad_()
        grads = [torch.autograd.grad(attention(q, k, v, mask=bias, backend=b).float().sum(), bias)[0]
                 for b in ("xformers", "math")]
        finite = torch.isfinite(mask)
        torch.testing.assert_close(grads[0].float()[finite], grads[1].float()[finite], **tolerance)


def test_patching_a_2d_model_does_not_import_monai():
    """patch_attention looks only at libraries already imported: a timm model never pays MONAI's import."""
    code = ("import sys, timm; from mmvl.ops import patch_attention; "
            "print(patch_attention(timm.create_model('vit_tiny_patch16_224', img_size=32, depth=2)), "
            "any(name == 'monai' or name.startswith('monai.') for name in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["2", "False"]
