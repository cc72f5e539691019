"""The embedded default: HyperLoRA on a five-task continual sequence that fine-tuning can improve on, offline, in a
few minutes on a laptop CPU.

Tasks: hyperlora.structured's shape tasks (orientation, count, size, then orientation and count again in new looks:
each task asks about one factor of a target object among distractors, in a domain of its own), on which fine-tuning
beats a linear probe of the frozen features by a wide margin. ``--real_tasks`` appends real MNIST and sklearn digits
tasks. Backbone: EfficientNet-Lite0 with its ImageNet weights (hyperlora.demo); ``--backbone vit`` runs a small
random-init timm ViT. The summary prints HyperLoRA next to the frozen-feature linear probe and LDA of the same run.

    python recipes/quickstart.py --output_dir outputs/quickstart
"""

from __future__ import annotations

from dataclasses import replace

import torch

from hyperlora import cli
from hyperlora.demo import DEFAULTS, QuickstartArguments, build_backbone, real_tasks
from hyperlora.structured import structured_tasks
from hyperlora.trainer import ContinualTrainer, ContinualTrainingArguments


def parse_args(argv: list[str] | None = None) -> tuple[QuickstartArguments, ContinualTrainingArguments]:
    """Every field of QuickstartArguments and ContinualTrainingArguments is a flag and a ``--config`` key."""
    from transformers import HfArgumentParser

    types = (QuickstartArguments, ContinualTrainingArguments)
    return cli.to_dataclasses(
        cli.parse(HfArgumentParser(types, description=__doc__), argv, DEFAULTS, cli.TRAINING_ALIASES), types
    )


def main(argv: list[str] | None = None) -> dict:
    quickstart, args = parse_args(argv)
    torch.manual_seed(args.seed)
    backbone, config, image_size = build_backbone(quickstart.backbone)
    args = replace(args, image_size=args.image_size or image_size)
    tasks = structured_tasks(
        quickstart.num_tasks,
        seed=args.seed,
        train_per_class=quickstart.train_per_class,
        test_per_class=quickstart.test_per_class,
        kind="conflict",  # the sequence of the README's results
    )
    if quickstart.real_tasks:
        tasks += real_tasks(args.seed)
    return ContinualTrainer(backbone, config, args).fit(tasks)


if __name__ == "__main__":
    main()
