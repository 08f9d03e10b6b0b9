"""The model card (``README.md``) of a zoo entry: architecture, parameters, training data and settings, metrics,
prompts, formats with their verification, intended use and limits, licence.

Only the training config's hyper-parameters and the manifest's file name go in; no manifest rows, no DICOM
header values, no local paths.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from mmvl import loading
from mmvl.models.embedders import contrastive_head
from mmvl.utils import atomic_write_text
from mmvl.zoo.entry import entry_files

# Training-config fields the card shows (everything else in `data` may hold paths or site details).
DATA_FIELDS = ("type", "train_split", "val_split", "report_sections", "max_skip_fraction")
LOADING = {
    "mmvl": "`mmvl.zoo.load(\"{name}\")` (or this folder's path); `tools/zero_shot.py {name} scans/ --labels ...`",
    "open_clip": "in `<this folder>/open_clip` as the working directory (open_clip reads the text model's config from "
                 "`hf_model_name` `./text_model` relative to it): "
                 "`open_clip.create_model_and_transforms(\"local-dir:.\")`, "
                 "tokenizer `open_clip.get_tokenizer(\"local-dir:.\")`; the folder can be moved or copied",
    "hf": "`transformers.AutoModel.from_pretrained(\"<this folder>/text_encoder\")` and `AutoTokenizer` (pooling and "
          "projection to the shared space: `text_encoder/mmvl_text.json`, `text_encoder/text_projection.safetensors`)",
    "monai": "MONAI bundle at this folder's root: `monai.bundle.load(\"{name}\", bundle_dir=\"<zoo folder>\", "
             "workflow_type=\"inference\")`, or `models/model.ts` (TorchScript with the bundle metadata)",
    "torchscript": "`torch.jit.load(\"<this folder>/torchscript/image_encoder.pt\")`: images -> L2-normalised "
                   "embeddings",
    "onnx": "`onnxruntime.InferenceSession(\"<this folder>/onnx/image_encoder.onnx\")`: input `image`, output "
            "`embedding`",
}


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _short(value: Any) -> str:
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return Path(value).name  # a path: its file name only
    return json.dumps(value) if isinstance(value, (list, tuple, dict, bool)) or value is None else str(value)


def _table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("", "")) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | {_short(value)} |" for key, value in rows]
    return lines


NOISE = ("n_resamples", "threshold", "bootstrap", "n_unknown", "seed")


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Metric rows ``(path/to/metric, value)``: numbers, and ``[low, high]`` intervals, bookkeeping left out."""
    if isinstance(data, Mapping):
        return [item for key, value in data.items() if not any(n in str(key) for n in NOISE)
                for item in _flatten(value, f"{prefix}{key}/")]
    name = prefix.rstrip("/")
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        return [(name, _number(data))]
    if isinstance(data, list) and len(data) == 2 and all(isinstance(v, (int, float)) for v in data):
        return [(name, f"[{_number(data[0])}, {_number(data[1])}]")]
    return []


def _encoder_summary(cfg: Mapping[str, Any] | None) -> str:
    if not cfg:
        return "none"
    keys = ("model_name", "img_size", "patch_size", "embed_dim", "hidden_size", "depth", "num_layers", "num_heads",
            "global_pool", "pooling", "max_length", "proj_type")
    parts = [f"{k}={_short(cfg[k])}" for k in keys if cfg.get(k) is not None]
    inner = cfg.get("config") or {}
    parts += [f"{k}={inner[k]}" for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k in inner]
    return f"`{cfg.get('type')}` ({', '.join(parts)})" if parts else f"`{cfg.get('type')}`"


