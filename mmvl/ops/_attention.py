"""One attention entry point, ``attention(q, k, v)``, and ``patch_attention(model)``, which routes the attention
of timm ViTs and MONAI ViTs through it.

Layout is torch SDPA's: ``q`` ``(B, H, Nq, D)``, ``k`` ``(B, H, Nk, D)``, ``v`` ``(B, H, Nk, Dv)``, output
``(B, H, Nq, Dv)``.

Which backend runs when
-----------------------
Chosen for every call; the first rule that applies wins:

1. the ``backend=`` argument (``"xformers"``, ``"sdpa"`` or ``"math"``);
2. the environment variable ``MMVL_ATTENTION`` (same names, or ``auto``/empty), read at each call;
3. automatic: ``"xformers"`` (``xformers.ops.memory_efficient_attention``) when xformers imports and the tensors
   are CUDA tensors in float16/bfloat16/float32, otherwise ``"sdpa"``
   (``torch.nn.functional.scaled_dot_product_attention``), on CPU and everywhere else.

An explicit request (1 or 2) for xformers where it cannot run (xformers missing or broken, or CPU tensors) raises
:class:`AttentionBackendError` naming the reason: a request that is silently ignored is a benchmark that measures
the wrong thing. Automatic selection never picks xformers there, and if xformers turns out to have no kernel for
the inputs (it raises ``NotImplementedError``, e.g. bfloat16 before Ampere) the call runs SDPA instead and logs a
warning once. The backend in use is logged once per (backend, device type) on the ``mmvl`` logger.

Why a math path
---------------
``"math"`` is softmax(Q K^T * scale + mask) V written out in plain torch, in float32 for half-precision inputs.
It is the reference the fused kernels and the patched modules are tested against, and a switch to debug numerics
(a NaN under a fused kernel, a mask that does not do what it should) with ``MMVL_ATTENTION=math``; it materialises
the ``(B, H, Nq, Nk)`` matrix, so it is slow and memory-hungry on real sequence lengths.

Masks
-----
``mask`` is bool (True = attend) or floating (added to the scores, ``-inf`` = ignore), broadcastable to
``(B, H, Nq, Nk)`` by torch's rules, except that a 2-D mask is always a ``(B, Nk)`` key-padding mask (write a
``(Nq, Nk)`` mask as ``mask[None, None]``). A query row whose every key is masked gives zeros on sdpa and math
(torch SDPA's behaviour) rather than NaN.

What ``patch_attention`` covers
-------------------------------
timm's ``Attention`` (``timm.layers``, the one ``vision_transformer`` builds) and MONAI's ``SABlock`` (MONAI ``ViT``,
``ViTAutoEnc``, ``UNETR``, which build it without ``use_flash_attention`` and so run naive attention). timm's
rotary ``EvaAttention``/``AttentionRope`` and Swin's ``WindowAttention`` (relative position bias) are left as they
are.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmvl.errors import MMVLError
from mmvl.utils import get_logger

logger = get_logger(__name__)

BACKENDS = ("xformers", "sdpa", "math")
ENV_VAR = "MMVL_ATTENTION"
_XFORMERS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_logged_choices: set[tuple[str, str]] = set()
_logged_fallbacks: set[str] = set()


class AttentionBackendError(MMVLError, RuntimeError):
    """An attention backend was asked for by name (``backend=`` or ``MMVL_ATTENTION``) and cannot run."""


# ---------------------------------------------------------------------------------------------------------------
# Backend selection


@functools.cache
def _load_xformers() -> tuple[Any, str]:
    """``(xformers.ops, "")``, or ``(None, why)`` when xformers does not import."""
    try:
        import xformers.ops as xops
    except Exception as error:  # a wheel built for another torch raises OSError/RuntimeError, not only ImportError
        return None, f"xformers does not import ({type(error).__name__}: {error}); it is the '.[gpu]' extra"
    return xops, ""


def _xformers_problems(device: torch.device) -> list[str]:
    problems = []
    xops, why = _load_xformers()
    if xops is None:
        problems.append(why)
    if device.type != "cuda":
        problems.append(f"xformers runs on CUDA tensors only and these are on '{device.type}'")
    return problems


def _resolve(device: torch.device, dtype: torch.dtype | None, backend: str | None) -> tuple[str, str]:
    """``(backend, source)``: the backend for tensors on ``device`` and what chose it (``"automatic"`` or a request)."""
    if backend is not None:
        name, source = str(backend).strip().lower(), f"backend='{backend}'"
    else:
        name = os.environ.get(ENV_VAR, "").strip().lower()
        if name in ("", "auto"):
            if not _xformers_problems(device) and (dtype is None or dtype in _XFORMERS_DTYPES):
                return "xformers", "automatic"
            return "sdpa", "automatic"
        source = f"{ENV_VAR}={name}"
    if name not in BACKENDS:
        raise AttentionBackendError(
            f"{source}: unknown attention backend '{name}'; use one of {', '.join(BACKENDS)}"
            f" (or unset {ENV_VAR} to choose automatically)"
        )
    if name == "xformers":
        problems = _xformers_problems(device)
        if problems:
            raise AttentionBackendError(
                f"{source} asks for xformers, which cannot run here: {'; '.join(problems)}. "
                f"Use 'sdpa' there, or unset {ENV_VAR} to let mmvl choose per device."
            )
    return name, source


def available_backends(device: torch.device | str | None = None) -> tuple[str, ...]:
    """Backends that can run on ``device``; with ``device=None``, the installed ones (xformers if it imports)."""
    names = ["sdpa", "math"]
    if device is None:
        if _load_xformers()[0] is not None:
            names.insert(0, "xformers")
    elif not _xformers_problems(torch.device(device)):
        names.insert(0, "xformers")
    return tuple(names)


def current_backend(device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The backend a call without ``backend=`` uses for tensors on ``device`` now (``MMVL_ATTENTION`` included).

    Raises :class:`AttentionBackendError` where such a call would. Does not foresee the run-time fallback from
    xformers to SDPA for inputs xformers has no kernel for.
    """
    return _resolve(torch.device(device), dtype, None)[0]


