"""The transfer protocol: fine-tune one pretrained model and a random-init baseline over modes x label fractions x
seeds, and compare them.

    python tools/transfer.py CONFIG --init-from MODEL --out DIR [--modes linear,lora,full]
        [--fractions 0.01,0.1,1] [--seeds 0,1,2] [--eval-split test] [--cfg-options KEY=VALUE ...]

CONFIG is a fine-tuning config (configs/finetune/, a classification or segmentation head); MODEL a zoo entry (name
or folder) or a pretraining work dir with the config's image encoder. Every (mode, fraction, seed) is a normal
training run (tools/train.py's Trainer) from MODEL (``model.init_from``, ``model.mode``; ``linear`` and ``full``
without LoRA), and every (fraction, seed) once more from random initialisation (``model.init_from=None
model.mode=full model.lora=None``), each in its own work dir under DIR/runs; ``data.label_fraction`` draws the same
nested subset for every mode and seed (``data.label_fraction_seed`` is the config's), ``train.seed`` is the seed; a
fraction that keeps fewer studies than ``train.batch_size`` trains on batches of all of them. A run whose
``transfer_result.json`` exists is not run again (an interrupted one resumes from its checkpoint). Each run's best
checkpoint is scored on ``--eval-split`` of the config's manifest: by macro AUROC (classification), or by mean Dice
over the labels at threshold 0.5 from the split's voxel counts, as validation measures it (segmentation).

Writes DIR/transfer.md (mean and 95% t-interval over seeds; the difference pretrained - random paired by seed,
with its interval), DIR/transfer.json (every run and the summary) and DIR/transfer.png (the metric against the
label fraction, one line per mode and one for random init). Exit code 0; 2 on bad arguments (an unknown mode, a
fraction outside (0, 1]) or a failed run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from mmvl.config import Config
from mmvl.errors import ConfigError, MMVLError
from mmvl.utils import atomic_write_text, setup_logging

MODES = ("linear", "full", "lora", "lora+head")
BASELINE_MODE = "full"
RESULT = "transfer_result.json"
METRIC = "macro_auroc"
SEGMENTATION_METRIC = "mean_dice"


def is_segmentation(cfg: Config) -> bool:
    """Whether the config fine-tunes a segmentation head (scored by mean Dice instead of macro AUROC)."""
    from mmvl.engine.finetune import mask_labels

    return mask_labels(cfg.model) is not None


def parse_list(text: str, what: str, convert: Any) -> list[Any]:
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            values.append(convert(item))
        except ValueError:
            raise ConfigError(f"--{what}: {item!r} is not a valid value") from None
    if not values:
        raise ConfigError(f"--{what}: empty list")
    return list(dict.fromkeys(values))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="fine-tuning config, e.g. configs/finetune/cls_vit_cxr_tiny.py")
    parser.add_argument("--init-from", required=True, help="the pretrained model: zoo entry (name or folder) or work "
                        "dir")
    parser.add_argument("--out", required=True, help="output folder (runs/, transfer.md, .json, .png)")
    parser.add_argument("--modes", default="linear,lora,full", help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--fractions", default="0.01,0.1,1", help="comma list of label fractions in (0, 1]")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of integer seeds")
    parser.add_argument("--eval-split", default="test", help="manifest split each run is scored on (default test)")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides for every run, e.g. train.max_steps=100")
    return parser.parse_args(argv)


def check_protocol(args: argparse.Namespace) -> tuple[list[str], list[float], list[int]]:
    modes = parse_list(args.modes, "modes", str)
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"--modes: unknown mode {mode!r} (choose from {', '.join(MODES)})")
    fractions = parse_list(args.fractions, "fractions", float)
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ConfigError(f"--fractions: {fraction:g} is not a label fraction in (0, 1]")
    return modes, sorted(fractions), parse_list(args.seeds, "seeds", int)


def run_plan(modes: list[str], fractions: list[float], seeds: list[int]) -> list[dict[str, Any]]:
    """Every run: the pretrained model in each mode, then the random-init baseline, per fraction and seed."""
    plan = [{"init": "pretrained", "mode": m, "fraction": f, "seed": s}
            for f in fractions for s in seeds for m in modes]
    plan += [{"init": "random", "mode": BASELINE_MODE, "fraction": f, "seed": s} for f in fractions for s in seeds]
    for run in plan:
        run["name"] = f"{run['init']}_{run['mode'].replace('+', '-')}_f{run['fraction']:g}_s{run['seed']}"
    return plan


def run_config(base: Config, run: dict[str, Any], init_from: str) -> Config:
    cfg = Config(base.to_dict())
    lora = cfg.model.get("lora") if run["mode"].startswith("lora") else None
    if run["mode"].startswith("lora") and not lora:
        raise ConfigError(f"--modes {run['mode']}: the config has no model.lora settings (rank, alpha)")
    cfg.merge_options({"model.init_from": init_from if run["init"] == "pretrained" else None,
                       "model.mode": run["mode"], "model.lora": lora,
                       "data.label_fraction": None if run["fraction"] == 1 else run["fraction"],
                       "train.seed": run["seed"]})
    return cfg


def fit_batch(cfg: Config, work_dir: Path) -> int:
    """``train.batch_size``, or the number of studies a small label fraction keeps when that is fewer (the trainer
    refuses a batch larger than the training split): 1% of a 640-study split is 7 studies."""
    from mmvl.engine.data import label_fraction_studies

    batch_size = int(cfg.train.batch_size)
    if cfg.data.get("label_fraction") is None:
        return batch_size
    return min(batch_size, len(label_fraction_studies(cfg.data, work_dir, is_main=False)))


def segmentation_score(loaded: Any, eval_split: str, manifest: str) -> dict[str, Any]:
    """Mean Dice (threshold 0.5, voxel counts of the whole split) and each label's Dice on ``eval_split``."""
    import numpy as np

    from mmvl.evaluation.segment import split_counts
    from mmvl.models.heads.segmentation import HALF, dice_from_counts, segmentation_head

    _, head = segmentation_head(loaded.model, loaded.source)
    counts, n_eval = split_counts(loaded, eval_split)
    if counts is None:
        raise ConfigError(f"--eval-split {eval_split!r}: no readable rows of that split in {manifest}")
    dice = dice_from_counts(counts)[:, HALF]
    known = dice[~np.isnan(dice)]
    return {"value": float(known.mean()) if len(known) else None, "n_eval": n_eval,
            "per_label_dice": {name: None if np.isnan(v) else float(v) for name, v in zip(head.label_names, dice)}}


