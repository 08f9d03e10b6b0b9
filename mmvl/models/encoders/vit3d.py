"""3D image encoders for CT volumes ``(B, C, D, H, W)``: MONAI's ViT, the Swin transformer of SwinUNETR, and
MONAI's 3D ResNet.

MONAI's modules are used as built; mmvl runs their blocks itself so that token dropping and gradient
checkpointing work the same way as for the 2D ViT, and MONAI's attention goes through ``mmvl.ops``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mmvl.errors import ConfigError
from mmvl.models.encoders.base import EncoderOutput, drop_tokens, load_weights_file, run_blocks, use_mmvl_attention
from mmvl.registry import ENCODERS


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != 3 or min(values) <= 0:
        raise ConfigError(f"image_encoder.{name} must be an int or three positive ints, got {value!r}")
    return values


def _check_volume(encoder: nn.Module, images: torch.Tensor, size: tuple[int, ...] | None, multiple: int) -> None:
    if images.ndim != 5:
        raise ValueError(f"{type(encoder).__name__} expects (B, C, D, H, W) volumes, got shape {tuple(images.shape)}")
    spatial = tuple(images.shape[2:])
    if size is not None and spatial != size:
        raise ValueError(f"{type(encoder).__name__} was built for volumes of {size}, got {spatial}; "
                         "set CropOrPad's size or the encoder's img_size to match")
    if any(s % multiple for s in spatial):
        raise ValueError(f"{type(encoder).__name__}: every volume side must be a multiple of {multiple}, got {spatial}")


def add_drop_path(blocks: nn.Module, rate: float) -> float:
    """Stochastic depth (Huang et al. 2016) on MONAI's transformer blocks, ``x + drop(attn(norm1(x)))`` and
    ``x + drop(mlp(norm2(x)))``, rising linearly over the blocks to ``rate`` as in timm's ViT. The residual
    branches' outputs pass through timm's ``drop_path`` by forward hooks, so the state dict keeps MONAI's names
    (UNETR checkpoints still load)."""
    from timm.layers import drop_path

    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"image_encoder.drop_path_rate must be in [0, 1), got {rate!r}")
    if rate:
        for index, block in enumerate(blocks):
            block_rate = rate * index / max(len(blocks) - 1, 1)
            for branch in (block.attn, block.mlp):
                branch.register_forward_hook(
                    lambda module, args, output, p=block_rate: drop_path(output, p, module.training))
    return float(rate)


@ENCODERS.register("monai_vit", "vit3d")
class MonaiViTEncoder(nn.Module):
    """MONAI ``ViT`` over 3D patches; pooled output is the mean of the patch tokens.

    ``img_size`` and ``patch_size`` are voxels per axis (D, H, W order of the input). ``token_drop``,
    ``grad_checkpointing`` and ``forward(images, token_drop=r)`` behave as in the 2D ViT encoder;
    ``drop_path_rate`` adds stochastic depth (:func:`add_drop_path`), as timm's ``drop_path_rate`` in 2D.
    ``pretrained_path`` loads a local MONAI ViT state dict (``vit.`` prefixes of UNETR checkpoints stripped).
    MONAI builds its ViT blocks with naive attention; ``attention="mmvl"`` (default) runs them through
    ``mmvl.ops.attention`` (SDPA or xformers), ``"native"`` keeps MONAI's.
    """

    spatial_dims = 3
    config_knobs = {"img_size": "volume_size"}  # filled from the config's volume_size (mmvl.config.validate)

    def __init__(
        self,
        img_size: int | Sequence[int] = (96, 96, 96),
        patch_size: int | Sequence[int] = (16, 16, 16),
        in_chans: int = 1,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        dropout_rate: float = 0.0,
        qkv_bias: bool = True,
        pos_embed_type: str = "learnable",
        token_drop: float = 0.0,
        grad_checkpointing: bool = False,
        pretrained_path: str | None = None,
        attention: str = "mmvl",
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        from monai.networks.nets import ViT

        self.img_size, self.patch_size = _triple(img_size, "img_size"), _triple(patch_size, "patch_size")
        if any(i % p for i, p in zip(self.img_size, self.patch_size, strict=True)):
            raise ConfigError(f"image_encoder.img_size {self.img_size} must be a multiple of patch_size "
                              f"{self.patch_size}")
        if hidden_size % num_heads:
            raise ConfigError(f"image_encoder.hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        self.vit = ViT(in_channels=in_chans, img_size=self.img_size, patch_size=self.patch_size,
                       hidden_size=hidden_size, mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads,
                       proj_type="conv", pos_embed_type=pos_embed_type, classification=False,
                       dropout_rate=dropout_rate, spatial_dims=3, qkv_bias=qkv_bias)
        for block in self.vit.blocks:  # MONAI builds this norm even without cross-attention; unused, it would
            if not getattr(block, "with_cross_attention", False):  # hold DDP up waiting for its gradient
                block.norm_cross_attn = nn.Identity()
        if pretrained_path:
            load_weights_file(self.vit, pretrained_path, "image_encoder")
        self.token_drop, self.grad_checkpointing = float(token_drop), grad_checkpointing
        self.patched_attention = use_mmvl_attention(self.vit, attention, "image_encoder")
        self.drop_path_rate = add_drop_path(self.vit.blocks, drop_path_rate)
        self.out_dim = hidden_size
        self.grid = tuple(i // p for i, p in zip(self.img_size, self.patch_size, strict=True))
        self.in_chans = in_chans
        self.num_prefix_tokens = 0

    def forward(self, images: torch.Tensor, token_drop: float | None = None,
                hidden_states: bool = False) -> EncoderOutput:
        _check_volume(self, images, self.img_size, 1)
        ratio = self.token_drop if token_drop is None else token_drop
        x = self.vit.patch_embedding(images)  # (B, N, hidden), position embedding added
        keep = None
        if ratio and (self.training or token_drop is not None):
            x, keep = drop_tokens(x, ratio)
        hidden = [] if hidden_states else None
        x = self.vit.norm(run_blocks(self.vit.blocks, x, self.grad_checkpointing, hidden))
        return EncoderOutput(pooled=x.mean(dim=1), tokens=x, keep_index=keep, hidden_states=hidden)


@ENCODERS.register("monai_swin", "swin3d")
class MonaiSwinEncoder(nn.Module):
    """The Swin transformer of MONAI's SwinUNETR; pooled output is the mean of the last stage's tokens.

    Volume sides must be multiples of ``patch_size * 2**len(depths)`` (32 with the defaults). Token dropping
    does not apply to windowed attention and is refused. ``pretrained_path`` accepts SwinUNETR's
    self-supervised ``swinViT.`` checkpoints.
    """

    spatial_dims = 3

    def __init__(
        self,
        in_chans: int = 1,
        embed_dim: int = 48,
        window_size: int | Sequence[int] = 7,
        patch_size: int | Sequence[int] = 2,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        use_v2: bool = False,
        grad_checkpointing: bool = False,
        token_drop: float = 0.0,
        pretrained_path: str | None = None,
    ):
        super().__init__()
        from monai.networks.nets.swin_unetr import SwinTransformer

        if token_drop:
            raise ConfigError("image_encoder.token_drop is not supported by the Swin encoder (windowed attention)")
        if len(depths) != len(num_heads):
            raise ConfigError(f"image_encoder.depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        self.patch_size = _triple(patch_size, "patch_size")
        self.swin = SwinTransformer(in_chans=in_chans, embed_dim=embed_dim, window_size=_triple(window_size,
                                    "window_size"), patch_size=self.patch_size, depths=tuple(depths),
                                    num_heads=tuple(num_heads), mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
                                    use_checkpoint=grad_checkpointing, spatial_dims=3, use_v2=use_v2)
        if pretrained_path:
            load_weights_file(self.swin, pretrained_path, "image_encoder")
        self.multiple = self.patch_size[0] * 2 ** len(depths)
        self.out_dim = embed_dim * 2 ** len(depths)

    def forward(self, images: torch.Tensor, token_drop: float | None = None,
                hidden_states: bool = False) -> EncoderOutput:
        if token_drop:
            raise ValueError("the Swin encoder cannot drop tokens")
        _check_volume(self, images, None, self.multiple)
        stages = self.swin(images, normalize=True)  # patch embedding, then each stage: (B, C, d, h, w)
        tokens = stages[-1].flatten(2).transpose(1, 2)
        return EncoderOutput(pooled=tokens.mean(dim=1), tokens=tokens,
                             hidden_states=list(stages) if hidden_states else None)


def _strided(size: int, stride: int, kernel: int) -> int:
    """Output length of a convolution or pooling with padding ``kernel // 2``."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


