"""How many images does an estimator that reads the old tasks' models need? Its scores on subsamples of a new task's
training images against its scores on all of them.

Per sequence (hyperlora.structured, later tasks with ``--later_train_per_class`` images per class): HyperLoRA
trains the first ``--old_tasks`` tasks; on the next task's training images each old task is scored
(``--h_score_features``, with the frozen reference and ``h_score_resamples`` bootstrap resamples) on all of them and
on ``--draws`` random subsamples of each ``--sizes``. Per size: how often the subsample's top-ranked old task is the
full sample's, how often the full sample's is among the subsample's best ``h_score_finalists`` (what the screen
keeps: ``screen_old_tasks``), the Spearman correlation of the two rankings, and how often an old task's relatedness
(beats the frozen backbone beyond the noise: ``related_old_tasks``) is the same. The subsample size is what the
estimator's cost grows with, times the old tasks (``HyperLoraConfig.h_score_adapted_samples``,
``h_score_screen_samples``).

    python benchmarks/h_score_samples.py
    python benchmarks/h_score_samples.py --old_tasks 19 --sizes 32 \
        --output_dir benchmarks/results/h_score_samples/screen
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import tempfile
from pathlib import Path

import numpy as np
import torch
from accuracy import this_machine
from scipy.stats import spearmanr

from hyperlora import HyperLoraConfig
from hyperlora.cli import parse
from hyperlora.demo import DEFAULTS, build_backbone
from hyperlora.files import atomic_write_json, atomic_write_text
from hyperlora.method.transferability import (
    H_SCORE_FEATURES,
    frozen_reference,
    old_task_features,
    related_old_tasks,
    transferability,
)
from hyperlora.structured import SEQUENCES, structured_tasks
from hyperlora.trainer import ContinualTrainer, ContinualTrainingArguments


def measure(kind: str, args: argparse.Namespace) -> dict:
    tasks = structured_tasks(
        args.old_tasks + 1,
        seed=args.seed,
        train_per_class=args.train_per_class,
        later_train_per_class=args.later_train_per_class,
        kind=kind,
    )
    torch.manual_seed(args.seed)
    backbone, config, size = build_backbone("efficientnet")
    config = dataclasses.replace(config, h_score_features=args.h_score_features)
    with tempfile.TemporaryDirectory(prefix="h-score-samples-") as tmp:
        training = ContinualTrainingArguments(
            output_dir=tmp,
            num_train_epochs=DEFAULTS["num_train_epochs"],
            learning_rate=DEFAULTS["learning_rate"],
            seed=args.seed,
            image_size=size,
            plots=False,
        )
        trainer = ContinualTrainer(backbone, config, training)
        trainer.fit(tasks[: args.old_tasks])
    loader = trainer.reader.loader(tasks[args.old_tasks], "train", shard=False)
    frozen, labels = trainer.reader.features(loader, None, exact=True)
    adapted = {i: trainer.reader.features(loader, i, exact=True)[0] for i in range(args.old_tasks)}
    old = old_task_features(
        config.h_score_features, args.old_tasks, lambda i: frozen if i is None else adapted[i], heads=trainer.heads,
        router=trainer.router,
    )  # fmt: skip
    reference = frozen_reference(config.h_score_features, args.old_tasks, frozen, trainer.heads)

    def score(rows: np.ndarray, seed: int):
        return transferability(
            [f[rows] for f in old], labels[rows], resamples=config.h_score_resamples, seed=seed,
            reference=None if reference is None else [f[rows] for f in reference],
        )  # fmt: skip

    def related(result) -> np.ndarray | None:
        if result.beats_reference is None:
            return None
        return related_old_tasks(result.beats_reference, config.relatedness_confidence)

    full = score(np.arange(len(labels)), args.seed)
    full_related = related(full)
    rng = np.random.default_rng(args.seed)
    sizes = {}
    for n in args.sizes:
        top, kept, rho, same = [], [], [], []
        for draw in range(args.draws):
            sub = score(rng.choice(len(labels), n, replace=False), draw)
            top.append(np.argmax(sub.scores) == np.argmax(full.scores))
            kept.append(np.argmax(full.scores) in np.argsort(-sub.scores, kind="stable")[: config.h_score_finalists])
            rho.append(spearmanr(sub.scores, full.scores).statistic)
            if full_related is not None:
                same.append(np.mean(related(sub) == full_related))
        sizes[str(n)] = {
            "top_agrees": float(np.mean(top)),
            "top_among_finalists": float(np.mean(kept)),
            "spearman": float(np.nanmean(rho)),
            "related_agrees": float(np.mean(same)) if same else None,
        }
        print(kind, n, sizes[str(n)], flush=True)
    return {
        "images": len(labels),
        "scores": full.scores.tolist(),
        "related": None if full_related is None else full_related.tolist(),
        "sizes": sizes,
    }


def write_report(out: Path, result: dict, args: argparse.Namespace) -> str:
    atomic_write_json(out / "h_score_samples.json", result)
    lines = [
        "# How many images the H-score needs",
        "",
        f"Machine: {result['machine']}; {result['date']}. Command: `python benchmarks/h_score_samples.py "
        f"--h_score_features {args.h_score_features} --old_tasks {args.old_tasks} --sizes "
        f"{' '.join(map(str, args.sizes))} --draws {args.draws}`. Task {args.old_tasks + 1} of each sequence "
        f"({args.later_train_per_class} training images per class), its {args.old_tasks} old tasks trained by "
        f"HyperLoRA (seed {args.seed}); the {args.h_score_features} H-score on subsamples against the same on all the "
        f"task's training images, over {args.draws} draws. Among the best {result['finalists']}: how often the "
        f"subsample's {result['finalists']} best old tasks (those a screen of that size keeps, `h_score_finalists`) "
        "include the one all images rank first.",
        "",
        "| sequence | images | subsample | top-ranked old task agrees | among the best "
        f"{result['finalists']} | Spearman with all images | relatedness agrees |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, entry in result["sequences"].items():
        for n, row in entry["sizes"].items():
            related = "-" if row["related_agrees"] is None else f"{100 * row['related_agrees']:.0f}%"
            among = f"{100 * row['top_among_finalists']:.0f}%" if args.old_tasks > result["finalists"] else "- (all)"
            lines.append(
                f"| {kind} | {entry['images']} | {n} | {100 * row['top_agrees']:.0f}% | {among} | "
                f"{row['spearman']:.2f} | {related} |"
            )
    text = "\n".join([*lines, ""])
    atomic_write_text(out / "h_score_samples.md", text)
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", nargs="+", choices=SEQUENCES, default=["split", "domain", "mixed"])
    parser.add_argument("--h_score_features", choices=H_SCORE_FEATURES, default="head")
    parser.add_argument("--old_tasks", type=int, default=4, help="tasks trained before the one scored")
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--draws", type=int, default=30)
    parser.add_argument("--train_per_class", type=int, default=200, help="the first task's training images per class")
    parser.add_argument("--later_train_per_class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / "results" / "h_score_samples"))
    return parse(parser, argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": this_machine(),
        "date": datetime.date.today().isoformat(),
        "arguments": vars(args),
        "finalists": HyperLoraConfig().h_score_finalists,
        "sequences": {kind: measure(kind, args) for kind in args.sequences},
    }
    print(write_report(out, result, args))


if __name__ == "__main__":
    main()