def _threshold_lines(config: Mapping[str, Any]) -> list[str]:
    """The per-label decision thresholds a classifier or segmenter entry records (``config.json``), as a table."""
    lines: list[str] = []
    for key, what, metric in (("classifier", "probability >= threshold: label predicted present", None),
                              ("segmenter", "voxel probability >= threshold: inside the mask", "val_dice")):
        record = config.get(key)
        if not record or not record.get("thresholds"):
            continue
        sources = record.get("threshold_source") or []
        sources = sources if isinstance(sources, list) else [sources] * len(record["labels"])
        scores = record.get(metric) or [None] * len(record["labels"]) if metric else None
        split = record.get("val_split")
        lines += ["## Thresholds", "",
                  f"Per-label thresholds recorded in `config.json` (`{key}`; {what}), chosen on the training run's "
                  f"validation split `{split}` ({record.get('n_val', 0)} scans); `tools/predict.py --threshold "
                  "LABEL=VALUE` overrides one.", ""]
        header = "| label | threshold | chosen |" + (" validation Dice |" if scores else "")
        lines += [header, "|---|---|---|" + ("---|" if scores else "")]
        for index, (label, threshold) in enumerate(zip(record["labels"], record["thresholds"])):
            source = sources[index] if index < len(sources) else ""
            cells = f"| {label} | {float(threshold):.4f} | {source} |"
            if scores:
                value = scores[index] if index < len(scores) else None
                cells += f" {'n/a' if value is None else f'{float(value):.4f}'} |"
            lines.append(cells)
        lines.append("")
    return lines