def train_and_score(cfg: Config, work_dir: Path, eval_split: str) -> dict[str, Any]:
    """One training run (resumed when its work dir holds a checkpoint), then its best checkpoint's macro AUROC
    (mean Dice for a segmentation head) on ``eval_split``."""
    from mmvl.engine.trainer import Trainer
    from mmvl.evaluation.metrics import classification_metrics, target_matrix
    from mmvl.evaluation.predict import classifier_head, split_scores
    from mmvl.loading import load_pretrained

    resume = any((work_dir / "checkpoints").glob("*.pt")) if (work_dir / "checkpoints").is_dir() else False
    if work_dir.exists() and not resume:
        shutil.rmtree(work_dir)  # a run that died before its first checkpoint starts again
    cfg.merge_options({"train.batch_size": fit_batch(cfg, work_dir)})
    start = time.perf_counter()
    trainer = Trainer(cfg, work_dir, resume=resume)
    validation = trainer.fit()
    seconds = time.perf_counter() - start
    loaded = load_pretrained(work_dir)
    run = {"steps": trainer.step, "batch_size": int(cfg.train.batch_size), "train_s": round(seconds, 1),
           "best_val": trainer.best_value}
    if is_segmentation(cfg):
        return {**segmentation_score(loaded, eval_split, cfg.data.manifest), **run,
                "final_val": {k: v for k, v in validation.items() if k.endswith(SEGMENTATION_METRIC)}}
    _, head = classifier_head(loaded.model, str(work_dir))
    scores, labels = split_scores(loaded, eval_split)
    if scores is None:
        raise ConfigError(f"--eval-split {eval_split!r}: no readable rows of that split in {cfg.data.manifest}")
    result = classification_metrics(scores, target_matrix(labels, head.label_names), head.label_names,
                                    n_bootstrap=0)
    per_label = {name: entry.get("auroc") for name, entry in result["labels"].items()}
    return {"value": result["macro"]["auroc"], "per_label_auroc": per_label, "n_eval": len(scores), **run,
            "final_val": {k: v for k, v in validation.items() if k.endswith(METRIC)}}


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    from tqdm.auto import tqdm

    from mmvl.evaluation import transfer

    out = Path(args.out)
    try:
        modes, fractions, seeds = check_protocol(args)
        base = Config.fromfile(args.config)
        base.merge_options(args.cfg_options)
        plan = run_plan(modes, fractions, seeds)
        runs = []
        bar = tqdm(plan, desc="transfer runs", unit="run")
        for run in bar:
            bar.set_postfix_str(run["name"])
            work_dir = out / "runs" / run["name"]
            done = work_dir / RESULT
            if done.is_file():
                runs.append(json.loads(done.read_text(encoding="utf-8")))
                continue
            record = {**run, "work_dir": str(work_dir),
                      **train_and_score(run_config(base, run, args.init_from), work_dir, args.eval_split)}
            atomic_write_text(done, json.dumps(record, indent=2) + "\n")
            runs.append(record)
        bar.close()
    except MMVLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metric = f"{args.eval_split} {'mean Dice' if is_segmentation(base) else 'macro AUROC'}"
    rows = transfer.summarize(runs, modes, fractions, BASELINE_MODE)
    table = transfer.markdown_table(rows, metric, BASELINE_MODE)
    atomic_write_text(out / "transfer.md", table)
    atomic_write_text(out / "transfer.json", json.dumps({
        "config": args.config, "init_from": args.init_from, "modes": modes, "fractions": fractions, "seeds": seeds,
        "eval_split": args.eval_split, "metric": metric, "baseline": {"mode": BASELINE_MODE, "init_from": None},
        "cfg_options": args.cfg_options, "summary": rows, "runs": runs}, indent=2) + "\n")
    transfer.plot(rows, out / "transfer.png", metric, title=f"{Path(args.config).stem} from {args.init_from}",
                  baseline_mode=BASELINE_MODE)
    print(table)
    print(f"wrote {out / 'transfer.md'}, {out / 'transfer.json'} and {out / 'transfer.png'} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
