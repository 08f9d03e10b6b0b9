"""Segmentation head for fine-tuning a pretrained image encoder on masks: MONAI's UNETR decoder (Hatamizadeh et al.
2022) on a ViT's hidden states (3D: mmvl's MONAI ViT; 2D: the timm ViT's patch tokens) and SwinUNETR's decoder
(Hatamizadeh et al. 2022, "Swin UNETR") on the stage outputs of mmvl's 3D Swin, built from MONAI's
``UnetrBasicBlock``/``UnetrPrUpBlock``/``UnetrUpBlock``/``UnetOutBlock``; the encoder stays mmvl's (its weights come
from ``model.init_from``), only the decoder is new.

Masks are multi-label, one sigmoid per label (findings overlap), trained on ``batch["masks"]`` ``(B, L, *spatial)``
with Dice + binary cross-entropy: per label, MONAI's ``DiceCELoss(sigmoid=True, batch=True)`` of that label's channel,
averaged over the labels (MONAI's loss on several channels at once takes a softmax cross-entropy across them,
which is wrong for overlapping labels, so the Dice term is MONAI's ``DiceLoss`` and the CE term torch's
``binary_cross_entropy_with_logits``). The Dice is taken over the whole batch (``batch=True``, as nnU-Net): a
small finding absent from most samples would otherwise leave most per-sample Dice terms at 1 whatever the model
does. Validation Dice per label and their mean come from the voxel counts of the
whole split (nnU-Net's "pseudo Dice": one Dice over all voxels of the split, so a study without the finding counts
its false positives), at 0.5 and at every threshold of :data:`THRESHOLDS`, from which an export picks each label's
Dice-optimal threshold. Volumes larger than the training ROI are segmented by MONAI's ``sliding_window_inference``
(:meth:`SegmentationHead.predict_logits`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mmvl.errors import ConfigError
from mmvl.models.encoders.base import EncoderOutput
from mmvl.registry import HEADS

DECODERS = ("auto", "unetr", "swinunetr")
# the probability thresholds at which validation counts voxels: 0.05 ... 0.95
THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))
HALF = THRESHOLDS.index(0.5)


def _levels(patch_size: Sequence[int], where: str) -> int:
    """log2 of the largest patch side (every side a power of two): the decoder's number of 2x upsamplings."""
    sides = [int(p) for p in patch_size]
    if min(sides) < 1 or max(sides) < 2 or any(side & (side - 1) for side in sides):
        raise ConfigError(f"{where}: the UNETR decoder needs power-of-two patch sides (e.g. 16 or 8 per axis), the "
                          f"image encoder has {tuple(patch_size)}")
    return int(math.log2(max(sides)))


