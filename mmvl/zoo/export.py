"""Export a trained model (work dir or checkpoint) as a model-zoo entry: the mmvl format (safetensors weights,
a plain-JSON architecture, the preprocessing spec, prompts, tokenizer, model card, SHA-256 sums), by default with
the text tower as a transformers folder, and on request the interop formats (open_clip, MONAI bundle,
TorchScript, ONNX: each holds another copy of the image tower), each verified by loading it back with its own
library and comparing embeddings with mmvl's on the same probe input."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mmvl
from mmvl import loading
from mmvl.data.transforms import save_preprocess
from mmvl.errors import CheckpointError, ConfigError
from mmvl.evaluation.predict import classifier_head, probabilities, validation_thresholds
from mmvl.evaluation.segment import has_segmenter, segmenter_check
from mmvl.evaluation.segment import validation_thresholds as segmentation_thresholds
from mmvl.evaluation.zero_shot import PRESETS, load_prompt_file
from mmvl.loading import LoadedModel, load_pretrained
from mmvl.models import EncoderModel, VisionLanguageModel
from mmvl.models.embedders import contrastive_head
from mmvl.models.finetune import lora_layers, merge_lora, merged_model_config
from mmvl.utils import atomic_write_text
from mmvl.zoo import compiled, hf_text, monai_bundle, open_clip_format
from mmvl.zoo import entry as zoo_entry
from mmvl.zoo._context import (
    PROBE_TEXTS,
    ExportContext,
    NotExportable,
    bert_config_fields,
    compare,
    plain,
    save_tokenizer,
)
from mmvl.zoo.card import write_model_card

logger = logging.getLogger(__name__)

FORMATS = ("mmvl", "open_clip", "hf", "monai", "torchscript", "onnx")
# Lean entries: the weights once (mmvl) and the text tower for transformers users; every other format stores the
# image tower again (a 120 MB model made a 401 MB entry with all of them), so they are opt-in.
DEFAULT_FORMATS = ("mmvl", "hf")
ALL = "all"
RENAMED = {"auto": "--formats auto is now --formats all (the default writes mmvl and hf only)"}


@dataclass
class ExportResult:
    """The entry written: its folder, name, ``config.json`` content, the formats written and those skipped (with
    the reason), and each format's check against mmvl (cosine, max abs difference, bitwise equality)."""

    path: Path
    name: str
    config: dict[str, Any]
    formats: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def files(self) -> list[tuple[str, int]]:
        """``(relative path, bytes)`` of every file in the entry."""
        return [(name, (self.path / name).stat().st_size) for name in [*zoo_entry.entry_files(self.path),
                                                                        loading.SUMS]]


# -- the mmvl format -------------------------------------------------------------------------------------------
def towers(model: nn.Module) -> list[str]:
    return [part for part, attr in (("image", "image_encoder"), ("text", "text_encoder"))
            if getattr(model, attr, None) is not None]


def _absolute_paths(value: Any, where: str = "model") -> list[str]:
    if isinstance(value, Mapping):
        return [p for k, v in value.items() for p in _absolute_paths(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _absolute_paths(v, f"{where}.{i}")]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith(("local-dir:", "~"))):
        return [f"{where}={value}"]
    return []


