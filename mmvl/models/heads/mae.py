"""Masked-autoencoder head (MAE, He et al. 2022) for 2D and 3D ViT encoders: a light transformer decoder that
rebuilds the masked patches from the tokens the encoder kept, scored on the masked patches only."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmvl.errors import ConfigError
from mmvl.models.encoders.base import EncoderOutput
from mmvl.ops import patch_attention
from mmvl.registry import HEADS
from mmvl.utils import atomic_write

PATCH_STD_EPS = 1e-6  # added to each patch's variance before dividing (norm_pix_loss, He et al. 2022)


def sincos_position_embedding(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed sine-cosine position embeddings ``(prod(grid), dim)`` for a 2D or 3D patch grid, in the row-major
    order of the patch tokens.

    Each axis gets an equal, even share of ``dim``: sines then cosines of the patch index at geometrically spaced
    frequencies (Vaswani et al. 2017; the 2D form is MAE's). When ``dim`` does not split evenly over the axes
    (256 over three axes: 84 each) the few channels left over are zero.
    """
    per_axis = 2 * (dim // (2 * len(grid)))
    if per_axis == 0:
        raise ConfigError(f"decoder_dim {dim} is too small for sin-cos position embeddings over {len(grid)} axes")
    half = per_axis // 2
    omega = 1.0 / temperature ** (torch.arange(half, dtype=torch.float64) / half)
    axes = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid), indexing="ij")
    parts = []
    for position in axes:
        angles = position.reshape(-1, 1) * omega
        parts += [angles.sin(), angles.cos()]
    embedding = torch.cat(parts, dim=1)
    return F.pad(embedding, (0, dim - embedding.shape[1])).float()


