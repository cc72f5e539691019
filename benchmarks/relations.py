"""Do H-scores and H-embeddings capture task relations? Both against transfer measured on the structured tasks, with
the ground truth's own seed-to-seed agreement as the ceiling and a random score as the floor.

Old tasks, trained in order with HyperLoRA: orientation, count, size and position tasks (hyperlora.structured), each
factor in two looks (domains, ``--palette``: separated colours by default, so that no old task's target colour is a
probe's distractor). Probes: a new task per factor in a look of its own, 100 training images per class. Each
estimator reads them as the trainer does: its own sample (``sample_size``), the frozen reference, the related old
tasks and the fitted H-embedding, one per estimator. A probe's relation to an old
task is graded by construction: the two old tasks that ask about its factor share what it needs to read; the others
ask about other factors, some closer to it than others (size and count both read how much of the target there is).
(A first design, orientation tasks graded by hue, gave a flat transfer: any orientation adapter read any hue's
orientation, so its ground truth was noise, with a seed-to-seed Spearman of 0.38.)

- **Ground truth.** For every (probe, old task): the test accuracy of a logistic-regression probe fitted on the
  probe's training images as the old task's adapter sees them (its pooled features), minus the same on the frozen
  backbone's features (from scratch). This is the transfer an H-score predicts (Bao et al. 2019 validate it against
  the same: the source model's features, a retrained classifier), fitted to convergence, so it carries no optimiser
  noise. Accuracy, as in linear evaluation, because a probe's test log-likelihood (recorded too) is mostly its
  overconfidence when it fits 1280-d features. (The first ground truth, 30 AdamW steps of a task embedding
  started at the old task's, agreed with itself across seeds at a Spearman of 0.22 +- 0.40 on an H200: a few points
  of probe accuracy that an optimiser's path decided.)
- **Ceiling.** Every seed redraws the images, retrains the old tasks and remeasures: the Spearman correlation of two
  seeds' ground truths over a probe's old tasks, averaged over probes and pairs of seeds.
- **Scores.** The normalised H-score (each ``h_score_features`` estimator: lda, head, pooled), minus the distance of
  the fitted H-embedding (AHP on the default estimator), and a seeded random score. For each, the Spearman
  correlation with the ground truth per probe, averaged over probes; mean and std over seeds.
- **Generated weights.** The cosine of the generated delta-W (all adapted modules) between old tasks, for pairs that
  ask about the same factor (related, hyperlora.structured.relation_matrix) and pairs that do not (unrelated).

Runs on the GPU when there is one. Seeds can run apart (``--seeds 1 --output_dir ...``) and be combined with
``--merge``.

    python benchmarks/relations.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import tempfile
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from hyperlora.cli import parse
from hyperlora.data import Task, TaskImages, image_spec, pooled_features
from hyperlora.demo import build_backbone
from hyperlora.files import atomic_write_json, atomic_write_text
from hyperlora.method.embedding import guided_embedding, median_pairwise_distance
from hyperlora.method.transferability import H_SCORE_FEATURES, sample_size
from hyperlora.structured import Domain, TaskSpec, relation_matrix, shape_task
from hyperlora.trainer import ContinualTrainer, ContinualTrainingArguments

RELATION_FACTORS = ("orientation", "count", "size", "position")
DOMAINS_PER_FACTOR = 2
PROBE_DOMAIN = 30  # probes' looks: domains 30, 31, ..., none of them an old task's


def old_specs(palette: str = "separated") -> list[tuple[str, str, Domain]]:
    """(name, factor, domain) of every old task, in training order: each factor once, then each again in a new look.
    ``palette`` "separated": no look's distractor colour is another's target colour; "legacy": the first version's
    looks (hyperlora.structured.Domain.of), where some are, so that part of what the benchmark measured was conflict."""
    specs = []
    for k in range(DOMAINS_PER_FACTOR):
        for f, factor in enumerate(RELATION_FACTORS):
            index = 10 + k * len(RELATION_FACTORS) + f
            specs.append((f"{factor}-d{index:02d}", factor, TaskSpec(factor, index, palette).look))
    return specs


def build_tasks(seed: int, args: argparse.Namespace) -> tuple[list[Task], list[Task]]:
    common = {"image_size": 64, "test_per_class": args.test_per_class}
    old = [
        shape_task(
            name, factor, domain, seed=(seed, t), train_per_class=args.old_per_class, first_label=4 * t, **common
        )
        for t, (name, factor, domain) in enumerate(old_specs(args.palette))
    ]
    probes = [
        shape_task(
            f"probe-{factor}",
            factor,
            TaskSpec(factor, PROBE_DOMAIN + p, args.palette).look,
            seed=(seed, 100 + p),
            train_per_class=args.probe_per_class,
            **common,
        )
        for p, factor in enumerate(RELATION_FACTORS)
    ]
    return old, probes


def _loader(task: Task, split: str, spec, shuffle: bool = False, seed: int = 0):
    dataset = TaskImages(getattr(task, split), spec.transform(), task.classes)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(dataset, batch_size=32 if shuffle else 128, shuffle=shuffle, generator=generator)


@torch.no_grad()
def _features(model, loader, task_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = [], []
    for pixel_values, y in loader:
        pixel_values = pixel_values.to(_device(model))
        if task_id is None:
            with model.disable_adapter():
                features.append(pooled_features(model(pixel_values)).float().cpu())
        else:
            features.append(pooled_features(model(pixel_values, task_ids=task_id)).float().cpu())
        labels.append(y)
    return torch.cat(features), torch.cat(labels)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def linear_transfer(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]):
    """(test log-likelihood, test accuracy) of a logistic-regression probe fitted on standardised ``train`` features."""
    (x, y), (x_test, y_test) = ((f.double().numpy(), labels.numpy()) for f, labels in (train, test))
    scaler = StandardScaler().fit(x)
    probe = LogisticRegression(max_iter=5000).fit(scaler.transform(x), y)
    # a probe certain of a wrong class would score -inf: clip at 1e-12 so that the mean stays finite
    log_probs = np.log(np.clip(probe.predict_proba(scaler.transform(x_test)), 1e-12, None))
    columns = np.searchsorted(probe.classes_, y_test)
    return float(log_probs[np.arange(len(y_test)), columns].mean()), float((log_probs.argmax(1) == columns).mean())


def delta_w_cosines(model) -> np.ndarray:
    """Cosine similarity of every pair of tasks' generated weight updates (all adapted modules, concatenated)."""
    tuner = model.base_model
    with torch.no_grad():
        out = tuner.generate(list(range(tuner.num_tasks)))
        delta = torch.cat([torch.bmm(b, a).flatten(1) for a, b in zip(out.A, out.B, strict=True)], dim=1)
    delta = F.normalize(delta.double().cpu(), dim=1)
    return (delta @ delta.T).numpy()


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    old, probes = build_tasks(seed, args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    backbone, config, size = build_backbone("efficientnet")
    with tempfile.TemporaryDirectory(prefix="relations-") as tmp:
        training = ContinualTrainingArguments(
            output_dir=tmp,
            num_train_epochs=args.num_train_epochs,
            learning_rate=args.learning_rate,
            seed=seed,
            image_size=size,
            plots=False,
        )
        trainer = ContinualTrainer(backbone, config, training)
        trainer.fit(old)
    model = trainer.model
    model.requires_grad_(False)
    spec = image_spec(model, size)
    old_embeddings = model.base_model.hypernet.stacked_task_embeddings().detach().cpu().clone()
    specs = [TaskSpec(factor, 10 + t, args.palette) for t, (_, factor, _) in enumerate(old_specs(args.palette))]
    cosines = delta_w_cosines(model)
    related = relation_matrix(specs)
    pairs = [(i, j) for i, j in combinations(range(len(old)), 2)]
    rng = np.random.default_rng(seed)

    heads = trainer.heads.cpu()  # beside the features, which come back on the CPU
    probes_out = []
    for p, probe in enumerate(probes):
        loader = _loader(probe, "train", spec)
        features = {task_id: _features(model, loader, task_id) for task_id in [None, *range(len(old))]}
        labels = features[None][1]

        # every estimator as the trainer runs it: its own sample of the probe's images, the frozen reference, the
        # related old tasks and the fitted H-embedding (hyperlora.method.embedding.guided_embedding)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + p))
        guided = {}
        for kind in H_SCORE_FEATURES:
            rows = order[: sample_size(kind, config.h_score_samples, config.h_score_adapted_samples)]

            def features_of(task_id, first=None, features=features, rows=rows):
                return features[task_id][0][rows[:first]]

            settings = dataclasses.replace(config, h_score_features=kind)
            guided[kind] = guided_embedding(
                old_embeddings.numpy(), features_of, labels[rows], settings, seed=seed + p, heads=heads,
                router=trainer.router,
            )  # fmt: skip
        distances = {
            kind: torch.linalg.vector_norm(old_embeddings - torch.as_tensor(result.embedding), dim=1).tolist()
            for kind, result in guided.items()
        }
        marked = {kind: result.related for kind, result in guided.items() if result.related is not None}
        chosen = guided[config.h_score_features]
        test_loader = _loader(probe, "test", spec)
        scratch_likelihood, scratch_accuracy = linear_transfer(features[None], _features(model, test_loader, None))
        rows = []
        for i, (name, factor, _) in enumerate(old_specs(args.palette)):
            likelihood, accuracy = linear_transfer(features[i], _features(model, test_loader, i))
            rows.append(
                {
                    "old_task": name,
                    "same_factor": factor == RELATION_FACTORS[p],
                    **{f"h_score_{kind}": float(guided[kind].scores[i]) for kind in H_SCORE_FEATURES},
                    **{f"related_{kind}": bool(marked[kind][i]) for kind in marked},
                    **{f"beats_reference_{kind}": float(guided[kind].beats_reference[i]) for kind in marked},
                    **{f"embedding_distance_{kind}": distances[kind][i] for kind in H_SCORE_FEATURES},
                    "embedding_distance": distances[config.h_score_features][i],
                    "random_score": float(rng.random()),
                    "transfer_log_likelihood": likelihood - scratch_likelihood,
                    "transfer_accuracy": accuracy - scratch_accuracy,
                }
            )
            print(
                f"seed {seed} {probe.name} <- {name:22s} "
                + " ".join(f"H[{kind}] {guided[kind].scores[i]:.3f}" for kind in H_SCORE_FEATURES)
                + f"  dist {distances[config.h_score_features][i]:6.2f}"
                + f"  transfer {likelihood - scratch_likelihood:+.3f} nats, "
                f"{100 * (accuracy - scratch_accuracy):+.1f} points",
                flush=True,
            )
        probes_out.append(
            {
                "probe": probe.name,
                "pairs": rows,
                "consistency_ratio": chosen.consistency_ratio,
                "gamma": chosen.gamma,
                "fit_rank_correlation": chosen.rank_correlation,
                "tau": median_pairwise_distance(old_embeddings.numpy()),
                "scratch_log_likelihood": float(scratch_likelihood),
                "scratch_accuracy": float(scratch_accuracy),
            }
        )
    return {
        "seed": seed,
        "device": device,
        "machine": f"{platform.machine()}, torch {torch.__version__}, {device}",
        "h_score_features": config.h_score_features,
        "probes": probes_out,
        "delta_w_cosine": {
            "related": float(np.mean([cosines[i, j] for i, j in pairs if related[i, j]])),
            "unrelated": float(np.mean([cosines[i, j] for i, j in pairs if not related[i, j]])),
            "matrix": cosines.tolist(),
        },
        **correlations(probes_out, config.h_score_features),
    }


GROUND_TRUTH = "transfer_accuracy"
SCORES = {  # report key -> (row key, sign): higher score should mean more transfer
    **{f"spearman_h_score_{kind}": (f"h_score_{kind}", 1.0) for kind in H_SCORE_FEATURES},
    "spearman_distance": ("embedding_distance", -1.0),
    "spearman_random": ("random_score", 1.0),
}


def probe_spearman(probe: dict, name: str) -> float:
    """One score's Spearman correlation with the ground truth over one probe's old tasks."""
    key, sign = SCORES[name]
    rows = probe["pairs"]
    return spearmanr([sign * row[key] for row in rows], [row[GROUND_TRUTH] for row in rows]).statistic


def correlations(probes: list[dict], default: str) -> dict[str, float]:
    """Per score, the Spearman correlation with the ground truth over each probe's old tasks, averaged over probes."""
    out = {name: float(np.mean([probe_spearman(probe, name) for probe in probes])) for name in SCORES}
    out["spearman_h_score"] = out[f"spearman_h_score_{default}"]
    return out


def ceiling(runs: list[dict], probe: int | None = None) -> list[float]:
    """The ground truth's seed-to-seed Spearman, per (pair of seeds, probe); with ``probe``, that probe's only."""
    probes = range(len(runs[0]["probes"])) if probe is None else [probe]

    def truth(run: dict, p: int) -> list[float]:
        return [row[GROUND_TRUTH] for row in run["probes"][p]["pairs"]]

    return [spearmanr(truth(a, p), truth(b, p)).statistic for a, b in combinations(runs, 2) for p in probes]


def top_ranked(runs: list[dict], kind: str) -> dict:
    """For each probe with an old task whose transfer is positive beyond its seed-to-seed noise (mean over seeds above
    twice its standard error), the share of seeds in which ``kind``'s H-score ranks one of those first; over all such
    (probe, seed) pairs, ``share``. For the probes with none, how far the H-embedding starts from the nearest old
    embedding, in units of tau (where the run recorded tau): at least 1 is a fresh start. ``related``: of the
    (probe, seed, old task) triples whose old task transfers, how many the estimator marked related (inherited from),
    and out of how many; None where it judges no relatedness."""
    probes = {}
    hits, related = [], []
    for p, entry in enumerate(runs[0]["probes"]):
        truth = np.array([[row[GROUND_TRUTH] for row in run["probes"][p]["pairs"]] for run in runs])
        error = truth.std(0, ddof=1) / np.sqrt(len(runs))
        positive = (truth.mean(0) > 0) & (truth.mean(0) > 2 * error)
        names = [row["old_task"] for row in entry["pairs"]]
        record = {"positive": [name for name, keep in zip(names, positive, strict=True) if keep]}
        if positive.any():
            tops = [int(np.argmax([row[f"h_score_{kind}"] for row in run["probes"][p]["pairs"]])) for run in runs]
            record["top"] = [names[t] for t in tops]
            hits += [bool(positive[t]) for t in tops]
            related += [
                row.get(f"related_{kind}")
                for run in runs
                for row, keep in zip(run["probes"][p]["pairs"], positive, strict=True)
                if keep
            ]
        else:  # the kind's own H-embedding where the run fitted one per estimator
            own = f"embedding_distance_{kind}"
            distance = own if own in entry["pairs"][0] else "embedding_distance"
            record["nearest_over_tau"] = [
                min(row[distance] for row in run["probes"][p]["pairs"]) / run["probes"][p]["tau"]
                for run in runs
                if "tau" in run["probes"][p]
            ]
        probes[entry["probe"]] = record
    judged = [value for value in related if value is not None]
    return {
        "share": float(np.mean(hits)) if hits else None,
        "pairs": len(hits),
        "related": [sum(judged), len(judged)] if judged else None,
        "probes": probes,
    }


def _stat(values) -> dict[str, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def _top_ranked_lines(ranked: dict | None) -> list[str]:
    if ranked is None:
        return []
    lines = [
        "Does the top-ranked old task transfer? Per probe with an old task whose transfer is positive beyond its "
        "seed-to-seed noise (mean over seeds above twice its standard error), the share of seeds in which the H-score "
        "ranks one of them first (target: 80%); for probes with none, the H-embedding's distance to the nearest old "
        "embedding over tau (target: at least 1). Related: of the (probe, seed, old task) triples whose old task "
        "transfers, how many the new task inherits from (marked related).",
        "",
        "| features | top-ranked transfers | related | probes with positive transfer (old tasks) "
        "| none: nearest / tau |",
        "|---|---|---|---|---|",
    ]
    for kind, result in ranked.items():
        positive = "; ".join(
            f"{name} ({', '.join(record['positive'])})"
            for name, record in result["probes"].items()
            if record["positive"]
        )
        fresh = "; ".join(
            f"{name} ({', '.join(f'{v:.2f}' for v in record['nearest_over_tau']) or 'tau not recorded'})"
            for name, record in result["probes"].items()
            if not record["positive"]
        )
        share = "-" if result["share"] is None else f"{100 * result['share']:.0f}% of {result['pairs']}"
        judged = "-" if result.get("related") is None else "{} of {}".format(*result["related"])
        lines.append(f"| {kind} | {share} | {judged} | {positive or '-'} | {fresh or '-'} |")
    return [*lines, ""]


def write_report(out: Path, runs: list[dict], args: argparse.Namespace, date: str | None = None) -> str:
    """relations.json and .md; ``date``: when the runs were made (today unless merged from earlier reports)."""
    machine = "; ".join(sorted({run.get("machine", run.get("device", "cpu")) for run in runs}))
    summary = {
        "machine": machine,
        "date": date or datetime.date.today().isoformat(),
        "arguments": vars(args),
        "ground_truth_ceiling": _stat(ceiling(runs)) if len(runs) > 1 else {"mean": None, "std": None},
        **{name: _stat([run[name] for run in runs]) for name in [*SCORES, "spearman_h_score"]},
        "delta_w_cosine": {
            kind: _stat([run["delta_w_cosine"][kind] for run in runs]) for kind in ("related", "unrelated")
        },
        "top_ranked": {kind: top_ranked(runs, kind) for kind in H_SCORE_FEATURES} if len(runs) > 1 else None,
        "runs": runs,
    }
    atomic_write_json(out / "relations.json", summary)

    def cell(stat) -> str:
        return "-" if stat["mean"] is None else f"{stat['mean']:.3f} ± {stat['std']:.3f}"

    seeds = [run["seed"] for run in runs]
    defaults = vars(parse_args([]))
    options = "".join(
        f" --{key} {value}"
        for key, value in vars(args).items()
        if key not in ("seeds", "output_dir", "merge") and value != defaults[key]
    )
    rows = [
        ("ground truth, seed to seed (the ceiling)", "ground_truth_ceiling"),
        (f"H-score, default features ({runs[0]['h_score_features']})", "spearman_h_score"),
        *((f"H-score, {kind} features", f"spearman_h_score_{kind}") for kind in H_SCORE_FEATURES),
        ("minus the H-embedding distance", "spearman_distance"),
        ("a random score (the floor)", "spearman_random"),
    ]
    lines = [
        f"# Task relations: Spearman correlation with the measured transfer (mean ± std over seeds {seeds})",
        "",
        f"Machine: {machine}; {summary['date']}. Command: `python benchmarks/relations.py --seeds "
        f"{' '.join(map(str, seeds))}{options}`. Per probe over its {len(old_specs())} old tasks, averaged over the "
        f"{len(RELATION_FACTORS)} probes (one per factor). Transfer: the test accuracy of a logistic probe on "
        "the old task's adapted features, minus on the frozen backbone's.",
        "",
        "| score | Spearman with transfer |",
        "|---|---|",
        *(f"| {title} | {cell(summary[key])} |" for title, key in rows),
        "",
        "Cosine of the generated delta-W between old tasks: "
        f"same factor {cell(summary['delta_w_cosine']['related'])}, "
        f"different factors {cell(summary['delta_w_cosine']['unrelated'])}.",
        "",
        *_top_ranked_lines(summary["top_ranked"]),
        *_per_probe(runs),
    ]
    text = "\n".join(lines)
    atomic_write_text(out / "relations.md", text)
    _plot(out / "relations.png", runs, runs[0]["h_score_features"])
    return text


def _per_probe(runs: list[dict]) -> list[str]:
    """Where the ceiling and the scores hold and where they do not: one row per probe (mean over seeds, or pairs)."""
    columns = [(f"spearman_h_score_{kind}", f"H-score ({kind})") for kind in H_SCORE_FEATURES]
    columns += [("spearman_distance", "minus distance"), ("spearman_random", "random")]
    lines = [
        "Per probe:",
        "",
        "| probe | ceiling | transfer range (points) | " + " | ".join(title for _, title in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for p, probe in enumerate(runs[0]["probes"]):
        transfer = [100 * row[GROUND_TRUTH] for run in runs for row in run["probes"][p]["pairs"]]
        agreement = ceiling(runs, p)
        ceiling_cell = f"{np.mean(agreement):.2f}" if agreement else "-"
        scores = [np.mean([probe_spearman(run["probes"][p], name) for run in runs]) for name, _ in columns]
        lines.append(
            f"| {probe['probe']} | {ceiling_cell} | {min(transfer):+.1f} to {max(transfer):+.1f} | "
            + " | ".join(f"{value:.2f}" for value in scores)
            + " |"
        )
    return [*lines, ""]


def _plot(path: Path, runs: list[dict], default: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], f"h_score_{default}", f"H-score ({default} features)"), (axes[1], "embedding_distance", ""))
    for ax, key, label in panels:
        for p, factor in enumerate(RELATION_FACTORS):
            rows = [row for run in runs for row in run["probes"][p]["pairs"]]
            ax.scatter(
                [row[key] for row in rows],
                [100 * row[GROUND_TRUTH] for row in rows],
                color=f"C{p}",
                label=f"{factor} probe",
                alpha=0.8,
            )
        ax.set_xlabel(label or "distance of the fitted H-embedding to the old task's embedding")
        ax.set_ylabel("transfer: probe accuracy gain over the frozen backbone (points)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Transfer from each old task to each probe, every seed")
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=120)
    plt.close(fig)
    Path(tmp.name).replace(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num_train_epochs", "--epochs", type=int, default=8, help="epochs per old task")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="of the old tasks' training")
    parser.add_argument("--old_per_class", type=int, default=200, help="training images per old task class")
    parser.add_argument("--probe_per_class", type=int, default=100, help="training images per probe class")
    parser.add_argument(
        "--palette", choices=("separated", "legacy"), default="separated", help="the looks' colours (old_specs)"
    )
    parser.add_argument("--test_per_class", type=int, default=100)
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / "results" / "relations"))
    parser.add_argument("--merge", nargs="+", help="only combine these relations.json files (seeds run apart)")
    return parse(parser, argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        sources = [json.loads(Path(source).read_text()) for source in args.merge]
        runs = [run for source in sources for run in source["runs"]]
        args.seeds = [run["seed"] for run in runs]
        date = max(source["date"] for source in sources)  # the latest run's, not the merge's
        print(write_report(out, sorted(runs, key=lambda run: run["seed"]), args, date))
        return
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, args))
        print(write_report(out, runs, args), flush=True)


if __name__ == "__main__":
    main()