def _log_choice(name: str, device_type: str, source: str) -> None:
    if (name, device_type) not in _logged_choices:
        _logged_choices.add((name, device_type))
        logger.info("attention backend on %s: %s (%s)", device_type, name, source)


# ---------------------------------------------------------------------------------------------------------------
# Masks


def _broadcast_mask(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """``mask`` as a 4-D bool or floating tensor on ``q``'s device, broadcastable to ``(B, H, Nq, Nk)``."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention mask must be a tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"attention mask must be bool (True = attend) or floating (additive), got {mask.dtype}; "
            "for a 0/1 mask pass mask.bool()"
        )
    batch, heads, n_query, _ = q.shape
    full = (batch, heads, n_query, k.shape[-2])
    if mask.ndim == 2:  # (B, Nk) key padding
        if mask.shape[0] not in (1, batch) or mask.shape[1] != full[3]:
            raise ValueError(
                f"a 2-D attention mask is a (B, Nk) = ({batch}, {full[3]}) key-padding mask, got {tuple(mask.shape)};"
                " write a (Nq, Nk) mask as mask[None, None]"
            )
        mask = mask[:, None, None, :]
    elif 1 <= mask.ndim <= 4:
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    else:
        raise ValueError(f"attention mask must have 1 to 4 dimensions, got shape {tuple(mask.shape)}")
    try:
        broadcast = tuple(torch.broadcast_shapes(mask.shape, full))
    except RuntimeError:
        broadcast = None
    if broadcast != full:
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not broadcast to (B, H, Nq, Nk) = {full}")
    return mask.to(q.device)


# ---------------------------------------------------------------------------------------------------------------
# Backends


def _sdpa_attention(q, k, v, mask, dropout, scale):
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)


def _math_attention(q, k, v, mask, dropout, scale):
    compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.to(compute_dtype) @ k.to(compute_dtype).transpose(-2, -1)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(compute_dtype)
        # Rows with every key masked: zeros as torch SDPA gives, and no NaN in the backward either.
        empty_rows = torch.isneginf(scores).all(dim=-1, keepdim=True)
        weights = scores.masked_fill(empty_rows, 0.0).softmax(dim=-1).masked_fill(empty_rows, 0.0)
    else:
        weights = scores.softmax(dim=-1)
    if dropout > 0:
        weights = F.dropout(weights, p=dropout)
    return (weights @ v.to(compute_dtype)).to(q.dtype)


def _xformers_bias(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``mask`` as the additive ``(B, H, Nq, Nk)`` bias xformers takes, in ``q``'s dtype."""
    batch, heads, n_query, _ = q.shape
    n_key = k.shape[-2]
    full = (batch, heads, n_query, n_key)
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    else:
        bias = mask.to(q.dtype)
    # xformers' kernels read bias rows 16-byte aligned: allocate the key dimension rounded up to a multiple of 8
    # and slice it back (the HINT in its error, facebookresearch/xformers#683). A bias that needs a gradient is
    # materialised in full because xformers' backward cannot write into a broadcast (stride 0) bias.
    leading = full[:3] if bias.requires_grad else tuple(bias.shape[:3])
    padded = bias.new_zeros((*leading, -(-n_key // 8) * 8))
    padded[..., :n_key] = bias
    return padded[..., :n_key].expand(full)


def _xformers_attention(q, k, v, mask, dropout, scale):
    xops = _load_xformers()[0]
    bias = None if mask is None else _xformers_bias(mask, q, k)
    out = xops.memory_efficient_attention(  # xformers' layout is (B, N, H, D)
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout, scale=scale
    )
    return out.transpose(1, 2)


_IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "xformers": _xformers_attention,
    "sdpa": _sdpa_attention,
    "math": _math_attention,
}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention ``softmax(q k^T * scale + mask) v`` on ``(B, H, N, D)`` tensors.

    ``mask``: bool (True = attend) or additive float, broadcastable to ``(B, H, Nq, Nk)``; a 2-D mask is a
    ``(B, Nk)`` key-padding mask. ``dropout`` on the attention weights is applied whenever it is > 0: callers pass
    ``p if self.training else 0.0``. ``scale`` defaults to ``D ** -0.5``. ``backend``: ``"xformers"``, ``"sdpa"``,
    ``"math"`` or ``None`` (``MMVL_ATTENTION``, else automatic); see the module docstring.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects (B, H, N, D) q, k, v; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "attention: q (B, H, Nq, D), k (B, H, Nk, D) and v (B, H, Nk, Dv) do not match: "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"attention dropout must be in [0, 1], got {dropout}")
    name, source = _resolve(q.device, q.dtype, backend)
    mask = _broadcast_mask(mask, q, k)
    if name == "xformers" and source == "automatic":
        try:
            out = _IMPLEMENTATIONS["xformers"](q, k, v, mask, dropout, scale)
        except NotImplementedError as error:  # xformers has no kernel for these inputs
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if reason not in _logged_fallbacks:
                _logged_fallbacks.add(reason)
                logger.warning("xformers cannot run this attention (%s); using torch SDPA instead", reason)
            name, source = "sdpa", "automatic, xformers has no kernel for the inputs"
        else:
            _log_choice(name, q.device.type, source)
            return out
    _log_choice(name, q.device.type, source)
    return _IMPLEMENTATIONS[name](q, k, v, mask, dropout, scale)


# ---------------------------------------------------------------------------------------------------------------
# Patching timm and MONAI attention modules
#
# Each supported class gets a subclass whose forward repeats the original projections, reshapes and norms and
# calls attention(); patch_attention swaps module.__class__, so parameters, buffers and state_dict keys are the
# module's own. Only exact class matches are patched: a library subclass may override forward.


def _timm_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    """timm ``Attention.forward`` (timm/layers/attention.py) with the product through :func:`attention`."""
    batch, n_tokens, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).reshape(batch, n_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    if is_causal:
        if attn_mask is not None:
            raise ValueError("timm Attention: attn_mask and is_causal=True cannot be combined (as in torch SDPA)")
        attn_mask = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=x.device).tril()
    if attn_mask is not None and attn_mask.ndim < 4:
        # timm hands masks to SDPA, which broadcasts from the right; attention() would read 2-D as key padding.
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.ndim) + tuple(attn_mask.shape))
    x = attention(q, k, v, mask=attn_mask, dropout=self.attn_drop.p if self.training else 0.0, scale=self.scale)
    x = x.transpose(1, 2).reshape(batch, n_tokens, -1)
    x = self.norm(x)
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