def patchify(images: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """``(B, C, H, W)`` or ``(B, C, D, H, W)`` -> ``(B, N, prod(patch_size) * C)``.

    Patches run in row-major grid order (the order of a ViT's patch tokens); inside a patch the values run
    over the patch's pixels, channels last, as in MAE.
    """
    batch, channels, *spatial = images.shape
    if len(spatial) != len(patch_size):
        raise ValueError(f"patchify: {len(patch_size)}D patches {tuple(patch_size)} for images of shape "
                         f"{tuple(images.shape)}")
    if any(side % size for side, size in zip(spatial, patch_size, strict=True)):
        raise ValueError(f"patchify: image size {tuple(spatial)} is not a multiple of the patch size "
                         f"{tuple(patch_size)}")
    dims = len(spatial)
    grid = [side // size for side, size in zip(spatial, patch_size, strict=True)]
    split = [batch, channels, *(n for pair in zip(grid, patch_size, strict=True) for n in pair)]
    order = [0, *(2 + 2 * i for i in range(dims)), *(3 + 2 * i for i in range(dims)), 1]  # B, grid, patch, C
    return images.reshape(split).permute(order).reshape(batch, math.prod(grid), math.prod(patch_size) * channels)


def unpatchify(patches: torch.Tensor, patch_size: Sequence[int], grid: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, N, prod(patch_size) * C)`` -> ``(B, C, *(grid * patch_size))``."""
    batch = patches.shape[0]
    dims = len(grid)
    if patches.shape[1:] != (math.prod(grid), math.prod(patch_size) * channels):
        raise ValueError(f"unpatchify: expected (B, {math.prod(grid)}, {math.prod(patch_size) * channels}) for "
                         f"grid {tuple(grid)}, patch {tuple(patch_size)}, {channels} channel(s); got "
                         f"{tuple(patches.shape)}")
    order = [0, 1 + 2 * dims, *(n for i in range(dims) for n in (1 + i, 1 + dims + i))]  # B, C, (grid, patch)...
    spatial = [g * p for g, p in zip(grid, patch_size, strict=True)]
    return patches.reshape(batch, *grid, *patch_size, channels).permute(order).reshape(batch, channels, *spatial)


def normalize_patches(patches: torch.Tensor) -> torch.Tensor:
    """Each patch to zero mean and unit variance: the ``norm_pix_loss`` target of He et al. 2022 (Sec. 4)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + PATCH_STD_EPS).sqrt()


def _check_mask_ratio(ratio: Any, where: str) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 < ratio < 1.0:
        raise ConfigError(f"{where} must be a number in (0, 1), got {ratio!r}; MAE's default is 0.75 "
                          "(He et al. 2022), chest X-ray studies found 0.9 best (Xiao et al. 2023)")
    return float(ratio)


@HEADS.register("mae")
class MAEHead(nn.Module):
    """MAE decoder and loss on top of a ViT encoder that ran with ``token_drop=mask_ratio``.

    The encoder embeds only the visible patches (``EncoderOutput.keep_index`` says which); this head projects
    them to ``decoder_dim``, puts a learnable mask token at every dropped position, adds fixed sin-cos position
    embeddings for the full 2D/3D grid (prefix tokens such as the class token ride along without one), runs
    ``decoder_depth`` timm ``Block``s whose attention goes through ``mmvl.ops`` and predicts each patch's pixels.
    The loss is the mean squared error over the masked patches only, against per-patch normalised pixels when
    ``norm_pix_loss`` (He et al. 2022). Where another head asks for a larger ratio the model masks more and this
    head scores what was actually masked; its ``mask_ratio`` log says how much that was.
    """

    needs_image_encoder = True

    def __init__(
        self,
        image_dim: int,
        text_dim: int | None = None,
        image_encoder: nn.Module | None = None,
        mask_ratio: float = 0.75,
        decoder_dim: int = 256,
        decoder_depth: int = 4,
        decoder_heads: int = 8,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        from timm.models.vision_transformer import Block

        del text_dim  # reconstruction needs no text
        self.mask_ratio = _check_mask_ratio(mask_ratio, "model.heads: mae.mask_ratio")
        if image_encoder is None:
            raise ConfigError("the MAE head needs the image encoder (image_encoder=); build it through "
                              "VisionLanguageModel / build_model, which passes it")
        grid, patch_size = getattr(image_encoder, "grid", None), getattr(image_encoder, "patch_size", None)
        if grid is None or patch_size is None or not hasattr(image_encoder, "num_prefix_tokens"):
            raise ConfigError(
                f"model.heads: the MAE head needs a ViT image encoder with a patch grid, and "
                f"{type(image_encoder).__name__} has none (Swin merges patches between stages, so no token "
                "stands for one patch); use image_encoder type='vit2d' or type='vit3d'")
        if decoder_dim % decoder_heads:
            raise ConfigError(f"model.heads: mae.decoder_dim {decoder_dim} must be divisible by decoder_heads "
                              f"{decoder_heads}")
        self.grid, self.patch_size = tuple(int(n) for n in grid), tuple(int(n) for n in patch_size)
        self.in_chans = int(image_encoder.in_chans)
        self.num_prefix_tokens = int(image_encoder.num_prefix_tokens)
        self.spatial_dims = len(self.grid)
        self.num_patches = math.prod(self.grid)
        self.norm_pix_loss = bool(norm_pix_loss)
        patch_values = math.prod(self.patch_size) * self.in_chans

        self.decoder_embed = nn.Linear(image_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed, so not saved: the config rebuilds it.
        self.register_buffer("decoder_pos_embed", sincos_position_embedding(self.grid, decoder_dim)[None],
                             persistent=False)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.decoder = nn.Sequential(*(Block(decoder_dim, decoder_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                                             norm_layer=norm_layer) for _ in range(decoder_depth)))
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_values)
        self._init_weights()
        self.patched_attention = patch_attention(self.decoder)

    def _init_weights(self) -> None:
        """MAE's initialisation: N(0, 0.02) mask token, Xavier-uniform linear layers with zero biases."""
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # -- patches -------------------------------------------------------------------------------------
    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, *spatial)`` -> patches ``(B, N, prod(patch_size) * C)`` in the encoder's token order."""
        expected = tuple(g * p for g, p in zip(self.grid, self.patch_size, strict=True))
        if images.ndim != 2 + self.spatial_dims or tuple(images.shape[2:]) != expected:
            needed = ", ".join(map(str, (self.in_chans, *expected)))
            raise ValueError(f"MAE head: images of shape {tuple(images.shape)}, but the encoder's patch grid "
                             f"{self.grid} x {self.patch_size} needs (B, {needed})")
        return patchify(images, self.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return unpatchify(patches, self.patch_size, self.grid, self.in_chans)

    def patch_mask(self, keep_index: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` float mask from the encoder's kept patch indices: 1 where a patch was masked."""
        mask = torch.ones(keep_index.shape[0], self.num_patches, device=keep_index.device)
        return mask.scatter(1, keep_index, 0.0)

    # -- model ---------------------------------------------------------------------------------------
    def decode(self, image: EncoderOutput) -> torch.Tensor:
        """Predicted pixels of every patch, ``(B, N, prod(patch_size) * C)``, from the visible tokens."""
        keep = image.keep_index
        if keep is None:
            raise ValueError("the MAE head needs a masked encoding (EncoderOutput.keep_index is None): run the image "
                             "encoder with token_drop=mask_ratio, as VisionLanguageModel does for heads with a "
                             "mask_ratio")
        x = self.decoder_embed(image.tokens)
        prefix, visible = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        batch, n_visible, dim = visible.shape
        if keep.shape != (batch, n_visible):
            raise ValueError(f"MAE head: {n_visible} visible tokens but keep_index of shape {tuple(keep.shape)}")
        full = self.mask_token.to(visible.dtype).expand(batch, self.num_patches, dim)
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, dim), visible)
        x = torch.cat([prefix, full + self.decoder_pos_embed.to(full.dtype)], dim=1)
        x = self.decoder_norm(self.decoder(x))
        return self.decoder_pred(x[:, self.num_prefix_tokens:])

    def reconstruction_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches (``mask`` 1) only; float32."""
        target = target.float()
        if self.norm_pix_loss:
            target = normalize_patches(target)
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, image: EncoderOutput, text: EncoderOutput | None, batch: Mapping[str, Any]) -> dict[str, Any]:
        pred = self.decode(image)
        mask = self.patch_mask(image.keep_index)
        loss = self.reconstruction_loss(pred, self.patchify(batch["image"]), mask)
        return {"loss": loss, "mask_ratio": mask.mean()}

    # -- inspection ----------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, model: nn.Module, images: torch.Tensor,
                    mask_ratio: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask ``images`` at random, encode them with ``model.image_encoder`` and decode.

        Returns the reconstruction in image space, with the visible patches pasted from the input, and the
        mask ``(B, 1, *spatial)`` (1 = masked). With ``norm_pix_loss`` the decoder predicts normalised patches;
        they are shown with each patch's true mean and variance (the information that target removes; He et
        al. trained a separate pixel-target model for their figures).
        """
        ratio = _check_mask_ratio(self.mask_ratio if mask_ratio is None else mask_ratio, "reconstruct: mask_ratio")
        encoded = model.image_encoder(images, token_drop=ratio)
        pred = self.decode(encoded).float()
        target = self.patchify(images).float()
        if self.norm_pix_loss:
            pred = pred * (target.var(dim=-1, keepdim=True) + PATCH_STD_EPS).sqrt() + target.mean(dim=-1, keepdim=True)
        mask = self.patch_mask(encoded.keep_index)
        pixels = torch.where(mask.unsqueeze(-1).bool(), pred, target)
        mask_image = self.unpatchify(mask.unsqueeze(-1).expand_as(pixels).contiguous())[:, :1]
        return self.unpatchify(pixels).to(images.dtype), mask_image

    @torch.no_grad()
    def visualize(self, model: nn.Module, batch: Mapping[str, Any], path: Any, max_samples: int = 4) -> None:
        """Write a PNG: one row per sample (up to ``max_samples``); input, masked input, reconstruction.

        Volumes show their middle axial slice: mmvl's CT pipeline gives RAS-ordered ``(X, Y, Z)`` volumes, so
        that is the middle of the last axis, drawn the radiological way (patient right on the left, anterior
        up). The masks come from a fixed seed, so pictures from different steps are comparable, and the global
        RNG (training's augmentation and masking stream) is left as it was.
        """
        from matplotlib import colormaps
        from matplotlib.figure import Figure

        images = batch["image"][:max_samples]
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            recon, mask = self.reconstruct(model, images)
        inputs, masked, recons = self._display(images), self._display(mask) > 0.5, self._display(recon)
        cmap = colormaps["gray"].with_extremes(bad="#2a4d7a")
        fig = Figure(figsize=(6.6, 2.2 * len(inputs)))
        axes = fig.subplots(len(inputs), 3, squeeze=False)
        titles = ("input", f"masked {self.mask_ratio:.0%}", "reconstruction")
        for row, (image, hidden, rebuilt) in enumerate(zip(inputs, masked, recons, strict=True)):
            low, high = np.percentile(image, (0.5, 99.5))
            shown = (image, np.ma.masked_array(image, hidden), rebuilt)
            for col, picture in enumerate(shown):
                axis = axes[row, col]
                axis.imshow(picture, cmap=cmap, vmin=low, vmax=high if high > low else low + 1, interpolation="nearest")
                axis.set_axis_off()
                if row == 0:
                    axis.set_title(titles[col], fontsize=9)
        fig.tight_layout()
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=80))

    def _display(self, images: torch.Tensor) -> np.ndarray:
        """``(B, C, *spatial)`` -> ``(B, rows, columns)`` float arrays of the first channel (volumes: axial slice)."""
        planes = images[:, 0].float().cpu().numpy()
        if self.spatial_dims == 3:
            axial = planes[..., planes.shape[-1] // 2]  # (B, X, Y)
            planes = np.flip(axial.transpose(0, 2, 1), axis=(1, 2))  # rows: anterior first; columns: right first
        return np.ascontiguousarray(planes)