def entry_model_config(model_cfg: Mapping[str, Any], model: nn.Module, parts: Sequence[str],
                       out: Path) -> tuple[str, dict[str, Any]]:
    """``(architecture, model dict)`` for config.json: the training config's model dict with local paths removed
    (pretrained weight files, hub flags), tokenizers saved into ``out`` and named relative to it, and distributed
    settings dropped. Pretrained BERT text models are rewritten as ``config=`` (their weights are in
    model.safetensors); other pretrained text models point at the entry's ``text_encoder/`` folder."""
    cfg = copy.deepcopy(plain(model_cfg))
    cfg.pop("type", None)
    image = cfg.get("image_encoder")
    if image:
        image.pop("pretrained_path", None)
        image["grad_checkpointing"] = False
        if image.get("type") == "open_clip":
            if ":" in str(image.get("model_name", "")):
                raise NotExportable(f"image_encoder.model_name {image['model_name']!r} needs that folder or hub "
                                    "repo to rebuild; export from an open_clip built-in model name")
            image["pretrained"] = None
        elif "pretrained" in image:
            image["pretrained"] = False
    text = cfg.get("text_encoder")
    text_module = getattr(model, "text_encoder", None)
    tokenizer_sources: dict[str, Any] = {}
    if text and text_module is not None:
        source = text.get("tokenizer") or text.get("pretrained")
        text["grad_checkpointing"] = False
        if text.get("pretrained") is not None:
            bert = bert_config_fields(text_module.model.config, text_module.tokenizer)
            if bert is not None:
                text.pop("pretrained")
                text["config"] = bert
            else:
                hf_text.write_text_model(text_module, out / hf_text.FOLDER, source)
                text["pretrained"] = hf_text.FOLDER
        save_tokenizer(text_module.tokenizer, source, out / loading.TOKENIZER)
        tokenizer_sources[loading.TOKENIZER] = source
        text["tokenizer"] = loading.TOKENIZER
    heads = cfg.get("heads") or []
    heads = heads if isinstance(heads, list) else [heads]
    for head_cfg, (head_name, head) in zip(heads, getattr(model, "heads", {}).items()):
        for key in ("rank", "world_size", "dist_impl"):
            head_cfg.pop(key, None)
        if head_cfg.get("tokenizer") is not None and getattr(head, "tokenizer", None) is not None:
            source = head_cfg["tokenizer"]
            shared = next((folder for folder, seen in tokenizer_sources.items() if seen == source), None)
            if shared is None:
                shared = loading.TOKENIZER if not tokenizer_sources else f"tokenizer_{head_name}"
                save_tokenizer(head.tokenizer, source, out / shared)
                tokenizer_sources[shared] = source
            head_cfg["tokenizer"] = shared
    if "image" not in parts:
        image = None
    if "text" not in parts:
        text = None
    if isinstance(model, VisionLanguageModel) and set(parts) == set(towers(model)):
        architecture = "VisionLanguageModel"
        entry_cfg = {key: value for key, value in cfg.items() if value is not None}
    else:
        architecture = "EncoderModel"
        head = contrastive_head(model)
        entry_cfg = {"image_encoder": image, "text_encoder": text,
                     "embed_dim": None if head is None else int(head.embed_dim),
                     "max_logit_scale": 100.0 if head is None else float(math.exp(head.max_log_scale))}
        for folder in list(tokenizer_sources):
            if text is None or folder != loading.TOKENIZER:
                shutil.rmtree(out / folder, ignore_errors=True)
    leaks = _absolute_paths(entry_cfg)
    if leaks:
        raise NotExportable(f"config.json would embed local paths ({'; '.join(leaks)}); the model cannot be rebuilt "
                            "from the entry alone")
    return architecture, entry_cfg


def _entry_state(model: nn.Module, architecture: str) -> dict[str, torch.Tensor]:
    """The loaded model's weights under the entry model's names."""
    state = model.state_dict()
    if architecture == "VisionLanguageModel" or isinstance(model, EncoderModel):
        return state
    mapped = {k: v for k, v in state.items() if k.startswith(("image_encoder.", "text_encoder."))}
    head = contrastive_head(model)
    if head is not None:
        mapped.update({"image_proj.weight": head.image_proj.weight, "text_proj.weight": head.text_proj.weight,
                       "logit_scale": head.logit_scale})
    return mapped


def rebuild_from_entry(model: nn.Module, architecture: str, entry_cfg: Mapping[str, Any], out: Path) -> nn.Module:
    """Build the model config.json describes and give it the loaded weights: the check that config.json alone
    (with the entry's tokenizers) rebuilds the architecture."""
    rebuilt = loading.build_entry_model({"architecture": architecture, "model": entry_cfg}, out)
    own = rebuilt.state_dict()
    state = {k: v for k, v in _entry_state(model, architecture).items()  # a pretrained BERT's unused pooler goes
             if k in own or not k.startswith("text_encoder.model.pooler.")}
    result = rebuilt.load_state_dict(state, strict=False)
    if architecture == "EncoderModel":  # only the exported towers
        unexpected = [k for k in result.unexpected_keys if k.split(".")[0] in ("image_encoder", "text_encoder")
                      and getattr(rebuilt, k.split(".")[0]) is not None]
    else:
        unexpected = result.unexpected_keys
    if result.missing_keys or unexpected:
        raise CheckpointError(f"the model rebuilt from config.json does not take the trained weights: missing "
                              f"{result.missing_keys[:5]}, unexpected {unexpected[:5]}")
    return rebuilt.eval()