_TIMM_ATTRIBUTES = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop", "num_heads", "head_dim")


def _timm_unsupported(module: nn.Module) -> str | None:
    missing = [name for name in (*_TIMM_ATTRIBUTES, "scale") if not hasattr(module, name)]
    return f"attributes {missing} missing (another timm version?)" if missing else None


def _monai_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None):
    """MONAI ``SABlock.forward`` (monai/networks/blocks/selfattention.py) with the product through :func:`attention`.

    ``attn_mask`` follows MONAI's own path: ``(B, N)``, zero = padding key; other shapes go to :func:`attention`.
    Two differences from MONAI's ``use_flash_attention=True`` path, which hands ``attn_mask`` to SDPA unchanged and
    drops attention weights in eval mode too (MONAI 1.6.1): here a 2-D mask is key padding as above, and the weights
    are dropped only in training.
    """
    if self.use_combined_linear:
        q, k, v = self.input_rearrange(self.qkv(x)).unbind(0)
    else:
        q, k, v = (self.input_rearrange(project(x)) for project in (self.to_q, self.to_k, self.to_v))
    mask = attn_mask
    if self.causal:
        if attn_mask is not None:
            raise ValueError("Causal attention does not support attention masks.")  # MONAI's own message
        n_tokens = x.shape[-2]
        mask = self.causal_mask[:, :, :n_tokens, :n_tokens] != 0
    elif attn_mask is not None and attn_mask.ndim == 2:
        mask = attn_mask != 0
    x = attention(q, k, v, mask=mask, dropout=self.dropout_rate if self.training else 0.0, scale=self.scale)
    x = self.out_rearrange(x)
    if self.include_fc:
        x = self.out_proj(x)
    return self.drop_output(x)