@ENCODERS.register("monai_resnet", "resnet3d")
class MonaiResNetEncoder(nn.Module):
    """MONAI's 3D ``ResNet`` (Hara et al. 2018; a 3D ResNet is also Merlin's CT image encoder): a convolutional
    tower for CT when a ViT trained from scratch on few volumes cannot learn local findings (the CT demo: a
    4-layer ViT given the labels directly stayed at AUROC ~0.45 for consolidation, where a small CNN learnt
    emphysema and cardiomegaly within 4 epochs).

    ``tokens``: the last stage's feature map, one token per voxel of its grid in row-major (D, H, W) order, so
    heatmaps and local alignment see a grid as with a ViT; ``pooled``: their mean (``pooling="avg"``, MONAI's
    head) or maximum (``"max"``: a finding seen in one region is not averaged away). ``layers``/``widths``:
    blocks and channels of the four stages (``(1, 1, 1, 1)`` is ResNet-10); ``conv1_stride`` and
    ``no_max_pool`` set the stem's downsampling (each later stage halves the grid). ``pretrained_path`` loads
    a local MONAI ResNet state dict (MedicalNet-style ``module.`` prefixes stripped; the classifier is not used).
    """

    spatial_dims = 3
    config_knobs = {"img_size": "volume_size"}  # filled from the config's volume_size (mmvl.config.validate)

    def __init__(
        self,
        img_size: int | Sequence[int] = (96, 96, 96),
        in_chans: int = 1,
        block: str = "basic",
        layers: Sequence[int] = (1, 1, 1, 1),
        widths: Sequence[int] = (64, 128, 256, 512),
        conv1_size: int = 7,
        conv1_stride: int = 2,
        no_max_pool: bool = False,
        norm: str = "batch",
        pooling: str = "avg",
        pretrained_path: str | None = None,
    ):
        super().__init__()
        from monai.networks.nets import ResNet

        if block not in ("basic", "bottleneck"):
            raise ConfigError(f"image_encoder.block must be 'basic' or 'bottleneck', got {block!r}")
        if pooling not in ("avg", "max"):
            raise ConfigError(f"image_encoder.pooling must be 'avg' or 'max', got {pooling!r}")
        if len(layers) != 4 or len(widths) != 4 or min(*layers, *widths) <= 0:
            raise ConfigError(f"image_encoder.layers and widths must be four positive ints each, got {layers!r} "
                              f"and {widths!r}")
        self.img_size = _triple(img_size, "img_size")
        self.resnet = ResNet(block, [int(n) for n in layers], [int(w) for w in widths], spatial_dims=3,
                             n_input_channels=in_chans, conv1_t_size=int(conv1_size),
                             conv1_t_stride=int(conv1_stride), no_max_pool=no_max_pool, feed_forward=False,
                             norm=norm)
        if pretrained_path:
            load_weights_file(self.resnet, pretrained_path, "image_encoder")
        grid = [_strided(size, int(conv1_stride), int(conv1_size)) for size in self.img_size]
        for _ in range(3 + (not no_max_pool)):  # the max pool (kernel 3) and stages 2-4 (3^3 convs) halve it
            grid = [_strided(size, 2, 3) for size in grid]
        self.grid = tuple(grid)
        self.pooling, self.in_chans, self.num_prefix_tokens = pooling, in_chans, 0
        self.out_dim = int(widths[-1]) * (4 if block == "bottleneck" else 1)

    def forward(self, images: torch.Tensor, token_drop: float | None = None,
                hidden_states: bool = False) -> EncoderOutput:
        if token_drop:
            raise ValueError("MonaiResNetEncoder has no tokens to drop (token_drop is for ViT encoders)")
        _check_volume(self, images, self.img_size, 1)
        net = self.resnet
        x = net.act(net.bn1(net.conv1(images)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        hidden = [] if hidden_states else None
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = stage(x)
            if hidden is not None:
                hidden.append(x)
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C), row-major over the grid
        pooled = tokens.amax(dim=1) if self.pooling == "max" else tokens.mean(dim=1)
        return EncoderOutput(pooled=pooled, tokens=tokens, hidden_states=hidden)