def _to_grid(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``(B, N, D)`` patch tokens (row-major over ``grid``, as the patch embeddings flatten them) as
    ``(B, D, *grid)``."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


class UnetrDecoder(nn.Module):
    """UNETR's decoder for a ViT with patches of ``2**levels`` voxels (MONAI's ``UNETR`` is the 16-voxel case:
    four levels, skips from blocks 3, 6 and 9 of 12). Skip ``k`` (1 .. levels-1, at ``1 / 2**k`` of the input
    resolution, ``feature_size * 2**k`` channels) comes from the output of block ``skip_layers[k-1]`` through
    ``UnetrPrUpBlock`` (``levels - k`` transposed convolutions); level 0 is the image itself through
    ``UnetrBasicBlock``; the last (normed) tokens go up through one ``UnetrUpBlock`` per level.

    Anisotropic patches (CT-CLIP's 16 x 16 x 8) are decoded on an isotropic grid of the largest side: the image
    is resized (linear) to ``grid * 2**levels`` for the stem and the logits back to the input's size, since
    MONAI's blocks upsample every axis alike."""

    def __init__(self, spatial_dims: int, in_channels: int, hidden_size: int, patch_size: Sequence[int],
                 num_layers: int, out_channels: int, feature_size: int = 16, norm_name: str = "instance",
                 res_block: bool = True, skip_layers: Sequence[int] | None = None, where: str = "model.heads"):
        super().__init__()
        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

        levels = _levels(patch_size, where)
        if skip_layers is None:  # evenly spread over the blocks, shallow blocks feeding the finer skips
            skip_layers = [min(num_layers, max(1, round(num_layers * k / levels))) for k in range(1, levels)]
        skip_layers = [int(layer) for layer in skip_layers]
        if len(skip_layers) != levels - 1 or not all(1 <= layer <= num_layers for layer in skip_layers):
            raise ConfigError(f"{where}.skip_layers: {levels - 1} block numbers in 1..{num_layers} (one per skip of a "
                              f"{2 ** levels}-voxel patch), got {skip_layers}")
        self.levels, self.skip_layers = levels, skip_layers
        self.stem = UnetrBasicBlock(spatial_dims, in_channels, feature_size, kernel_size=3, stride=1,
                                    norm_name=norm_name, res_block=res_block)
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(spatial_dims, hidden_size, feature_size * 2**k, num_layer=levels - 1 - k, kernel_size=3,
                           stride=1, upsample_kernel_size=2, norm_name=norm_name, conv_block=True,
                           res_block=res_block)
            for k in range(1, levels))
        self.ups = nn.ModuleList(
            UnetrUpBlock(spatial_dims, hidden_size if k == levels - 1 else feature_size * 2 ** (k + 1),
                         feature_size * 2**k, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name,
                         res_block=res_block)
            for k in range(levels - 1, -1, -1))
        self.out = UnetOutBlock(spatial_dims, feature_size, out_channels)

    def forward(self, images: torch.Tensor, hidden: Sequence[torch.Tensor], last: torch.Tensor,
                grid: Sequence[int]) -> torch.Tensor:
        size = tuple(int(g) * 2**self.levels for g in grid)
        given = tuple(images.shape[2:])
        if size != given:
            mode = "trilinear" if len(size) == 3 else "bilinear"
            images = torch.nn.functional.interpolate(images, size=size, mode=mode, align_corners=False)
        features = [self.stem(images)]
        features += [skip(_to_grid(hidden[layer - 1], grid)) for skip, layer in zip(self.skips, self.skip_layers)]
        x = _to_grid(last, grid)
        for k, up in zip(range(self.levels - 1, -1, -1), self.ups):
            x = up(x, features[k])
        logits = self.out(x)
        if size != given:
            mode = "trilinear" if len(size) == 3 else "bilinear"
            logits = torch.nn.functional.interpolate(logits, size=given, mode=mode, align_corners=False)
        return logits


