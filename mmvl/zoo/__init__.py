"""The model zoo: export trained models as self-describing entries (safetensors weights, plain-JSON architecture,
preprocessing, prompts, model card, SHA-256 sums) with open_clip, transformers, MONAI bundle, TorchScript and ONNX
versions, and import open_clip and transformers models. Entries load back by folder or by name
(``model_zoo/index.json``, ``$MMVL_ZOO``) through :mod:`mmvl.loading`, re-exported here."""

from mmvl.loading import (
    LoadedModel,
    load,
    load_image_encoder,
    load_pretrained,
    load_text_encoder,
    resolve,
    verify_entry,
)
from mmvl.zoo.export import export
from mmvl.zoo.hf_text import import_hf_text
from mmvl.zoo.open_clip_format import import_open_clip

__all__ = ["LoadedModel", "export", "import_hf_text", "import_open_clip", "load", "load_image_encoder",
           "load_pretrained", "load_text_encoder", "resolve", "verify_entry"]