def input_spec(model: nn.Module, pipeline_spec: Sequence[Mapping[str, Any]], kind: str) -> dict[str, Any]:
    """``{"kind": "2d"|"3d", "in_chans": C, "spatial_size": [...]}`` of the tensors the image encoder takes."""
    encoder = getattr(model, "image_encoder", None)
    size = None
    for step in pipeline_spec:
        if step.get("type") == "ResizePad":
            size = [int(step["size"])] * 2
        elif step.get("type") == "CropOrPad":
            size = [int(s) for s in step["size"]]
    if size is None and encoder is not None:
        for attr in ("img_size", "image_size"):
            value = getattr(encoder, attr, None) or getattr(getattr(getattr(encoder, "model", None), "patch_embed",
                                                                    None), attr, None)
            if value:
                size = [int(v) for v in value]
                break
    return {"kind": kind, "in_chans": int(getattr(encoder, "in_chans", 1) or 1), "spatial_size": size}


def _probe_images(spec: Mapping[str, Any], seed: int = 0) -> torch.Tensor:
    if not spec.get("spatial_size"):
        raise NotExportable("the image input size is unknown (no ResizePad/CropOrPad in the pipeline)")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, spec["in_chans"], *spec["spatial_size"], generator=generator)


@torch.no_grad()
def _check_rebuilt(model: nn.Module, rebuilt: nn.Module, images: torch.Tensor, texts: list[str],
                   parts: Sequence[str]) -> dict[str, Any]:
    """The rebuilt model must give bitwise the same embeddings as the loaded one."""
    checks = {}
    if "image" in parts and getattr(model, "image_encoder", None) is not None:
        expected = (model.encode_image(images) if contrastive_head(model) is not None
                    else model.image_encoder(images).pooled)
        got = (rebuilt.encode_image(images) if contrastive_head(rebuilt) is not None
               else rebuilt.image_encoder(images).pooled)
        if contrastive_head(model) is None:
            expected, got = (torch.nn.functional.normalize(t, dim=-1) for t in (expected, got))
        checks["image"] = compare(expected, got, "mmvl image embeddings")
    if "text" in parts and getattr(model, "text_encoder", None) is not None and contrastive_head(model):
        checks["text"] = compare(model.encode_text(texts), rebuilt.encode_text(texts), "mmvl text embeddings")
    for part, check in checks.items():
        if not check["bitwise_equal"]:
            raise CheckpointError(f"the {part} embeddings of the model rebuilt from config.json + model.safetensors "
                                  f"differ from the trained model's (max abs diff {check['max_abs_diff']:.3g})")
    return checks


# float32 rounding of W + B A * alpha / r against the two matmuls of the adapter: ~1e-7 relative per weight, a
# few 1e-6 on probabilities after a handful of blocks; 1e-4 still catches a wrong merge (a lost or doubled
# adapter moves them by the adapter's whole contribution)
MERGE_ATOL = 1e-4


