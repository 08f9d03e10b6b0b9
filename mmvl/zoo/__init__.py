"""The model zoo: export trained models as self-describing entries (safetensors weights, plain-JSON architecture,
preprocessing, prompts, model card, SHA-256 sums) with open_clip, transformers, MONAI bundle, TorchScript and ONNX
versions, and load them back by folder or by name (``model_zoo/index.json``, ``$MMVL_ZOO``)."""

from mmvl.zoo.entry import EncoderModel, ImageEmbedder, resolve, verify_entry
from mmvl.zoo.export import export
from mmvl.zoo.load import LoadedModel, load, load_image_encoder, load_pretrained, load_text_encoder

__all__ = ["EncoderModel", "ImageEmbedder", "LoadedModel", "export", "import_hf_text", "import_open_clip", "load",
           "load_image_encoder", "load_pretrained", "load_text_encoder", "resolve", "verify_entry"]


def import_open_clip(*args, **kwargs):
    """:func:`mmvl.zoo.open_clip_format.import_open_clip`."""
    from mmvl.zoo.open_clip_format import import_open_clip as _import

    return _import(*args, **kwargs)


def import_hf_text(*args, **kwargs):
    """:func:`mmvl.zoo.hf_text.import_hf_text`."""
    from mmvl.zoo.hf_text import import_hf_text as _import

    return _import(*args, **kwargs)