def write_model_card(out: Path, config: Mapping[str, Any], train_cfg: Mapping[str, Any], model: nn.Module,
                     prompts: Mapping[str, Any] | None, metrics: Mapping[str, Any], checks: Mapping[str, Any],
                     skipped: Mapping[str, str], description: str | None = None) -> Path:
    name, model_cfg = config["name"], config["model"]
    head = contrastive_head(model)
    spec = config["input"]
    tags = ["medical-imaging", "vision-language", "mmvl", "radiology" if spec.get("kind") != "3d" else "ct"]
    lines = ["---", f"license: {config.get('license', 'other')}", "library_name: mmvl",
             "tags: [" + ", ".join(tags) + "]"]
    if head is not None:
        lines.append("pipeline_tag: zero-shot-image-classification")
    lines += ["---", "", f"# {name}", ""]
    lines += [description or "A medical vision-language model exported by mmvl (`tools/export.py`).", ""]

    lines += ["## Model", ""]
    heads = model_cfg.get("heads") or []
    arch_rows = [("architecture", config["architecture"]), ("parts", ", ".join(config["parts"])),
                 ("image encoder", _encoder_summary(model_cfg.get("image_encoder"))),
                 ("text encoder", _encoder_summary(model_cfg.get("text_encoder"))),
                 ("heads", ", ".join(f"`{h.get('type')}`" for h in heads) or "none"),
                 ("embedding", f"{config['embedding']['dim']}-d, L2-normalised" if head is not None else "pooled"),
                 ("logit scale", round(config["embedding"]["logit_scale"], 4) if head is not None else "n/a"),
                 ("parameters: image encoder", f"{_count(getattr(model, 'image_encoder', None)):,}"),
                 ("parameters: text encoder", f"{_count(getattr(model, 'text_encoder', None)):,}"),
                 ("parameters: heads", f"{_count(getattr(model, 'heads', None)):,}"),
                 ("parameters: total", f"{_count(model):,}"),
                 ("mmvl version", config["mmvl_version"])]
    lines += _table(arch_rows, ("field", "value")) + [""]

    lines += _threshold_lines(config)

    lines += ["## Input and preprocessing", ""]
    if (out / loading.PREPROCESS).is_file():
        size = " x ".join(str(s) for s in spec.get("spatial_size") or []) or "n/a"
        lines += [f"{spec.get('kind', '').upper()} images, {spec.get('in_chans')} channel(s), {size}. The exact "
                  "pipeline is `preprocess.json` (rebuilt by `mmvl.zoo.load`); give the model tensors made by it:", ""]
        pipeline = json.loads((out / loading.PREPROCESS).read_text())["pipeline"]
        lines += [f"{i}. `{step['type']}` " + ", ".join(f"{k}={_short(v)}" for k, v in step.items() if k != "type")
                  for i, step in enumerate(pipeline, 1)]
    tokenizer = (model_cfg.get("text_encoder") or {}).get("max_length")
    if tokenizer:
        lines.append(f"Text: the tokenizer in `{loading.TOKENIZER}/`, at most {tokenizer} tokens.")
    lines.append("")

    lines += ["## Training", ""]
    data = train_cfg.get("data") or {}
    rows: list[tuple[str, Any]] = []
    if data.get("manifest"):
        rows.append(("data: manifest file", Path(str(data["manifest"])).name))
    rows += [(f"data: {k}", data[k]) for k in DATA_FIELDS if k in data]
    for section in ("train", "optim"):
        values = train_cfg.get(section) or {}
        rows += [(f"{section}: {k}", v) for k, v in sorted(values.items())
                 if isinstance(v, (int, float, str, bool)) or v is None]
    rows.append(("steps trained (checkpoint)", config["source"].get("step")))
    rows.append(("checkpoint", config["source"].get("checkpoint")))
    lines += _table(rows, ("setting", "value")) if rows else ["No training record (imported model)."]
    synthetic = "synthetic" in str(data.get("manifest", "")).lower()
    if synthetic:
        lines += ["", "**Trained on the synthetic demo set (`datasets/synthetic.py`): it shows the pipeline works; it "
                      "has learnt nothing about real patients.**"]
    lines.append("")

    lines += ["## Metrics", ""]
    if metrics.get("validation"):
        lines += ["Last validation (`metrics.jsonl`):", ""]
        lines += _table([(k, round(v, 4) if isinstance(v, float) else v) for k, v in metrics["validation"].items()],
                        ("metric", "value")) + [""]
    for task, result in (metrics.get("evaluation") or {}).items():
        sizes = result.get("n_rows") or {}
        lines += [f"`tools/evaluate.py --task {task}` on split `{result.get('split')}` "
                  f"({', '.join(f'{k}: {v}' for k, v in sizes.items()) or 'sizes not recorded'} rows"
                  + (f"; preset `{result['preset']}`, mode `{result.get('mode')}`" if result.get("preset") else "")
                  + f"; from `{result['source']}`):", ""]
        rows = _flatten(result.get("metrics") or {})
        lines += _table(rows[:80], ("metric", "value")) + [""]
    if not metrics:
        lines += ["No validation or evaluation metrics were recorded.", ""]

    if prompts:
        lines += ["## Zero-shot prompts", "",
                  f"`prompts.json` (from {prompts.get('source') or 'the export'}): preset `{prompts.get('preset')}`, "
                  f"mode `{prompts.get('mode')}`, labels: {', '.join(prompts.get('labels') or []) or 'none'}. "
                  "`LoadedModel.zero_shot(scans)` uses them when given no labels.", ""]

    lines += ["## Formats", "", "| format | how to load | check against mmvl (min cosine) |", "|---|---|---|"]
    for fmt in config["formats"]:
        check = checks.get(fmt) or {}
        cosines = [v["cosine_min"] for v in check.values() if isinstance(v, Mapping) and "cosine_min" in v]
        if fmt == "mmvl":
            summary = "rebuilt from config.json: bitwise equal"
        else:
            summary = f"{min(cosines):.6f}" if cosines else "n/a"
        lines.append(f"| {fmt} | {LOADING[fmt].format(name=name)} | {summary} |")
    for fmt, why in skipped.items():
        lines.append(f"| {fmt} | not exported: {why} | |")
    not_asked = [fmt for fmt in LOADING if fmt not in config["formats"] and fmt not in skipped]
    lines += ["", f"Present in this entry: {', '.join(config['formats'])}."]
    if not_asked:
        lines.append(f"Not written (opt-in: `tools/export.py --formats all`, or by name): {', '.join(not_asked)}.")
    lines.append("")

    lines += ["## Files", "", "| file | bytes |", "|---|---|"]
    lines += [f"| {f} | {(out / f).stat().st_size:,} |" for f in entry_files(out)]
    lines += [f"| {loading.CARD} | this card |", f"| {loading.SUMS} | SHA-256 of every other file |", ""]

    lines += ["## Intended use and limits", "",
              "For research on medical vision-language models: embeddings, retrieval and zero-shot scores to study "
              "and compare methods. It is not a medical device and must not be used for diagnosis or treatment "
              "decisions. Scores are uncalibrated similarities; they depend on the prompts and on the preprocessing "
              "(`preprocess.json`), and shift across scanners, sites and populations unlike the training data. "
              "Validation metrics above come from the training data set's own validation split.", ""]
    lines += ["## Licence", "", f"`{config.get('license', 'other')}`. The licence of the training data applies to "
              "the weights as well; check it before sharing.", ""]
    lines += ["## Integrity", "", f"`{loading.SUMS}` lists the SHA-256 of every file (`sha256sum -c "
              f"{loading.SUMS}` in this folder); `mmvl.zoo.load` refuses a file that does not match.", ""]
    return atomic_write_text(out / loading.CARD, "\n".join(lines))