@torch.no_grad()
def _check_classifier(adapted: nn.Module, merged: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """The exported classifier's probabilities against the trained (LoRA-adapted) model's on the probe images."""
    name, head = classifier_head(adapted)
    expected = probabilities(adapted, head, images)
    got = probabilities(merged, merged.heads[name], images)
    diff = float((expected - got).abs().max())
    if not diff <= MERGE_ATOL:
        raise CheckpointError(f"the exported classifier's probabilities differ from the trained model's by {diff:.3g} "
                              f"(> {MERGE_ATOL}); LoRA was not merged correctly, not written")
    return {"max_abs_diff": diff, "bitwise_equal": bool(torch.equal(expected, got)), "atol": MERGE_ATOL}


def _check_segmenter(adapted: nn.Module, merged: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """The exported segmenter's probabilities against the trained (LoRA-adapted) model's on the probe images."""
    diff = segmenter_check(adapted, merged, images)
    if not diff <= MERGE_ATOL:
        raise CheckpointError(f"the exported segmenter's probabilities differ from the trained model's by {diff:.3g} "
                              f"(> {MERGE_ATOL}); LoRA was not merged correctly, not written")
    return {"max_abs_diff": diff, "atol": MERGE_ATOL}


# -- prompts and metrics ----------------------------------------------------------------------------------------


def _is_prompt_record(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("prompts"), dict) and isinstance(data.get("labels"), list)


def find_prompts(work_dir: Path | None, prompts: str | os.PathLike | Mapping[str, Any] | None) -> dict | None:
    """``prompts.json`` content: from ``prompts`` (a zero-shot/evaluation JSON sidecar, a prompt file, or a dict),
    else from the work dir: the prompts of a ``tools/evaluate.py --task zero_shot`` result, or the newest zero-shot
    sidecar (``tools/zero_shot.py --out X.csv`` writes ``X.json``)."""
    record: dict[str, Any] | None = None
    source = None
    if isinstance(prompts, Mapping):
        record, source = dict(prompts), "given"
    elif prompts is not None:
        path = Path(prompts)
        data = load_prompt_file(path)
        record = data if _is_prompt_record(data) else {"templates": data, "labels": [], "prompts": {}}
        source = path.name
    elif work_dir is not None and work_dir.is_dir():
        candidates = []
        for path in work_dir.glob("*.json"):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if _is_prompt_record(data):  # an evaluation's prompts first, then the newest
                candidates.append((data.get("task") == "zero_shot", path.stat().st_mtime, path.name, data))
        if candidates:
            *_, source, record = max(candidates, key=lambda c: c[:3])
    if record is None:
        return None
    preset = record.get("preset")
    templates = record.get("templates")
    if templates is None and isinstance(preset, str) and preset in PRESETS:
        templates = PRESETS[preset]
    return {"preset": preset if isinstance(preset, str) else None, "mode": record.get("mode", "pairwise"),
            "labels": list(record.get("labels") or []), "prompts": record.get("prompts") or {},
            "templates": templates, "source": source}


def _evaluation_summary(record: Mapping[str, Any], source: str) -> dict[str, Any]:
    """What the card shows of a ``tools/evaluate.py`` JSON: task, split, sizes, prompts and the metrics (not the
    model/manifest paths nor the list of unreadable files)."""
    keep = ("task", "split", "val_split", "n_rows", "preset", "mode", "labels", "n_failed")
    return {"source": source, **{key: record[key] for key in keep if key in record},
            "metrics": record.get("metrics")}


def find_metrics(work_dir: Path | None, metrics: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, Any]:
    """``{"validation": {...}, "evaluation": {task: {...}}}``: the last validation record of ``metrics.jsonl``
    and ``tools/evaluate.py`` results: ``metrics`` (a JSON file or dict), else every JSON file in the work dir that
    holds a ``task`` and ``metrics`` (the newest per task)."""
    found: dict[str, Any] = {}
    if work_dir is not None and (work_dir / "metrics.jsonl").is_file():
        for line in (work_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            values = {k: v for k, v in record.items() if k.startswith("val/") and isinstance(v, (int, float))}
            if values:
                found["validation"] = {"step": record.get("step"), **values}
    records: list[tuple[str, Any]] = []
    if isinstance(metrics, Mapping):
        records.append(("given", dict(metrics)))
    elif metrics is not None:
        records.append((Path(metrics).name, json.loads(Path(metrics).read_text(encoding="utf-8"))))
    elif work_dir is not None and work_dir.is_dir():
        for path in sorted(work_dir.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
            try:
                records.append((path.name, json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError):
                continue
    evaluation = {}
    for source, record in records:
        if isinstance(record, Mapping) and isinstance(record.get("metrics"), Mapping) and (
                "task" in record or isinstance(metrics, (str, os.PathLike, Mapping))):
            evaluation[str(record.get("task", "evaluation"))] = _evaluation_summary(record, source)
    if evaluation:
        found["evaluation"] = evaluation
    return found


# -- export ----------------------------------------------------------------------------------------------------
def _writers() -> dict[str, Callable[[ExportContext], dict[str, Any]]]:
    """The interop writers, looked up when called (a test replaces one to see a failed export cleaned up)."""
    return {"open_clip": open_clip_format.export_open_clip, "hf": hf_text.export_hf_text,
            "monai": monai_bundle.export_monai_bundle, "torchscript": compiled.export_torchscript,
            "onnx": compiled.export_onnx}


def parse_list(value: str | Sequence[str] | None, allowed: Sequence[str], what: str) -> list[str] | None:
    """A comma list (or sequence) of names from ``allowed``, duplicates dropped; None for None. An unknown name is
    refused with the closest allowed one."""
    if value is None:
        return None
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if not items:
        raise ConfigError(f"{what}: empty list; choose from {', '.join(allowed)}")
    for item in items:
        if item not in allowed:
            close = difflib.get_close_matches(item, allowed, n=1, cutoff=0.5)
            hint = RENAMED.get(item) or (f"did you mean {close[0]!r}?" if close else "")
            raise ConfigError(f"{what}: unknown {item!r}{'; ' + hint if hint else ''} (choose from "
                              f"{', '.join(allowed)})")
    return list(dict.fromkeys(items))


def choose_formats(value: str | Sequence[str] | None) -> tuple[list[str], bool]:
    """``(formats, explicit)``, mmvl first. None: :data:`DEFAULT_FORMATS`; ``"all"``: every format. Both skip, with
    the reason, a format this model cannot be written in; formats named one by one (``"mmvl,open_clip"``) must
    all apply (``explicit``)."""
    if value is None:
        return list(DEFAULT_FORMATS), False
    names = parse_list(value, (*FORMATS, ALL), "--formats")
    if ALL in names:
        return list(FORMATS), False
    return ["mmvl", *[name for name in names if name != "mmvl"]], True


def export(
    source: str | os.PathLike | LoadedModel,
    name: str,
    out: str | os.PathLike | None = None,
    parts: str | Sequence[str] | None = None,
    formats: str | Sequence[str] | None = None,
    prompts: str | os.PathLike | Mapping[str, Any] | None = None,
    metrics: str | os.PathLike | Mapping[str, Any] | None = None,
    license: str = "other",
    description: str | None = None,
    index: bool = True,
    overwrite: bool = False,
) -> ExportResult:
    """Write the zoo entry ``name`` for ``source`` (a work dir, a checkpoint or a loaded model) to ``out``
    (default ``model_zoo/NAME``) and add it to ``index.json`` of ``out``'s parent folder.

    ``parts``: ``image`` and/or ``text`` (default: every tower the model has; the heads go with a full export).
    ``formats``: None (``mmvl`` plus ``hf``, the text tower as a transformers folder, where it applies), ``all``
    (every format this model can be written in; the others are named in the card with the reason) or a list of
    ``mmvl, open_clip, hf, monai, torchscript, onnx``; a format named explicitly that does not apply is an error.
    Every interop format is read back with its own library and compared with mmvl's embeddings before the entry
    is moved into place; nothing is left behind when a check fails.
    """
    zoo_entry.check_name(name)
    loaded = source if isinstance(source, LoadedModel) else load_pretrained(source)
    if loaded.config.get("format") == loading.FORMAT:
        raise ConfigError(f"{loaded.source} is already a zoo entry; export from its work dir or checkpoint")
    model = loaded.model.to("cpu").float().eval()
    available = towers(model)
    chosen_parts = parse_list(parts, loading.PARTS, "--parts") or available
    missing = [p for p in chosen_parts if p not in available]
    if missing:
        raise ConfigError(f"--parts {','.join(chosen_parts)}: this model has no {' or '.join(missing)} encoder")
    chosen_formats, explicit = choose_formats(formats)

    out = Path(out) if out is not None else Path("model_zoo") / name
    if out.exists() and not (loading.is_entry(out) or (out.is_dir() and not any(out.iterdir()))):
        raise ConfigError(f"--out {out}: exists and is not a zoo entry; choose another folder")
    if out.exists() and loading.is_entry(out) and not overwrite:
        raise ConfigError(f"--out {out}: an entry exists already; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out.parent))
    try:
        result = _write_entry(loaded, model, tmp, out.resolve(), name, chosen_parts, chosen_formats, explicit,
                              prompts, metrics, license, description)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.path = out
    if index:
        record = {"path": os.path.relpath(out.resolve(), out.parent.resolve()),
                  "sha256sums": loading.sha256_file(out / loading.SUMS), "parts": chosen_parts,
                  "formats": result.formats, "input": result.config["input"]["kind"],
                  "mmvl_version": mmvl.__version__,
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        zoo_entry.update_index(out.parent, name, record)
    return result


def _move_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_entry(loaded: LoadedModel, model: nn.Module, out: Path, final: Path, name: str, parts: list[str],
                 formats: list[str], explicit: bool, prompts: Any, metrics: Any, license: str,
                 description: str | None) -> ExportResult:
    train_cfg = loaded.config
    work_dir = Path(loaded.info["work_dir"]) if loaded.info.get("work_dir") else None
    adapted = model
    if lora_layers(model):  # the entry holds plain weights: LoRA folded in, rebuilt without peft
        model = merge_lora(copy.deepcopy(model))
    architecture, entry_cfg = entry_model_config(merged_model_config(train_cfg["model"]), model, parts, out)
    rebuilt = rebuild_from_entry(model, architecture, entry_cfg, out)
    spec = input_spec(model, loaded.preprocess.spec, loaded.preprocess.kind) if "image" in parts else {
        "kind": "text", "in_chans": None, "spatial_size": None}
    probe_images = _probe_images(spec) if "image" in parts else torch.empty(0)
    checks: dict[str, Any] = {"mmvl": _check_rebuilt(model, rebuilt, probe_images, PROBE_TEXTS, parts)}
    classifier = segmenter = None
    if any(getattr(head, "is_classifier", False) for head in getattr(model, "heads", {}).values()):
        checks["merged"] = _check_classifier(adapted, model, probe_images)
        classifier = validation_thresholds(dataclasses.replace(loaded, model=model))
    if has_segmenter(model):
        checks["merged"] = _check_segmenter(adapted, model, probe_images)
        segmenter = segmentation_thresholds(dataclasses.replace(loaded, model=model))
    zoo_entry.save_weights(rebuilt, out / loading.WEIGHTS)
    if loaded.preprocess is not None:
        save_preprocess(out / loading.PREPROCESS, loaded.preprocess.spec, mmvl_version=mmvl.__version__)
    prompt_record = find_prompts(work_dir, prompts)
    if prompt_record is not None:
        atomic_write_text(out / loading.PROMPTS, json.dumps(prompt_record, indent=2) + "\n")
    head = contrastive_head(model)
    config = {
        "format": loading.FORMAT, "format_version": loading.FORMAT_VERSION, "name": name,
        "architecture": architecture, "parts": parts, "model": entry_cfg, "input": spec,
        "embedding": {"dim": int(head.embed_dim) if head is not None else None, "normalized": True,
                      "logit_scale": float(head.scale().detach()) if head is not None else None},
        "tokenizer": loading.TOKENIZER if (out / loading.TOKENIZER).is_dir() else None,
        # the report sections the text tower was trained on (tools/evaluate.py, generate_reports.py read them)
        "data": {key: plain(value) for key, value in (train_cfg.get("data") or {}).items()
                 if key == "report_sections"},
        **({"classifier": classifier} if classifier is not None else {}),
        **({"segmenter": segmenter} if segmenter is not None else {}),
        "license": license, "mmvl_version": mmvl.__version__,
        "source": {"checkpoint": Path(loaded.source).name, "step": loaded.info.get("step"),
                   "mmvl_version": loaded.info.get("mmvl_version")},
    }
    context = ExportContext(model=model, loaded=loaded, out=out, name=name, config=config,
                            probe_images=probe_images, probe_texts=list(PROBE_TEXTS), final=final)
    done, skipped = ["mmvl"], {}
    writers = _writers()
    for fmt in formats[1:]:
        before = set(out.iterdir())
        try:
            checks[fmt] = writers[fmt](context)
            done.append(fmt)
        except NotExportable as err:
            if explicit:
                raise NotExportable(f"--formats {fmt}: {err}") from err
            for path in set(out.iterdir()) - before:  # what the skipped format had begun to write
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            skipped[fmt] = str(err)
            logger.info("export %s: %s skipped: %s", name, fmt, err)
    config["formats"] = done
    atomic_write_text(out / loading.CONFIG, json.dumps(config, indent=2) + "\n")
    write_model_card(out, config, train_cfg, model, prompt_record, find_metrics(work_dir, metrics), checks, skipped,
                     description)
    zoo_entry.write_checksums(out)
    loading.verify_entry(out)
    return ExportResult(path=out, name=name, config=config, formats=done, skipped=skipped, checks=checks)
