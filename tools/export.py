"""Export a trained model as a model-zoo entry, or import an open_clip / transformers model into one.

    python tools/export.py WORK_DIR_OR_CHECKPOINT --name NAME [--out model_zoo/NAME] [--parts image,text]
        [--formats all|mmvl,open_clip,hf,monai,torchscript,onnx] [--prompts zero_shot.json] [--metrics eval.json]
        [--license LICENSE] [--description TEXT] [--overwrite] [--no-index]
    python tools/export.py --from-open-clip OPEN_CLIP_DIR_OR_CONFIG [--checkpoint FILE] [--text-model DIR] --name NAME
    python tools/export.py --from-transformers TEXT_MODEL_DIR [--pooling cls|mean] --name NAME
    python tools/export.py --verify model_zoo/NAME

The entry (default ``model_zoo/NAME``) holds ``model.safetensors``, ``config.json``, ``preprocess.json``,
``prompts.json`` (the newest zero-shot sidecar in the work dir, or ``--prompts``), ``tokenizer/``, a model card
(``README.md``) and ``SHA256SUMS``, and the text tower as a transformers folder (``text_encoder/``). The other
interop formats each store the image tower again, so they are opt-in: ``--formats all`` writes every one this
model can be expressed in and names the others with the reason in the card; ``--formats mmvl,open_clip`` writes
those named (an unknown name, or one that does not apply, is an error). Every format is read back with its own
library and compared with mmvl's embeddings before the entry is moved into place, and the entry is added to
``index.json`` beside it so ``mmvl.zoo.load("NAME")`` and ``tools/zero_shot.py NAME ...`` find it.
A fine-tuning work dir (configs/finetune/) gives a classifier entry: encoder and head weights with LoRA merged into
plain weights (its probabilities checked against the adapter model's), and in config.json ``classifier`` the label
names and per-label thresholds (F1-optimal on the run's validation split); ``tools/predict.py NAME ...`` and
``mmvl.predict`` run it.
Exit code 0 on success, 1 when a check fails, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys

from mmvl.errors import MMVLError
from mmvl.utils import setup_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", help="training work dir or checkpoint file")
    parser.add_argument("--name", help="entry name (letters, digits, '.', '_', '-')")
    parser.add_argument("--out", help="entry folder (default model_zoo/NAME); index.json goes in its parent")
    parser.add_argument("--parts", default=None, help="image,text (default: every tower the model has)")
    parser.add_argument("--formats", default=None,
                        help="default mmvl,hf; 'all', or a list of mmvl,open_clip,hf,monai,torchscript,onnx")
    parser.add_argument("--prompts", help="zero-shot sidecar (tools/zero_shot.py) or prompt file for prompts.json")
    parser.add_argument("--metrics", help="evaluation JSON (tools/evaluate.py) for the model card")
    parser.add_argument("--license", default="other", help="licence field of the model card (default: other)")
    parser.add_argument("--description", help="one paragraph for the model card")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing entry")
    parser.add_argument("--no-index", action="store_true", help="do not add the entry to index.json")
    parser.add_argument("--from-open-clip", metavar="PATH", help="import an open_clip folder or config JSON")
    parser.add_argument("--checkpoint", help="with --from-open-clip: the checkpoint file")
    parser.add_argument("--text-model", help="with --from-open-clip: local transformers folder of the text tower")
    parser.add_argument("--from-transformers", metavar="DIR", help="import a local transformers text-model folder")
    parser.add_argument("--pooling", choices=["cls", "mean"], help="with --from-transformers (default cls)")
    parser.add_argument("--verify", metavar="ENTRY", help="check every file of an entry against SHA256SUMS")
    args = parser.parse_args(argv)
    sources = [s for s in (args.source, args.from_open_clip, args.from_transformers, args.verify) if s]
    if len(sources) != 1:
        parser.error("give one of: WORK_DIR_OR_CHECKPOINT, --from-open-clip, --from-transformers, --verify")
    if not args.verify and not args.name:
        parser.error("--name is required")
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    from mmvl import zoo
    from mmvl.errors import CheckpointError

    try:
        if args.verify:
            checked = zoo.verify_entry(args.verify)
            print(f"{args.verify}: {len(checked)} files match SHA256SUMS")
            return 0
        source = args.source
        if args.from_open_clip:
            source = zoo.import_open_clip(args.from_open_clip, checkpoint=args.checkpoint, text_model=args.text_model)
        elif args.from_transformers:
            source = zoo.import_hf_text(args.from_transformers, pooling=args.pooling)
        result = zoo.export(source, args.name, out=args.out, parts=args.parts, formats=args.formats,
                            prompts=args.prompts, metrics=args.metrics, license=args.license,
                            description=args.description, index=not args.no_index, overwrite=args.overwrite)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except MMVLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {result.path} ({', '.join(result.formats)})")
    for fmt, why in result.skipped.items():
        print(f"  not exported as {fmt}: {why}")
    for fmt, check in result.checks.items():
        cosines = [v["cosine_min"] for v in check.values() if isinstance(v, dict) and "cosine_min" in v]
        if cosines:
            print(f"  {fmt}: min cosine to mmvl {min(cosines):.6f}")
    total = 0
    for name, size in result.files:
        total += size
        print(f"  {size:>12,}  {name}")
    print(f"  {total:>12,}  total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
