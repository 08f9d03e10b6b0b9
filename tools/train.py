"""Train a model from a config: ``python tools/train.py CONFIG [--work-dir DIR] [--cfg-options k=v ...]``.

SIGTERM or SIGINT (cluster pre-emption, Ctrl-C) ends the current step, writes a checkpoint and exits with
status 0; ``--resume`` continues from it. Exit status 2: a configuration, data or training error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmvl.config import Config
from mmvl.engine.dist import shutdown_distributed
from mmvl.errors import MMVLError
from mmvl.utils import setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="config file, e.g. configs/cxr_clip.py")
    parser.add_argument("--work-dir", help="output directory (default: work_dirs/<config name>)")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config values, e.g. train.max_steps=20 model.image_encoder.depth=2")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in WORK_DIR/checkpoints that verifies, with the "
                             "config it was trained with (a difference is refused with a diff)")
    parser.add_argument("--resume-override", nargs="+", default=[], metavar="KEY=VALUE",
                        help="with --resume: settings allowed to differ from the checkpoint's config, and their new "
                             "values, e.g. train.max_steps=20000 (the LR schedule is rebuilt for the new total)")
    parser.add_argument("--seed", type=int, help="random seed (overrides train.seed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    trainer, finished = None, False
    try:
        cfg = Config.fromfile(args.config)
        cfg.merge_options(args.cfg_options)
        if args.seed is not None:
            cfg.merge_options({"train.seed": args.seed})
        work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
        from mmvl.engine.trainer import Trainer

        trainer = Trainer(cfg, work_dir, resume=args.resume, resume_override=args.resume_override)
        metrics = trainer.fit()
        finished = True
    except MMVLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.train_model = None  # the DDP wrapper goes before the process group (see shutdown_distributed)
        shutdown_distributed(wait=finished)  # after an error the other ranks may never reach a barrier
    if not trainer.dist.is_main:
        return 0
    if trainer.stop_signal is not None:
        print(f"stopped by {trainer.stop_signal} at step {trainer.step} of {trainer.max_steps}; checkpoint "
              f"{trainer.last_checkpoint}; continue with: python tools/train.py {work_dir / 'config.py'} --work-dir "
              f"{work_dir} --resume")
        return 0
    summary = ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())
    print(f"done: {trainer.step} steps; {summary or 'no validation split'}; work dir: {work_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
