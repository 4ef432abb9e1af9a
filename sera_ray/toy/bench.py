"""`sera-ray bench quality`: SeRA and its parts against their DAA on the toy world.

The grid: seeds x label noise (0, 0.2, 0.4) x {DPO, selection only, bootstrapping only,
SeRA-DPO, SeRA-DPO with reference-sampled candidates}; at noise 0.2 also the spurious feature
off, the iteration ensemble (lambda > 0), and IPO and SLiC with and without SeRA. Each world
(seed, noise, spurious) is built once and its methods run on one set of actors. Finished
cells are kept in `<out>/cells/`, so an interrupted grid resumes where it stopped.
Evaluation prompts are held out from training, selection and bootstrapping.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sera_ray.toy.demo import run_methods
from sera_ray.toy.world import ToyWorldConfig, build_world

logger = logging.getLogger(__name__)

OFF = ["selection.enabled=false", "bootstrap.enabled=false"]
METHODS: dict[str, list[str]] = {
    "dpo": OFF,
    "selection_only": ["bootstrap.enabled=false"],
    "bootstrap_only": ["selection.enabled=false"],
    "sera": [],
    "sera_ref": ["bootstrap.candidates=reference"],
    "sera_lambda": ["sera.ensemble_lambda=0.5"],
    "ipo": ["trainer.loss=ipo", *OFF],
    "sera_ipo": ["trainer.loss=ipo"],
    "slic": ["trainer.loss=slic", *OFF],
    "sera_slic": ["trainer.loss=slic"],
}
# Each method's DAA baseline: where a method loses to it, the report says so.
BASELINE = {
    "selection_only": "dpo",
    "bootstrap_only": "dpo",
    "sera": "dpo",
    "sera_ref": "dpo",
    "sera_lambda": "dpo",
    "sera_ipo": "ipo",
    "sera_slic": "slic",
}
CORE = ["dpo", "selection_only", "bootstrap_only", "sera", "sera_ref"]
METRICS = [
    "gold_reward",
    "win_rate_vs_sft",
    "spurious_rate",
    "noisy_dropped_fraction",
    "spurious_dropped_fraction",
    "clean_dropped_fraction",
    "bootstrap_gold_accuracy",
]


def grid(seeds: int, small: bool) -> list[dict[str, Any]]:
    """One entry per world: its settings and the methods to run on it."""
    worlds = []
    for seed in range(seeds):
        for noise in (0.0, 0.2, 0.4):
            methods = list(CORE)
            if noise == 0.2:
                methods += ["sera_lambda", "ipo", "sera_ipo", "slic", "sera_slic"]
            worlds.append(
                {"seed": seed, "label_noise": noise, "spurious": True, "methods": methods}
            )
        worlds.append(
            {"seed": seed, "label_noise": 0.2, "spurious": False, "methods": ["dpo", "sera"]}
        )
    if small:
        worlds = [w | {"methods": ["dpo", "sera"]} for w in worlds if w["label_noise"] == 0.2]
    return worlds


def condition(world: dict[str, Any]) -> str:
    spurious = "spurious" if world["spurious"] else "no_spurious"
    return f"noise={world['label_noise']:.1f},{spurious}"


def cell_name(world: dict[str, Any], method: str) -> str:
    return f"seed{world['seed']}_{condition(world).replace(',', '_')}_{method}"


def run_quality_bench(
    out: str | Path = "runs/bench", seeds: int = 3, small: bool = False, resume: bool = True
) -> dict[str, Any]:
    """Run (or resume) the grid; write bench.json and bench.png; return the summary."""
    out = Path(out)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    worlds = grid(seeds, small)
    todo = sum(len(w["methods"]) for w in worlds)
    start = time.perf_counter()

    with tqdm(total=todo, desc="bench quality", unit="cell") as bar:
        for world in worlds:
            names = {m: cell_name(world, m) for m in world["methods"]}
            missing = [
                m for m, n in names.items() if not (resume and (cells_dir / f"{n}.json").exists())
            ]
            bar.update(len(names) - len(missing))
            if not missing:
                continue
            factory = ToyWorldConfig.small if small else ToyWorldConfig
            settings = {"seed": world["seed"], "label_noise": world["label_noise"]}
            if not world["spurious"]:
                settings["spurious_rate"] = 0.0
            config = factory(**settings)
            world_dir = out / "worlds" / f"seed{world['seed']}_{condition(world).replace(',', '_')}"
            built = build_world(config, world_dir / "world")
            report = run_methods(built, world_dir, {m: METHODS[m] for m in missing}, [])
            for method in missing:
                cell = {
                    "seed": world["seed"],
                    "condition": condition(world),
                    "method": method,
                    "sft": report["methods"]["sft"],
                    "result": report["methods"][method],
                    "iterations": report["iterations_by_method"][method],
                    "weight_sync_verified": report["weight_sync_verified"],
                }
                (cells_dir / f"{names[method]}.json").write_text(json.dumps(cell, default=float))
                bar.update(1)

    summary = summarise([json.loads(p.read_text()) for p in sorted(cells_dir.glob("*.json"))])
    summary["seconds_this_session"] = round(time.perf_counter() - start, 1)
    summary["command"] = f"sera-ray bench quality --seeds {seeds}" + (" --small" if small else "")
    (out / "bench.json").write_text(json.dumps(summary, indent=2, default=float))
    plot_bench(summary, out / "bench.png")
    (out / "bench.md").write_text(format_bench(summary))
    return summary


def _cell_metrics(cell: dict[str, Any]) -> dict[str, float | None]:
    result = cell["result"]
    selected = [e for e in cell["iterations"] if e["iteration"] > 1]
    values: dict[str, float | None] = {
        "gold_reward": result["gold_reward"],
        "win_rate_vs_sft": result["win_rate_vs_sft"],
        "spurious_rate": result["spurious_rate"],
    }
    for key in METRICS[3:]:
        seen = [e[key] for e in selected if e.get(key) is not None]
        values[key] = sum(seen) / len(seen) if seen else None
    return values


def summarise(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of each metric, per condition and method."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    sft: dict[str, list[float]] = {}
    for cell in cells:
        groups.setdefault((cell["condition"], cell["method"]), []).append(cell)
        sft.setdefault(cell["condition"], []).append(cell["sft"]["gold_reward"])
    rows = []
    for (cond, method), members in sorted(groups.items()):
        row: dict[str, Any] = {"condition": cond, "method": method, "seeds": len(members)}
        for key in METRICS:
            values = [v for v in (_cell_metrics(c)[key] for c in members) if v is not None]
            row[key] = statistics.fmean(values) if values else None
            if not values:
                row[f"{key}_std"] = None
            else:
                row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    by_key = {(r["condition"], r["method"]): r for r in rows}
    verdicts = []
    for (cond, method), row in by_key.items():
        base = by_key.get((cond, BASELINE.get(method, "")))
        if base is None:
            continue
        diff = row["gold_reward"] - base["gold_reward"]
        word = "beats" if diff > 0 else "loses to"
        verdicts.append(
            f"{cond}: {method} {word} {base['method']} by {abs(diff):.3f} gold reward "
            f"({row['gold_reward']:.3f} vs {base['gold_reward']:.3f}, {row['seeds']} seed(s))"
        )
    return {
        "rows": rows,
        "sft_gold_reward": {c: statistics.fmean(v) for c, v in sft.items()},
        "verdicts": verdicts,
        "all_syncs_verified": all(c["weight_sync_verified"] for c in cells),
        "cells": len(cells),
    }


def format_bench(summary: dict[str, Any]) -> str:
    """A Markdown table of the summary, and the verdicts against each DAA baseline."""
    lines = [
        "| condition | method | seeds | gold reward | win vs SFT | spurious rate | noisy dropped |"
        " clean dropped | spurious dropped | bootstrap gold acc. |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(row: dict[str, Any], key: str) -> str:
        value, std = row[key], row[f"{key}_std"]
        if value is None:
            return "-"
        return f"{value:.3f}" + (f" ± {std:.3f}" if row["seeds"] > 1 else "")

    for row in summary["rows"]:
        lines.append(
            f"| {row['condition']} | {row['method']} | {row['seeds']} | "
            + " | ".join(
                cell(row, k)
                for k in (
                    "gold_reward",
                    "win_rate_vs_sft",
                    "spurious_rate",
                    "noisy_dropped_fraction",
                    "clean_dropped_fraction",
                    "spurious_dropped_fraction",
                    "bootstrap_gold_accuracy",
                )
            )
            + " |"
        )
    lines.append("")
    sft = summary["sft_gold_reward"].items()
    lines.append("SFT gold reward: " + ", ".join(f"{c} {v:.3f}" for c, v in sft))
    lines.append("")
    lines += [f"- {v}" for v in summary["verdicts"]]
    return "\n".join(lines) + "\n"


def plot_bench(summary: dict[str, Any], path: Path) -> Path:
    """Gold reward (mean ± std over seeds) per method, one group of bars per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = sorted({r["condition"] for r in summary["rows"]})
    methods = [m for m in METHODS if any(r["method"] == m for r in summary["rows"])]
    by_key = {(r["condition"], r["method"]): r for r in summary["rows"]}
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(conditions) * len(methods) / 3), 4.5))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        xs, ys, errs = [], [], []
        for j, cond in enumerate(conditions):
            row = by_key.get((cond, method))
            if row is None:
                continue
            xs.append(j + i * width)
            ys.append(row["gold_reward"])
            errs.append(row["gold_reward_std"] or 0.0)
        ax.bar(xs, ys, width, yerr=errs, label=method, capsize=2)
    for j, cond in enumerate(conditions):
        sft = summary["sft_gold_reward"].get(cond)
        if sft is not None:
            ax.hlines(sft, j - width / 2, j + 0.8 - width / 2, colors="black", linestyles=":")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(conditions))], conditions, fontsize=8)
    ax.set_ylabel("gold reward (held-out prompts); dotted: SFT")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