class SwinUnetrDecoder(nn.Module):
    """SwinUNETR's decoder, as in MONAI's ``SwinUNETR`` (its ``encoder1..4``, ``encoder10``, ``decoder1..5`` and
    ``out``), on the five maps of a four-stage Swin with 2-voxel patches; its feature size is the Swin's
    ``embed_dim``, as SwinUNETR ties them."""

    def __init__(self, spatial_dims: int, in_channels: int, embed_dim: int, out_channels: int,
                 norm_name: str = "instance", res_block: bool = True):
        super().__init__()
        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock

        fs = embed_dim

        def basic(channels_in: int, channels_out: int) -> nn.Module:
            return UnetrBasicBlock(spatial_dims, channels_in, channels_out, kernel_size=3, stride=1,
                                   norm_name=norm_name, res_block=res_block)

        def up(channels_in: int, channels_out: int) -> nn.Module:
            return UnetrUpBlock(spatial_dims, channels_in, channels_out, kernel_size=3, upsample_kernel_size=2,
                                norm_name=norm_name, res_block=res_block)

        self.encoder1, self.encoder2 = basic(in_channels, fs), basic(fs, fs)
        self.encoder3, self.encoder4, self.encoder10 = basic(2 * fs, 2 * fs), basic(4 * fs, 4 * fs), basic(16 * fs,
                                                                                                           16 * fs)
        self.decoder5, self.decoder4, self.decoder3 = up(16 * fs, 8 * fs), up(8 * fs, 4 * fs), up(4 * fs, 2 * fs)
        self.decoder2, self.decoder1 = up(2 * fs, fs), up(fs, fs)
        self.out = UnetOutBlock(spatial_dims, fs, out_channels)

    def forward(self, images: torch.Tensor, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        enc0, enc1 = self.encoder1(images), self.encoder2(hidden[0])
        enc2, enc3, dec4 = self.encoder3(hidden[1]), self.encoder4(hidden[2]), self.encoder10(hidden[4])
        dec3 = self.decoder5(dec4, hidden[3])
        dec0 = self.decoder2(self.decoder3(self.decoder4(dec3, enc3), enc2), enc1)
        return self.out(self.decoder1(dec0, enc0))


@HEADS.register("segmentation")
class SegmentationHead(nn.Module):
    """Per-label masks from a ViT (UNETR decoder, 2D or 3D) or a 3D Swin (SwinUNETR decoder).

    ``label_names``: the masks to predict, keys of the manifest rows' ``masks`` (a row without one of them has
    an empty mask for it). ``decoder``: ``"auto"`` (UNETR on a ViT, SwinUNETR on a Swin), ``"unetr"`` or
    ``"swinunetr"``. ``feature_size``, ``norm_name`` and ``res_block`` are UNETR's (the SwinUNETR decoder's feature
    size is the Swin's ``embed_dim``); ``skip_layers`` the blocks feeding UNETR's skips (default: evenly spread,
    3, 6, 9 of 12). ``lambda_dice`` and ``lambda_ce`` weigh the Dice and binary cross-entropy terms (see the
    module doc); ``prior``: the probability the untrained decoder gives every voxel (its output bias).
    ``roi_size``: the window of sliding-window inference (default: the
    config's ``volume_size``, else the encoder's input size); ``sw_overlap`` and ``sw_batch_size`` are
    ``sliding_window_inference``'s.

    The whole decoder is new, so it is the head's ``output_layer``: the ``lora`` mode trains it with the adapters
    (``lora`` and ``lora+head`` are the same here), ``linear`` trains it on the frozen encoder.
    """

    needs_image_encoder = True
    needs_hidden_states = True
    is_segmenter = True
    config_knobs = {"roi_size": "volume_size"}  # filled from the config's volume_size (mmvl.config.validate)

    def __init__(self, image_dim: int, label_names: Sequence[str], image_encoder: nn.Module,
                 text_dim: int | None = None, decoder: str = "auto", feature_size: int = 16,
                 norm_name: str = "instance", res_block: bool = True, skip_layers: Sequence[int] | None = None,
                 lambda_dice: float = 1.0, lambda_ce: float = 1.0, prior: float = 0.01,
                 roi_size: Sequence[int] | None = None, sw_overlap: float = 0.25, sw_batch_size: int = 4):
        super().__init__()
        from monai.losses import DiceLoss

        where = "model.heads (segmentation)"
        if not label_names or any(not isinstance(name, str) for name in label_names) or \
                len(set(label_names)) != len(label_names):
            raise ConfigError(f"{where}: label_names must be a non-empty list of distinct mask names, got "
                              f"{label_names!r}")
        if decoder not in DECODERS:
            import difflib

            close = difflib.get_close_matches(str(decoder), DECODERS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: decoder={decoder!r} is not one of {', '.join(DECODERS)}.{hint}")
        if float(getattr(image_encoder, "token_drop", 0.0) or 0.0):
            raise ConfigError(f"{where}: the decoder needs every patch token; set model.image_encoder.token_drop=0")
        if not 0 <= sw_overlap < 1 or int(sw_batch_size) < 1:
            raise ConfigError(f"{where}: sw_overlap must be in [0, 1) and sw_batch_size >= 1, got {sw_overlap!r}, "
                              f"{sw_batch_size!r}")
        self.label_names = list(label_names)
        self.spatial_dims = int(getattr(image_encoder, "spatial_dims", 2))
        in_channels = int(getattr(image_encoder, "in_chans", 1) or 1)
        swin = hasattr(image_encoder, "swin")
        kind = ("swinunetr" if swin else "unetr") if decoder == "auto" else decoder
        if kind == "swinunetr":
            self.decoder = self._swin_decoder(image_encoder, in_channels, norm_name, res_block, where)
        else:
            self.decoder = self._unetr_decoder(image_encoder, in_channels, feature_size, norm_name, res_block,
                                               skip_layers, where)
        self.kind = kind
        if not 0 < prior < 1:
            raise ConfigError(f"{where}: prior must be in (0, 1), got {prior!r}")
        # RetinaNet's prior initialisation (Lin et al. 2017): the output bias starts at logit(prior), so an untrained
        # decoder marks no voxel (findings fill ~1% of a volume); from 0 (every voxel at 0.5), Adam's lr-sized
        # steps took thousands of steps to move the bias where the background is
        out_conv = [m for m in self.decoder.out.modules() if isinstance(m, nn.modules.conv._ConvNd)][-1]
        nn.init.constant_(out_conv.bias, -math.log((1 - prior) / prior))
        self.num_prefix_tokens = int(getattr(image_encoder, "num_prefix_tokens", 0) or 0)
        self.grid = tuple(getattr(image_encoder, "grid", ()) or ())
        encoder_size = getattr(image_encoder, "img_size", None)
        if encoder_size is None and hasattr(image_encoder, "model"):
            encoder_size = getattr(image_encoder.model.patch_embed, "img_size", None)
        if roi_size is not None and len(tuple(roi_size)) != self.spatial_dims:
            raise ConfigError(f"{where}: roi_size needs {self.spatial_dims} sides, got {roi_size!r}")
        self.roi_size = tuple(int(s) for s in (roi_size or encoder_size or ()))
        if not self.roi_size:
            raise ConfigError(f"{where}: set roi_size (the training input size; the top-level volume_size fills it)")
        if encoder_size is not None and tuple(int(s) for s in encoder_size) != self.roi_size:
            raise ConfigError(f"{where}: roi_size {self.roi_size} differs from the image encoder's input size "
                              f"{tuple(encoder_size)}")
        self.sw_overlap, self.sw_batch_size = float(sw_overlap), int(sw_batch_size)
        self.dice_loss = DiceLoss(sigmoid=True, batch=True)
        self.lambda_dice, self.lambda_ce = float(lambda_dice), float(lambda_ce)
        self.register_buffer("thresholds", torch.tensor(THRESHOLDS), persistent=False)

    # -- building --------------------------------------------------------------------------------------------
    def _unetr_decoder(self, encoder: nn.Module, in_channels: int, feature_size: int, norm_name: str,
                       res_block: bool, skip_layers: Sequence[int] | None, where: str) -> nn.Module:
        if hasattr(encoder, "vit"):  # mmvl's MONAI ViT
            patch, depth = encoder.patch_size, len(encoder.vit.blocks)
        elif getattr(encoder, "is_vit", False):  # timm ViT
            patch, depth = encoder.patch_size, len(encoder.model.blocks)
        else:
            raise ConfigError(f"{where}: decoder 'unetr' needs a ViT image encoder (monai_vit, timm_vit), not "
                              f"{type(encoder).__name__}; a 3D Swin takes decoder 'swinunetr'")
        return UnetrDecoder(self.spatial_dims, in_channels, int(encoder.out_dim), patch, depth,
                            len(self.label_names), int(feature_size), norm_name, res_block, skip_layers, where)

    def _swin_decoder(self, encoder: nn.Module, in_channels: int, norm_name: str, res_block: bool,
                      where: str) -> nn.Module:
        if not hasattr(encoder, "swin"):
            raise ConfigError(f"{where}: decoder 'swinunetr' needs the 3D Swin encoder (monai_swin), not "
                              f"{type(encoder).__name__}")
        stages = sum(hasattr(encoder.swin, f"layers{k}") for k in range(1, 9))
        if stages != 4 or tuple(encoder.patch_size) != (2, 2, 2):
            raise ConfigError(f"{where}: the SwinUNETR decoder takes a four-stage Swin with 2-voxel patches (as "
                              f"SwinUNETR), the encoder has {stages} stages and patch_size {tuple(encoder.patch_size)}")
        return SwinUnetrDecoder(3, in_channels, int(encoder.swin.embed_dim), len(self.label_names), norm_name,
                                res_block)

    @property
    def output_layer(self) -> nn.Module:
        return self.decoder

    # -- forward ---------------------------------------------------------------------------------------------
    def logits(self, image: EncoderOutput, images: torch.Tensor) -> torch.Tensor:
        """``(B, L, *spatial)`` float32 logits for the ``images`` the encoder output ``image`` came from."""
        if image.hidden_states is None:
            raise ValueError("the segmentation head needs the encoder's hidden states (forward(..., "
                             "hidden_states=True))")
        if self.kind == "swinunetr":
            return self.decoder(images, image.hidden_states).float()
        prefix = self.num_prefix_tokens
        grid = self.grid
        hidden = [h[:, prefix:] for h in image.hidden_states]
        return self.decoder(images, hidden, image.tokens[:, prefix:], grid).float()

    def targets(self, batch: dict[str, Any]) -> torch.Tensor:
        if "masks" not in batch:
            raise ValueError("the segmentation head needs masks in the batch (manifest rows' 'masks'; the data "
                             "loader reads them when the model has a segmentation head)")
        return batch["masks"].float()

    def forward(self, image: EncoderOutput, text: EncoderOutput | None, batch: dict[str, Any]) -> dict[str, Any]:
        logits = self.logits(image, batch["image"])
        targets = self.targets(batch)
        out = {"loss": self.loss(logits, targets)}
        if not self.training:
            out["dice_stats"] = dice_counts(logits.sigmoid(), targets, self.thresholds)
        return out

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``lambda_dice`` x batch Dice loss (mean over labels) + ``lambda_ce`` x binary cross-entropy (mean over
        voxels and labels)."""
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
        return self.lambda_dice * self.dice_loss(logits, targets) + self.lambda_ce * bce

    @torch.no_grad()
    def predict_logits(self, encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, L, *spatial)`` of images of any size: one pass at the ROI size, else MONAI's
        ``sliding_window_inference`` over ROI-sized windows (Gaussian-weighted where they overlap; an input
        smaller than the ROI is padded and cropped back)."""
        def run(x: torch.Tensor) -> torch.Tensor:
            return self.logits(encoder(x, hidden_states=True), x)

        if tuple(images.shape[2:]) == self.roi_size:
            return run(images)
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(images, self.roi_size, self.sw_batch_size, run, overlap=self.sw_overlap,
                                        mode="gaussian")

    # -- validation ------------------------------------------------------------------------------------------
    def evaluate(self, stats: np.ndarray) -> dict[str, float]:
        """Dice per label at threshold 0.5 (``dice/<label>``) and their mean over the labels that occur
        (``mean_dice``) from :func:`dice_counts` of every validation batch ``(N, L, T, 3)``."""
        dice = dice_from_counts(stats)[:, HALF]
        metrics = {f"dice/{name}": float(value) for name, value in zip(self.label_names, dice)}
        known = dice[~np.isnan(dice)]
        metrics["mean_dice"] = float(known.mean()) if len(known) else float("nan")
        return metrics


def dice_counts(probabilities: torch.Tensor, targets: torch.Tensor,
                thresholds: torch.Tensor | Sequence[float] = THRESHOLDS) -> torch.Tensor:
    """``(B, L, T, 3)`` voxel counts per sample, label and threshold: predicted-and-true, predicted, true (the
    prediction is ``probability >= threshold``, the target ``> 0.5``)."""
    thresholds = torch.as_tensor(thresholds, dtype=probabilities.dtype, device=probabilities.device)
    truth = targets > 0.5
    dims = tuple(range(2, probabilities.ndim))
    true = truth.sum(dims).float()
    counts = []
    for threshold in thresholds:  # one threshold at a time: a (B, L, T, *spatial) mask would not fit for CT
        predicted = probabilities >= threshold
        counts.append(torch.stack([(predicted & truth).sum(dims).float(), predicted.sum(dims).float(), true], -1))
    return torch.stack(counts, 2)


def dice_from_counts(stats: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(L, T)`` Dice of the summed counts ``(N, L, T, 3)``: ``2 |P & G| / (|P| + |G|)``, NaN where a label has
    neither predicted nor true voxels."""
    total = np.asarray(stats, dtype=np.float64).sum(0)
    denominator = total[..., 1] + total[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * total[..., 0] / np.maximum(denominator, 1), np.nan)


def choose_dice_thresholds(stats: np.ndarray | None, label_names: Sequence[str]) -> tuple[list[float], list[str]]:
    """Each label's Dice-optimal threshold among :data:`THRESHOLDS` on the summed validation counts, with where it
    came from; 0.5 for a label without true voxels in the split (or no counts at all) or without overlap at any
    threshold."""
    thresholds, sources = [], []
    dice = dice_from_counts(stats) if stats is not None and len(stats) else None
    for index, _ in enumerate(label_names):
        true = 0.0 if dice is None else float(np.asarray(stats)[:, index, 0, 2].sum())
        if dice is None or true == 0:
            thresholds.append(0.5)
            sources.append("default 0.5: no voxel of this label in the validation split")
            continue
        best = int(np.nanargmax(np.nan_to_num(dice[index], nan=-1.0)))
        if not dice[index, best] > 0:  # no overlap at any threshold: nothing to choose between
            thresholds.append(0.5)
            sources.append("default 0.5: Dice 0 at every threshold on validation")
            continue
        thresholds.append(float(THRESHOLDS[best]))
        sources.append(f"Dice-optimal on validation (Dice {dice[index, best]:.4f})")
    return thresholds, sources


def segmentation_head(model: nn.Module, source: str = "the model") -> tuple[str, nn.Module]:
    """``(name, head)`` of the model's one segmentation head."""
    found = [(name, head) for name, head in getattr(model, "heads", {}).items()
             if getattr(head, "is_segmenter", False)]
    if len(found) != 1:
        raise ConfigError(f"{source}: needs a model with one segmentation head (configs/finetune/seg_*), this one "
                          f"has {len(found)}")
    return found[0]


__all__ = ["DECODERS", "THRESHOLDS", "SegmentationHead", "SwinUnetrDecoder", "UnetrDecoder",
           "choose_dice_thresholds", "dice_counts", "dice_from_counts", "segmentation_head"]
