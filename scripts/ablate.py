"""Ablation of training tricks: the baseline and each trick (or combination) trained on the same data with the same
budget, several seeds each; writes ablation.csv, ablation.md and ablation.png. The work is in detector.ablation.

    python scripts/ablate.py --data coco128.yaml --weights yolov5n.pt --img 320 --epochs 3 --tricks mixup cutmix
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

DESCRIPTION = """Train the baseline and each trick (or combination) on the same data with the same budget, --seeds
runs each, and compare them: ablation.csv (one row per run), ablation.md (mean ± spread per trick, difference to the
baseline, verdict) and ablation.png (mAP50-95 per trick) in runs/ablate/exp.

Every other flag is a train.py flag and applies to every run (--data, --cfg, --weights, --imgsz, --batch-size,
--workers, --device, --hyp, --config, ...: see python train.py --help).

examples:
  python scripts/ablate.py --list-tricks
  python scripts/ablate.py --data coco128.yaml --weights yolov5n.pt --img 320 --epochs 3        # every trick
  python scripts/ablate.py --tricks mixup cutmix mixup+cutmix --seeds 3 --epochs 30 --data my.yaml
  python scripts/ablate.py --extra relu model.activation="nn.ReLU()" --extra lr2x hyp.lr0=0.02 --time 10
  python scripts/ablate.py --tricks mixup --epochs 30 --data my.yaml --exist-ok --name exp      # continue after a stop
  python scripts/ablate.py --resume runs/ablate/exp                                              # the same
  python scripts/ablate.py --backend ray --trial-resources cpu=4,gpu=1 --epochs 30 --data my.yaml
"""


def build_parser() -> argparse.ArgumentParser:
    """The ablation's own flags; the rest are left for train.py's parser."""
    parser = argparse.ArgumentParser(
        prog="ablate.py",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # train.py's --seed must not pass for an abbreviation of --seeds
    )
    add = parser.add_argument
    add(
        "--tricks",
        nargs="+",
        metavar="TRICK",
        help="tricks to compare with the baseline, by name (--list-tricks); a+b trains a and b together "
        "(default: every registered trick, or only the --extra ones when given)",
    )
    add(
        "--extra",
        nargs="+",
        action="append",
        default=[],
        metavar=("NAME", "KEY=VALUE"),
        help="one more variant, not registered: a NAME and TrainConfig overrides, e.g. --extra lr2x hyp.lr0=0.02 "
        "or --extra relu model.activation='nn.ReLU()' (model.* keys go into a derived model YAML); repeatable "
        "(default: none)",
    )
    add("--seeds", type=int, metavar="N", help="runs per variant, with seeds 0 .. N-1 (default: 2)")
    add("--list-tricks", action="store_true", help="print the registered tricks and their overrides, then exit")
    budget = parser.add_argument_group("budget (the same for every run)")
    budget.add_argument("--epochs", type=int, help="epochs per run (default: train.py's)")
    budget.add_argument(
        "--time",
        type=float,
        metavar="MINUTES",
        help="minutes per run: the trainer fits the epochs to it, --epochs is then a cap (default: 0 = --epochs)",
    )
    where = parser.add_argument_group("where")
    where.add_argument("--project", help="parent folder of ablation folders (default: runs/ablate)")
    where.add_argument("--name", help="ablation folder name: exp, exp2, ... unless --exist-ok (default: exp)")
    where.add_argument(
        "--exist-ok",
        action="store_true",
        dest="exist_ok",
        help="use project/name as it is; if it holds an ablation, continue it, skipping finished runs",
    )
    where.add_argument("--resume", metavar="DIR", help="continue the ablation in DIR, skipping finished runs")
    where.add_argument(
        "--keep-weights",
        action="store_true",
        dest="keep_weights",
        help="save each run's final checkpoint (weights/last.pt, best.pt) (default: runs save no checkpoint)",
    )
    ray = parser.add_argument_group("ray")
    ray.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="local: runs one after another here; ray: several at once as Ray tasks (pip install 'ray[tune]') "
        "(default: local)",
    )
    ray.add_argument(
        "--ray-address",
        default="",
        metavar="ADDRESS",
        help="ray: 'auto' or HOST:PORT of a running cluster (default: start a local Ray instance)",
    )
    ray.add_argument(
        "--trial-resources",
        default="",
        metavar="cpu=N,gpu=N",
        help="ray: resources of each run, e.g. cpu=2,gpu=1 (default: cpu=1, and gpu=1 when Ray has GPUs)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from detector.cli.common import run_cli

    return run_cli(lambda: ablate_from_flags(argv))


def ablate_from_flags(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = build_parser().parse_known_args(argv)
    if args.list_tricks:
        from detector.ablation import trick_table

        print(trick_table())
        return 0
    from detector.ablation import ablate
    from detector.cli.train import build_parser as train_parser
    from detector.errors import ConfigError

    parser = train_parser()
    parser.prog, parser.usage = "ablate.py", "ablate.py [ablation flags] [train.py flags]"  # errors name this script
    namespace, unknown = parser.parse_known_args(rest)
    if unknown:
        raise ConfigError(
            f"unrecognized arguments: {' '.join(unknown)} (see python scripts/ablate.py --help and python train.py "
            "--help)"
        )
    train_flags = vars(namespace)  # train.py's flags, only those given
    for name in ("epochs", "time", "project", "name"):
        if getattr(args, name) is not None:
            train_flags[name] = getattr(args, name)
    if args.exist_ok:
        train_flags["exist_ok"] = True
    ablate(
        tricks=args.tricks,
        extra=args.extra,
        seeds=args.seeds,
        resume=args.resume or "",
        backend=args.backend,
        ray_address=args.ray_address,
        trial_resources=args.trial_resources,
        keep_weights=args.keep_weights,
        command=shlex.join(["python", "scripts/ablate.py", *argv]),
        **train_flags,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
