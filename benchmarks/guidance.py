"""Do the task relations pay? HyperLoRA against the ablations of its relation machinery and one PEFT LoRA per task,
on structured sequences whose relations are known and whose plain-LoRA transfer is measured first.

Per sequence (``split``, ``domain``, ``mixed``; hyperlora.structured) at 5 tasks, later tasks with few images
(``--later_train_per_class``), per method (``hyperlora``, ``no_guidance``, ``random_init``, ``minmax``,
``lora_per_task``; accuracy.py's): the final average accuracy (task-incremental, %) and the steps a later task takes
to reach 95% of its final accuracy (learning curves at ``--eval_curve_points`` points per task), mean and std over
seeds, beside the sequence's forward transfer with plain LoRA (transfer.py, on validation images). Then the targets:
on split and domain, the full method beats each ablation by a point of FAA or takes 20% fewer steps, and is at
least per-task LoRA; on mixed, no ablation beats it by more than 0.3. Differences are paired by seed; one within
twice its standard error is written as a tie.

Runs accuracy.py (and transfer.py, where its result is missing) per sequence into ``--output_dir``/<sequence>-5,
then writes guidance.json and guidance.md there. ``--report_only`` only reads what is there (runs made apart, e.g.
``accuracy.py --sequence split --num_tasks 5 --later_train_per_class 50 --eval_curve_points 10 --output_dir
benchmarks/results/guidance/split-5 --append``).

    python benchmarks/guidance.py --seeds 0 1 2
    python benchmarks/guidance.py --sequences --scaling 10 20 --seeds 0 1  # split at 10 and 20 tasks, 2 seeds
    python benchmarks/guidance.py --report_only
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import pairwise
from pathlib import Path

import accuracy
import numpy as np
import transfer

from hyperlora.cli import parse
from hyperlora.files import atomic_write_json, atomic_write_text

SEQUENCES = ("split", "domain", "mixed")
METHODS = ("hyperlora", "no_guidance", "random_init", "minmax", "lora_per_task")
ABLATIONS = ("no_guidance", "random_init", "minmax")
NUM_TASKS = 5
FACTORS = ("orientation", "count", "size")  # mixed asks them in turn, domain the first
FAA_MARGIN, STEPS_SHARE, MIXED_SLACK = 1.0, 0.8, 0.3  # points, fraction of the ablation's steps, points


def transfer_path(out: Path, kind: str) -> Path:
    asked = {"domain": FACTORS[0], "split": "glyph"}.get(kind, "-".join(FACTORS))
    return out / f"transfer-{kind}-{asked}-{NUM_TASKS}.json"


def run(args: argparse.Namespace, out: Path) -> None:
    for num_tasks in args.scaling:  # the split sequence's longer lengths: HyperLoRA against one LoRA per task
        accuracy.main(
            ["--sequence", "split", "--num_tasks", str(num_tasks), "--later_train_per_class",
             str(args.later_train_per_class), "--methods", "hyperlora", "lora_per_task",
             "--seeds", *map(str, args.seeds[:2]), "--output_dir", str(out / f"split-{num_tasks}"), "--append"]
        )  # fmt: skip
    for kind in args.sequences:
        later = str(args.later_train_per_class)
        accuracy.main(
            ["--sequence", kind, "--num_tasks", str(NUM_TASKS), "--later_train_per_class", later,
             "--eval_curve_points", str(args.eval_curve_points), "--methods", *args.methods,
             "--seeds", *map(str, args.seeds), "--output_dir", str(out / f"{kind}-{NUM_TASKS}"), "--append"]
        )  # fmt: skip
        if not transfer_path(out, kind).exists():
            transfer.main(
                ["--sequence", kind, "--num_tasks", str(NUM_TASKS), "--factors", *FACTORS,
                 "--later_train_per_class", later, "--seeds", *map(str, args.seeds),
                 "--output_dir", str(out)]
            )  # fmt: skip


def _stats(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def _paired(full: dict[int, float], other: dict[int, float]) -> dict | None:
    """full minus other over the seeds both have: mean, std, and whether it is within noise (|mean| <= 2 SE)."""
    seeds = sorted(set(full) & set(other))
    if not seeds:
        return None
    diff = np.array([full[s] - other[s] for s in seeds])
    std = float(np.std(diff, ddof=1)) if len(diff) > 1 else float("nan")
    tie = bool(len(diff) < 2 or abs(diff.mean()) <= 2 * std / np.sqrt(len(diff)))
    return {"mean": float(diff.mean()), "std": std, "seeds": len(seeds), "tie": tie}


def summarise(report: dict) -> dict:
    """Per method: FAA (%) and steps to 95% (steps), mean and std over seeds, and the per-seed values."""
    methods = {}
    for method in METHODS:
        results = report["runs"].get(method, [])
        if not results:
            continue
        faa = {r["seed"]: 100 * r["faa"] for r in results}
        steps = {r["seed"]: r["steps_to_95"] for r in results if r.get("steps_to_95") is not None}
        methods[method] = {
            "faa": _stats(list(faa.values())),
            "steps_to_95": _stats(list(steps.values())) if steps else None,
            "seeds": sorted(faa),
            "per_seed": {"faa": faa, "steps_to_95": steps},
        }
    return methods


def frozen(report: dict) -> dict | None:
    """The floor on the same images and features: the trainer's own frozen-feature baselines, from HyperLoRA's runs
    (a logistic probe per task, task-incremental; LDA over all seen classes, class-incremental), in %."""
    runs = [r["frozen_baselines"] for r in report["runs"].get("hyperlora", []) if "frozen_baselines" in r]
    if not runs:
        return None
    return {
        "frozen_probe": {"faa": _stats([100 * r["linear_probe"] for r in runs])},
        "frozen_lda_class_il": {"faa": _stats([100 * r["lda"] for r in runs])},
    }


def guidance_log(report: dict, method: str = "hyperlora") -> dict | None:
    """Does the guidance act? From the runs' metrics ``guidance`` (per task [step, L_emb, norm of beta_emb times its
    gradient on the hypernetwork], at step 1 and every tenth of the task): the median over tasks and seeds at the
    first step, at a tenth of the task and at its end."""
    logs = [task for r in report["runs"].get(method, []) for task in r.get("guidance", []) if len(task) >= 3]
    if not logs:
        return None
    points = {"first step": 0, "a tenth": 1, "end": -1}
    return {
        name: {
            "loss": float(np.median([task[i][1] for task in logs])),
            "grad": float(np.median([task[i][2] for task in logs])),
        }
        for name, i in points.items()
    } | {"tasks": len(logs)}


def criteria(kind: str, methods: dict) -> dict:
    """The targets of one sequence, each with the measured numbers it was judged on."""
    full = methods.get("hyperlora")
    if full is None:
        return {}
    checks = {}
    if kind == "mixed":
        for ablation in ("no_guidance", "random_init"):
            if ablation in methods:
                gap = _paired(full["per_seed"]["faa"], methods[ablation]["per_seed"]["faa"])
                checks[f"faa >= {ablation} - {MIXED_SLACK}"] = {"met": gap["mean"] >= -MIXED_SLACK, "faa_gap": gap}
        return checks
    for ablation in ABLATIONS:
        if ablation not in methods:
            continue
        gap = _paired(full["per_seed"]["faa"], methods[ablation]["per_seed"]["faa"])
        steps_full, steps_other = full["steps_to_95"], methods[ablation]["steps_to_95"]
        ratio = steps_full["mean"] / steps_other["mean"] if steps_full and steps_other else None
        met = gap["mean"] >= FAA_MARGIN or (ratio is not None and ratio <= STEPS_SHARE)
        checks[f"faa >= {ablation} + {FAA_MARGIN} or steps <= {STEPS_SHARE} x"] = {
            "met": bool(met),
            "faa_gap": gap,
            "steps_ratio": ratio,
        }
    if "lora_per_task" in methods:
        gap = _paired(full["per_seed"]["faa"], methods["lora_per_task"]["per_seed"]["faa"])
        checks["faa >= lora_per_task"] = {"met": gap["mean"] >= 0, "faa_gap": gap}
    return checks


SCALING_TASKS = (5, 10, 20)


def scaling(out: Path) -> dict | None:
    """The split sequence at 5, 10 and 20 tasks (``--scaling``, or accuracy.py runs into split-<N>): HyperLoRA minus
    one LoRA per task, paired by seed, and whether it grows with the number of tasks."""
    rows = {}
    for num_tasks in SCALING_TASKS:
        path = out / f"split-{num_tasks}" / "accuracy.json"
        if not path.exists():
            continue
        runs = json.loads(path.read_text())["runs"]
        faa = {m: {r["seed"]: 100 * r["faa"] for r in runs.get(m, [])} for m in ("hyperlora", "lora_per_task")}
        if (gap := _paired(faa["hyperlora"], faa["lora_per_task"])) is not None:
            rows[str(num_tasks)] = {m: _stats(list(v.values())) for m, v in faa.items()} | {"difference": gap}
    if len(rows) < 2:
        return None if not rows else {"tasks": rows, "grows": None}
    gaps = [rows[n]["difference"] for n in rows]
    grows = all(b["mean"] > a["mean"] for a, b in pairwise(gaps))

    def error(gap: dict) -> float:
        return gap["std"] / np.sqrt(gap["seeds"]) if gap["seeds"] > 1 else float("inf")

    # beyond noise: a step up exceeds twice the standard error of the difference of the two lengths' gaps
    def beyond(a: dict, b: dict) -> bool:
        return b["mean"] - a["mean"] > 2 * np.hypot(error(a), error(b))

    clear = all(beyond(a, b) for a, b in pairwise(gaps))
    first_to_last = {"difference": gaps[-1]["mean"] - gaps[0]["mean"], "beyond_noise": bool(beyond(gaps[0], gaps[-1]))}
    return {"tasks": rows, "grows": bool(grows), "beyond_noise": bool(grows and clear), "first_to_last": first_to_last}


def write_report(out: Path, command: str) -> dict:
    result, machines, version = {}, [], None
    for kind in SEQUENCES:
        path = out / f"{kind}-{NUM_TASKS}" / "accuracy.json"
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        machines += [m for m in report["machine"].split("; ") if m not in machines]
        methods = summarise(report)
        entry = {method: {k: v[k] for k in ("faa", "steps_to_95", "seeds")} for method, v in methods.items()}
        moved = transfer_path(out, kind)
        entry["forward_transfer_lora"] = (
            json.loads(moved.read_text())["forward_transfer_lora"] if moved.exists() else None
        )
        entry["frozen"] = frozen(report)
        entry["guidance_log"] = {m: guidance_log(report, m) for m in ("hyperlora", "random_init")}
        entry["criteria"] = criteria(kind, methods)
        entry["budget"] = report["budget"]
        result[kind] = entry
        version = version or report.get("version")
    result["split_scaling"] = scaling(out)
    result["machine"] = "; ".join(machines)
    result["command"] = command
    atomic_write_json(out / "guidance.json", result)
    atomic_write_text(out / "guidance.md", markdown(result))
    return result


def _cell(stats: dict | None, digits: int) -> str:
    return "-" if stats is None else f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown(result: dict) -> str:
    lines = [
        f"# Do the task relations pay? ({NUM_TASKS} tasks per sequence)",
        "",
        f"Command: `{result['command']}`. Machine: {result['machine']}. FAA: task-incremental final average accuracy "
        "on the test images, %; steps to 95%: the training step at which a later task first reaches 95% of its final "
        "accuracy (learning-curve resolution: a tenth of the task), mean over tasks 2..; mean ± std over seeds. "
        "Forward transfer: plain PEFT LoRA started from a related old task's adapter minus from scratch, on validation "
        "images (transfer.py).",
        "",
    ]
    for kind in SEQUENCES:
        if kind not in result:
            continue
        entry = result[kind]
        moved = entry["forward_transfer_lora"]
        lines += [
            f"## {kind}",
            "",
            f"Forward transfer of plain LoRA: {_cell(moved, 2)} points."
            if moved
            else "Forward transfer: not measured.",
            "",
            "| method | seeds | FAA | steps to 95% |",
            "|---|---|---|---|",
        ]
        for method in METHODS:
            if method in entry:
                row = entry[method]
                lines.append(
                    f"| {method} | {len(row['seeds'])} | {_cell(row['faa'], 2)} | {_cell(row['steps_to_95'], 1)} |"
                )
        for name, row in (entry.get("frozen") or {}).items():
            title = {"frozen_probe": "frozen features: logistic probe per task", "frozen_lda_class_il":
                     "frozen features: LDA over all seen classes (class-IL)"}[name]  # fmt: skip
            lines.append(f"| {title} | {len(entry['hyperlora']['seeds'])} | {_cell(row['faa'], 2)} | - |")
        for method, log in (entry.get("guidance_log") or {}).items():
            if log:
                where = "; ".join(
                    f"{name} {log[name]['loss']:.4f} / {log[name]['grad']:.4f}" for name in log if name != "tasks"
                )
                title = f"Guidance in {method} (L_emb / its weighted gradient norm, median of {log['tasks']} tasks)"
                lines += ["", f"{title}: {where}."]
        lines += [
            "",
            "| target | met | full minus other, FAA points (paired) | steps, full / other |",
            "|---|---|---|---|",
        ]
        for name, check in entry["criteria"].items():
            gap = check["faa_gap"]
            diff = f"{gap['mean']:+.2f} ± {gap['std']:.2f}" + (" (tie)" if gap["tie"] else "")
            ratio = check.get("steps_ratio")
            lines.append(
                f"| {name} | {'yes' if check['met'] else 'NO'} | {diff} | {'-' if ratio is None else f'{ratio:.2f}'} |"
            )
        lines.append("")
    grown = result.get("split_scaling")
    if grown:
        lines += [
            "## split: does HyperLoRA's lead over one LoRA per task grow with the number of tasks?",
            "",
            "| tasks | seeds | HyperLoRA | LoRA per task | difference (paired) |",
            "|---|---|---|---|---|",
        ]
        for num_tasks, row in grown["tasks"].items():
            gap = row["difference"]
            lines.append(
                f"| {num_tasks} | {gap['seeds']} | {_cell(row['hyperlora'], 2)} | {_cell(row['lora_per_task'], 2)} "
                f"| {gap['mean']:+.2f} ± {gap['std']:.2f} |"
            )
        verdict = {True: "it grows", False: "it does not grow", None: "one length only"}[grown["grows"]]
        if grown["grows"]:
            verdict += " beyond the seeds' noise" if grown.get("beyond_noise") else ", within the seeds' noise (a tie)"
        ends = grown.get("first_to_last")
        if ends:
            lengths = list(grown["tasks"])
            noise = "beyond the seeds' noise" if ends["beyond_noise"] else "within the seeds' noise"
            change = f"{ends['difference']:+.2f} points, {noise}"
            verdict += f"; from {lengths[0]} to {lengths[-1]} tasks it changes by {change}"
        lines += ["", f"The difference against the number of tasks, step by step: {verdict}.", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", nargs="*", choices=SEQUENCES, default=list(SEQUENCES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--later_train_per_class", type=int, default=50, help="each later task's training images")
    parser.add_argument("--eval_curve_points", type=int, default=10, help="test evaluations per task: steps to 95%%")
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / "results" / "guidance"))
    parser.add_argument(
        "--scaling", nargs="*", type=int, default=[], help="also run split at these lengths (10 20), first 2 seeds"
    )
    parser.add_argument("--report_only", action="store_true", help="only aggregate the runs already there")
    return parse(parser, argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run(args, out)
    result = write_report(out, " ".join(["python benchmarks/guidance.py", *argv]))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