def _monai_unsupported(module: nn.Module) -> str | None:
    if getattr(module, "save_attn", False):
        return "save_attn=True needs the attention matrix, which only MONAI's own path forms"
    if getattr(module, "rel_positional_embedding", None) is not None:
        return "rel_pos_embedding adds to the attention matrix inside MONAI's own path"
    if getattr(module, "attention_dtype", None) is not None:
        return "attention_dtype casts q and k but not v, which attention() does not reproduce"
    return None


# (library module, class, patched class name, forward, per-module check)
_PATCHABLE = (
    ("timm.layers", "Attention", "PatchedTimmAttention", _timm_forward, _timm_unsupported),
    ("monai.networks.blocks.selfattention", "SABlock", "PatchedSABlock", _monai_forward, _monai_unsupported),
)


@functools.cache
def _patched_class(index: int) -> tuple[type, type, Callable[[nn.Module], str | None]] | None:
    """``(library class, patched subclass, check)`` for entry ``index`` of ``_PATCHABLE`` (None if the library or
    the class is missing, or its forward changed), built on first use so that importing mmvl.ops stays light."""
    import importlib

    module_name, class_name, patched_name, forward, unsupported = _PATCHABLE[index]
    try:
        base = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None
    expected = list(inspect.signature(forward).parameters)
    found = list(inspect.signature(base.forward).parameters)
    if found != expected:  # a new forward argument (rope, ...) would be dropped silently: refuse the class
        logger.warning(
            "%s.%s.forward%s differs from the %s mmvl.ops reproduces; those modules keep their own attention",
            module_name, class_name, tuple(found), tuple(expected),
        )
        return None
    patched = type(patched_name, (base,), {
        "forward": forward,
        "__module__": __name__,
        "__doc__": f"{module_name}.{class_name} computing attention through mmvl.ops.attention.",
    })
    globals()[patched_name] = patched  # importable by name, so a patched model pickles
    return base, patched, unsupported


def _patch_table(loaded_only: bool = False) -> dict[type, tuple[type, Callable[[nn.Module], str | None]]]:
    """``{library class: (patched subclass, check)}``. ``loaded_only``: only libraries already imported (a model
    holding a MONAI block has imported MONAI; a 2D timm model need not pay MONAI's import, ~190 MB and seconds)."""
    table = {}
    for index, (module_name, *_rest) in enumerate(_PATCHABLE):
        if loaded_only and module_name.split(".")[0] not in sys.modules:
            continue
        entry = _patched_class(index)
        if entry is not None:
            table[entry[0]] = entry[1:]
    return table


def __getattr__(name: str) -> Any:  # PEP 562: unpickling a patched model looks its class up here
    if name in {entry[2] for entry in _PATCHABLE}:
        _patch_table()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def patch_attention(model: nn.Module) -> int:
    """Route every timm ``Attention`` (timm ViT/DeiT blocks) and MONAI ``SABlock`` (MONAI ``ViT``, ``ViTAutoEnc``,
    UNETR...) inside ``model`` through :func:`attention`; returns how many modules were patched by this call.

    Parameters, buffers and state_dict keys do not change, and patching twice patches nothing new. Modules with
    options the patch does not reproduce keep their own forward (logged at debug level): MONAI ``save_attn=True``,
    ``rel_pos_embedding``, ``attention_dtype``.
    """
    table = _patch_table(loaded_only=True)
    patched = 0
    for name, module in model.named_modules():
        entry = table.get(type(module))
        if entry is None:
            continue
        patched_class, unsupported = entry
        reason = unsupported(module)
        if reason:
            logger.debug("%s (%s) keeps its own attention: %s", name or "<model>", type(module).__name__, reason)
            continue
        module.__class__ = patched_class
        patched += 1
    logger.debug("patch_attention: %d modules of %s now use mmvl.ops.attention", patched, type(model).__name__)
    return patched
