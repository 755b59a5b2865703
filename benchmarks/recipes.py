"""Which training recipe learns best on data nobody tuned it for: every candidate recipe on every suite set
(benchmarks/suite) x seeds, each run under the same `--train.time_limit`, scored on the set's test split.

    python benchmarks/recipes.py                         # every set and recipe, seeds 0 1, 180 s per run
    python benchmarks/recipes.py --only-sets clutter glyphs --only-recipes default seed --seeds 0
    python benchmarks/recipes.py --summarise             # only rewrite the tables from the runs recorded so far

Recipes are YAML files: `configs/baseline_seed.yaml` (`seed`) and `benchmarks/recipes/NAME.yaml`; `default` is
empty, i.e. the dataclass defaults. A run trains `train.py --config MERGED` where MERGED is the set's tasks.yaml
(data, image size, tasks) with the recipe's options on top; tasks a recipe lists are added to the set's (e.g. an
auxiliary matching task), and its `task_options` are set on each of the set's tasks (e.g. task towers). `single`
trains the default recipe (or `--single-recipe`) on each task of a set alone (losses summed, same time limit), the
baselines of delta-m (none for tasks whose ceiling in results/suite_ceilings.json is below 0.05). Each finished run
is a line of `--runs` (JSON Lines, with its resolved configuration's fingerprint and the load average at its start
and end); runs already there are reused, so an interrupted study continues where it stopped and an edited recipe
runs again.

Writes benchmarks/results/recipes.json and recipes.md: per set and task the test primary metric (mean and sample
std over seeds); per recipe the mean normalised score (each task's metric divided by the best recipe mean on it,
averaged over the set's tasks, then over sets; tasks whose best is below 0.05 are left out) and the time to the
best validation step; delta-m of the default (or `--single-recipe`) multi-task model against its single-task
models (same seed, same time limit per model).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from common import RESULTS, ROOT, environment
from suite import SETS, generate

from mmfusion.config import TaskSpec, with_run_defaults
from mmfusion.metrics import PRIMARY_METRIC, delta_m
from mmfusion.options import parse_args

RECIPES = {
    "default": ROOT / "benchmarks" / "recipes" / "default.yaml",
    "seed": ROOT / "configs" / "baseline_seed.yaml",
    **{path.stem: path for path in sorted((ROOT / "benchmarks" / "recipes").glob("*.yaml")) if path.stem != "default"},
}
"""Recipe name -> YAML file of its options (model, train, data options; tasks to add)."""
SCREENS = (
    "towers",
    "wide",
    "no_dropout",
    "nll_running",
    "epochs_v0",
    "epochs_v1",
    "film",
    "cross_attention",
    "weighting_fast",
    "task_towers",
    "concat",
    "wide_fused",
    "towers_no_dropout",
    "encoder_wide",
    "uncertainty_outcomes",
    "no_clip",
    "clip_10",
    "nll_no_dropout",
    "gradnorm_alpha0_no_dropout",
    "uncertainty_cap4",
    "uncertainty_cap16",
    "uncertainty_cap1",
    "uncertainty_cap05",
    "uncertainty_cap1_outcomes",
    "uncertainty_cap05_outcomes",
    "uncertainty_cap025_outcomes",
    "cnn_small",
    "label_smoothing",
    "label_smoothing01",
    "towers_outcomes",
    "regression_l1",
    "no_augment",
    "crop_area09",
    "no_augment_ls01",
    "crop_area09_ls01",
    "bound1",
    "sum_v1",
    "gradnorm_v1",
    "nll_v1",
    "gradnorm_floor025",
    "regression_warmup03",
    "regression_warmup06",
    "lr_4e3",
    "batch16",
    "batch24",
    "batch32",
    "bound1_batch24",
    "bound075_batch24",
    "gradnorm_floor025_batch24",
    "balanced",
    "balanced_bound1",
    "balanced05_bound1",
    "sum_v2",
    "start_one",
    "bound_regressions05",
    "bound_regressions2",
)
"""Recipes tried on a few sets or budgets only (results/recipes_screen.md, recipes_nll_noise.md, recipes_epochs.md,
recipes_fusion_screen.md, recipes_ten_pass_screens.md, recipes_outcomes_screen.md, recipes_weighting_screen.md,
recipes_cnn_small_screen.md, recipes_weight_bound_screen.md, recipes_weight_bound_outcomes.md,
recipes_label_smoothing.md, recipes_regression_l1.md, recipes_no_augment.md, recipes_weighting_180s.md,
recipes_ten_pass_gradnorm.md, recipes_short_budget_180s.md, recipes_batch16_180s.md,
recipes_ten_pass_batch16.md, recipes_batch24_180s.md,
recipes_sentiment_180s.md, recipes_balanced_180s.md, recipes_balanced_spatial_180s.md,
recipes_balanced_seeds_180s.md, recipes_balanced05_180s.md, recipes_bound1_seeds_180s.md,
recipes_sentiment_weights_180s.md, recipes_bound_regressions_180s.md, recipes_bound_regressions_seeds_180s.md,
recipes_bound_regressions2_180s.md): run when named in --only-recipes, not by default."""
BASELINES = {"seed": "the seed-style script", "generic_v0": "the generic defaults before issue 20"}
"""Recipes the default is compared with (ratio of mean normalised scores)."""
NEAR_ZERO = 0.05
"""Tasks whose best recipe mean is below this are left out of normalised scores, and of delta-m unless their
single-task model reaches it (tasks whose measured ceiling is below it, e.g. glyphs' `pair`, get no single-task
model)."""
CEILINGS = json.loads((RESULTS / "suite_ceilings.json").read_text())["sets"]
SET_KEYS = (("data", "path"), ("data", "text_column"), ("model", "image_size"))
"""What a set's tasks.yaml decides and a recipe may not change."""


def merged_config(set_yaml: dict, recipe: dict, tasks: list[dict] | None = None) -> dict:
    """The set's fragment with the recipe's options on top; the recipe's `task_options` are set on each of the set's
    tasks and its tasks are appended to the set's."""
    config = {section: dict(recipe.get(section) or {}) for section in ("model", "data", "train")}
    for section, key in SET_KEYS:
        if key in set_yaml.get(section, {}):
            config[section][key] = set_yaml[section][key]
    set_tasks = [
        {**task, **(recipe.get("task_options") or {})} for task in (tasks if tasks is not None else set_yaml["tasks"])
    ]
    config["tasks"] = set_tasks + list(recipe.get("tasks") or [])
    return config


ADDED_SETTINGS = {
    ("train", "gradnorm_alpha"): 1.5,
    ("train", "gradnorm_min_weight"): 0.001,
    ("model", "regression_dropout"): 0.1,
    ("train", "nll_noise_decay"): 0.0,
    ("train", "epochs_at_3000_rows"): 5.0,
    ("train", "min_epochs"): 1.0,
    ("train", "weighting_lr"): 0.0,
    ("train", "uncertainty_start"): "one",
    ("train", "uncertainty_max_weight"): 0.0,
    ("data", "crop_area"): 0.8,
    ("train", "regression_warmup"): 0.0,
    ("train", "matching_memory"): 0,
    ("train", "matching_negatives"): "pairs",
    ("train", "class_balance"): 0.0,
    ("train", "uncertainty_regression_max_weight"): 0.0,
}
"""Settings added after runs were recorded, with the value that trains as before they existed: left out of the
fingerprint at that value, so the recorded runs keep theirs."""
READ_BY = {
    ("model", "regression_dropout"): "regression",
    ("train", "uncertainty_start"): "multilabel",
    ("train", "regression_warmup"): "regression",
    ("train", "matching_memory"): "matching",
    ("train", "matching_negatives"): "matching",
    ("train", "class_balance"): "classification",
    ("train", "uncertainty_regression_max_weight"): "regression",
}
"""Added settings that only tasks of one type read: left out of the fingerprint of a run without such a task too."""
READ_BY_WEIGHTING = {
    ("train", "uncertainty_start"): "uncertainty",
    ("train", "uncertainty_max_weight"): "uncertainty",
    ("train", "uncertainty_regression_max_weight"): "uncertainty",
    ("train", "gradnorm_min_weight"): "gradnorm",
}
"""Added settings that only one loss weighting reads: left out of the fingerprint of a run with another too."""
TASK_FIELDS_READ_BY = {
    "label_smoothing": (0.0, ("classification", "segmentation")),
    "loss": ("mse", ("regression", "dense_regression")),
}
"""Task fields that only tasks of these types read, with the value their recorded runs hold: any other task is
fingerprinted at that value, so a recipe's `task_options` that one type reads leave the other single-task models as
recorded."""


def train_environment() -> dict[str, str]:
    """The environment of a train.py run: the caller's, with this checkout first on PYTHONPATH (its mmfusion, not an
    installed one) and the caller's PYTHONPATH after it (packages installed there, as on a machine lacking them)."""
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in paths if path)}


def fingerprint(config_file: Path, extra: list[str]) -> str:
    """A hash of the configuration train.py resolves (defaults included), without the seed, the output path and,
    without a time limit, the number of threads: a run recorded under another fingerprint was trained differently
    and is not reused."""
    config = parse_args(["--config", str(config_file), *extra], prog="recipes.py")
    # the tasks as train.py resolves them
    tasks = with_run_defaults(config.tasks, config.train.label_smoothing, config.train.regression_loss)
    resolved = dataclasses.replace(config, tasks=tasks).to_dict()
    for key in ("output_dir", "seed", "label_smoothing", "regression_loss"):  # now in the tasks
        resolved["train"].pop(key)
    types = {task["type"] for task in resolved["tasks"]}
    train = resolved["train"]
    if not train["time_limit"]:  # then the number of threads changes how fast a run trains, not what it learns
        train["cpu_threads"] = 0
    if train["epochs"] or train["max_steps"] or train["time_limit"]:  # the rule of epochs 0 is not read
        train.pop("epochs_at_3000_rows")
        train.pop("min_epochs")
    for (section, key), value in ADDED_SETTINGS.items():
        unread = (section, key) in READ_BY and READ_BY[section, key] not in types
        reader = READ_BY_WEIGHTING.get((section, key))
        unread |= reader is not None and reader != train["loss_weighting"]
        if resolved[section].get(key) == value or unread:
            resolved[section].pop(key)
    for task in resolved["tasks"]:
        for key, (default, readers) in TASK_FIELDS_READ_BY.items():
            if task["type"] not in readers:
                task[key] = default
    resolved.pop("config")
    return hashlib.sha1(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:12]


class Study:
    """The runs to make, the runs made (`--runs`), and one training run at a time per worker."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.lock = threading.Lock()
        self.finished = {}
        if options.runs.exists():
            for line in options.runs.read_text().splitlines():
                run = json.loads(line)
                self.finished[(run["set"], run["seed"], run["fingerprint"])] = run

    def train_args(self) -> list[str]:
        args = ["--train.cpu_threads", str(self.options.threads), "--train.report", "false"]
        if self.options.time_limit:
            args += ["--train.time_limit", str(self.options.time_limit)]
        return args + self.options.train_args.split()

    def plan(self, name: str, set_yaml: dict) -> list[dict]:
        """Every (recipe or single-task variant, seed) of one set, with its merged config written to disk."""
        work = self.options.work / name
        work.mkdir(parents=True, exist_ok=True)
        variants = {}
        for recipe in self.options.only_recipes:
            if recipe == "single":
                alone = yaml.safe_load(RECIPES[self.options.single_recipe].read_text()) or {}
                # One task leaves a loss weighting nothing to balance: summed, the same model trains whichever
                # weighting the recipe has, so the single-task models serve every candidate weighting.
                alone.setdefault("train", {})["loss_weighting"] = "sum"
                for task in set_yaml["tasks"]:
                    if CEILINGS[name]["tasks"][task["name"]]["perfect"] >= NEAR_ZERO:
                        variants[f"single: {task['name']}"] = merged_config(set_yaml, alone, [task])
            else:
                variants[recipe] = merged_config(set_yaml, yaml.safe_load(RECIPES[recipe].read_text()) or {})
        runs = []
        for variant, config in variants.items():
            slug = variant.replace("single: ", "single-")
            config_file = work / f"{slug}.yaml"
            config_file.write_text(yaml.safe_dump(config, sort_keys=False))
            key = fingerprint(config_file, self.train_args())
            for seed in self.options.seeds:
                runs.append(
                    {
                        "set": name,
                        "recipe": variant,
                        "seed": seed,
                        "fingerprint": key,
                        "config_file": config_file,
                        "output_dir": work / f"{slug}-{seed}",
                    }
                )
        return runs

    def run(self, plan: dict) -> dict:
        key = run_key(plan)
        if key in self.finished:
            return self.finished[key]
        output_dir = plan["output_dir"]
        shutil.rmtree(output_dir, ignore_errors=True)  # a run cut short starts again from scratch
        args = [
            "--config",
            str(plan["config_file"]),
            *self.train_args(),
            "--train.seed",
            str(plan["seed"]),
            "--train.output_dir",
            str(output_dir),
        ]
        load_start, started = os.getloadavg(), time.perf_counter()
        result = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=train_environment(),
        )
        wall_s, load_end = time.perf_counter() - started, os.getloadavg()
        if result.returncode != 0:
            raise RuntimeError(f"train.py {' '.join(args)} failed:\n{result.stderr[-3000:]}")
        records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
        validation = [r for r in records if r["split"] == "validation"]
        best = max(validation, key=lambda r: r["summary"])
        steps = max(r["step"] for r in records)
        events = [r for r in records if r["split"] == "event"]
        train_records = [r for r in records if r["split"] == "train"]
        run = {
            "set": plan["set"],
            "recipe": plan["recipe"],
            "seed": plan["seed"],
            "fingerprint": plan["fingerprint"],
            "time_limit": self.options.time_limit,
            "train_args": self.train_args(),
            "config": yaml.safe_load(plan["config_file"].read_text()),
            "test": json.loads((output_dir / "test_metrics.json").read_text()),
            "best_validation": best,
            "time_to_best_s": best["elapsed_s"],
            "wall_s": round(wall_s, 1),
            "steps": steps,
            "s_per_step": train_records[-1]["elapsed_s"] / train_records[-1]["step"],
            "stopped_by": [e["event"] for e in events if e["event"] != "time_limit_plan"],
            "planned_steps": [e["planned_steps"] for e in events if e["event"] == "time_limit_plan"],
            "load_start": [round(x, 2) for x in load_start],
            "load_end": [round(x, 2) for x in load_end],
        }
        for name in ("checkpoints", "best", "final"):  # only the records stay (a study would fill the disk)
            shutil.rmtree(output_dir / name, ignore_errors=True)
        with self.lock:
            with self.options.runs.open("a") as runs:
                runs.write(json.dumps(run) + "\n")
            self.finished[key] = run
        shown = {
            t: round(v[primary(t, run)], 3)
            for t, v in run["test"].items()
            if isinstance(v, dict) and "count" in v and v["count"]
        }
        print(
            f"{plan['set']} / {plan['recipe']} / seed {plan['seed']}: {shown}, {steps} steps, "
            f"{wall_s:.0f} s, load {load_start[0]:.1f}->{load_end[0]:.1f}",
            flush=True,
        )
        return run


def run_key(plan: dict) -> tuple[str, int, str]:
    """Runs are shared by variants that resolve to the same configuration (e.g. a recipe the defaults adopted)."""
    return plan["set"], plan["seed"], plan["fingerprint"]


def same_configuration(plans: list[dict]) -> dict[str, list[str]]:
    """Recipe -> the other recipes with its resolved configuration on every set (so they share their runs)."""
    keys = {}
    for plan in plans:
        keys.setdefault(plan["recipe"], set()).add(run_key(plan))
    return {
        r: [o for o in keys if o != r and keys[o] == keys[r]]
        for r in keys
        if any(o != r and keys[o] == keys[r] for o in keys)
    }


def interleaved(plans: list[dict]) -> list[dict]:
    """The recipes first, then the single-task models; each seed by seed (a complete table for the first seed comes
    first), set by set, the variants in an order rotated from one set to the next: the load of this shared machine
    drifts over hours, and a time limit turns load into fewer steps, so no recipe should always run first or last."""
    groups = {}
    for plan in plans:
        groups.setdefault((plan["recipe"].startswith("single"), plan["seed"], plan["set"]), []).append(plan)
    ordered = []
    for index, key in enumerate(sorted(groups, key=lambda k: (k[0], k[1], list(SETS).index(k[2])))):
        group = groups[key]
        shift = index % len(group)
        ordered += group[shift:] + group[:shift]
    return ordered


def primary(task: str, run: dict) -> str:
    spec = next(t for t in run["config"]["tasks"] if t["name"] == task)
    return PRIMARY_METRIC[spec.get("type", "classification")][0]


def sample_std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def summarise(
    runs: list[dict],
    set_tasks: dict[str, list[TaskSpec]],
    seeds: list[int],
    recipes: list[str],
    single: str = "default",
) -> dict:
    """Per set: each task's test metric per recipe, normalised scores, delta-m (of the `single` recipe, whose
    single-task models the runs hold); per recipe: the suite means."""
    by = {}
    for run in runs:
        by.setdefault(run["set"], {}).setdefault(run["recipe"], {})[run["seed"]] = run
    summary = {"sets": {}, "recipes": {}}
    for name, tasks in set_tasks.items():
        per_recipe = by.get(name, {})
        table = {}
        for recipe in [*recipes, *(f"single: {t.name}" for t in tasks)]:
            seeded = per_recipe.get(recipe)
            if not seeded:
                continue
            row = {}
            for spec in tasks:
                metric = PRIMARY_METRIC[spec.type][0]
                values = [
                    r["test"][spec.name][metric] for r in seeded.values() if metric in r["test"].get(spec.name, {})
                ]
                if values:
                    row[spec.name] = {"mean": statistics.fmean(values), "std": sample_std(values), "n": len(values)}
            row["time_to_best_s"] = statistics.fmean(r["time_to_best_s"] for r in seeded.values())
            row["wall_s"] = statistics.fmean(r["wall_s"] for r in seeded.values())
            row["steps"] = statistics.fmean(r["steps"] for r in seeded.values())
            row["load_start"] = [r["load_start"][0] for r in seeded.values()]
            row["seeds"] = sorted(seeded)
            table[recipe] = row
        best = {}
        for spec in tasks:
            means = [row[spec.name]["mean"] for recipe, row in table.items() if recipe in recipes and spec.name in row]
            if means:
                best[spec.name] = max(means)
        scored = [t for t in best if best[t] >= NEAR_ZERO]
        left_out = [t for t in best if best[t] < NEAR_ZERO]
        # delta-m leaves out only what nobody learned: a task its single-task model learns counts
        single_best = {t: table.get(f"single: {t}", {}).get(t, {}).get("mean", 0.0) for t in best}
        learned = [t for t in best if max(best[t], single_best[t]) >= NEAR_ZERO]
        for recipe, row in table.items():
            if recipe in recipes and all(t in row for t in scored):
                row["normalised"] = statistics.fmean(row[t]["mean"] / best[t] for t in scored)
                row["gap_points"] = {t: round(100 * (best[t] - row[t]["mean"]), 2) for t in scored}
        summary["sets"][name] = {
            "tasks": {t.name: PRIMARY_METRIC[t.type][0] for t in tasks},
            "best": best,
            "left_out": left_out,
            "delta_m_tasks": learned,
            "rows": table,
            "delta_m": set_delta_m(per_recipe, tasks, learned, seeds, single),
            "delta_m_by_recipe": {r: set_delta_m(per_recipe, tasks, learned, seeds, r) for r in recipes},
        }
    complete = [
        s for s, part in summary["sets"].items() if all("normalised" in part["rows"].get(r, {}) for r in recipes)
    ]
    summary["complete_sets"] = complete
    for recipe in recipes:
        rows = {s: part["rows"][recipe] for s, part in summary["sets"].items() if recipe in part["rows"]}
        if not rows:
            continue
        summary["recipes"][recipe] = {
            "normalised": {s: row["normalised"] for s, row in rows.items() if "normalised" in row},
            # over the sets every recipe has finished, so the means compare like with like
            "mean_normalised": statistics.fmean(rows[s]["normalised"] for s in complete) if complete else None,
            "time_to_best_s": statistics.fmean(row["time_to_best_s"] for row in rows.values()),
            "wall_s": statistics.fmean(row["wall_s"] for row in rows.values()),
            "steps": statistics.fmean(row["steps"] for row in rows.values()),
        }
    default = summary["recipes"].get("default", {}).get("mean_normalised")
    for values in summary["recipes"].values():
        if default and values["mean_normalised"]:
            values["default_ratio"] = default / values["mean_normalised"]
    deltas = [part["delta_m"]["mean"] for part in summary["sets"].values() if part["delta_m"]]
    summary["delta_m"] = statistics.fmean(deltas) if deltas else None
    summary["delta_m_sets"] = len(deltas)
    # every recipe against the same single-task models, over the sets where all recipes have a delta-m
    with_singles = [s for s, part in summary["sets"].items() if all(part["delta_m_by_recipe"].get(r) for r in recipes)]
    summary["delta_m_complete_sets"] = with_singles
    for recipe, values in summary["recipes"].items():
        by_set = [summary["sets"][s]["delta_m_by_recipe"][recipe]["mean"] for s in with_singles]
        values["delta_m"] = statistics.fmean(by_set) if by_set else None
    return summary


def set_delta_m(
    per_recipe: dict, tasks: list[TaskSpec], scored: list[str], seeds: list[int], recipe: str
) -> dict | None:
    """delta-m (%) of a recipe's multi-task model against the single-task models, seed by seed, over the `scored`
    tasks."""
    specs = [t for t in tasks if t.name in scored]
    values = []
    for seed in seeds:
        shared = per_recipe.get(recipe, {}).get(seed)
        singles = {t.name: per_recipe.get(f"single: {t.name}", {}).get(seed) for t in specs}
        if shared and all(singles.values()):
            values.append(delta_m(shared["test"], {n: run["test"][n] for n, run in singles.items()}, specs))
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": sample_std(values), "per_seed": values}


def cell(value: dict | None, digits: int = 3) -> str:
    if not value:
        return ""
    std = f" ± {value['std']:.{digits}f}" if value.get("std") is not None else ""
    return f"{value['mean']:.{digits}f}{std}"


def behind_best(summary: dict, recipe: str, points: float = 2.0) -> list[str]:
    """Markdown lines: the scored tasks on which `recipe` is more than `points` below the best recipe's mean."""
    behind, scored = [], 0
    for name, part in summary["sets"].items():
        gaps = part["rows"].get(recipe, {}).get("gap_points", {})
        scored += len(gaps)
        for task, gap in gaps.items():
            if gap > points:
                best = max((r for r in part["rows"] if not r.startswith("single")), key=lambda r: _mean(part, r, task))
                behind.append(
                    f"| {name} | {task} | {part['rows'][recipe][task]['mean']:.3f} | {part['best'][task]:.3f} "
                    f"| {best} | {gap:.1f} |"
                )
    if not scored:
        return []
    lines = [
        "",
        f"## Within {points:g} points of the best recipe: {recipe}",
        "",
        f"Scored tasks on which `{recipe}` is more than {points:g} points below the best recipe's mean: "
        f"{len(behind)} of {scored}.",
    ]
    if behind:
        lines += ["", f"| set | task | {recipe} | best | best recipe | points behind |", "|" + " --- |" * 6, *behind]
    return lines


def _mean(part: dict, recipe: str, task: str) -> float:
    return part["rows"][recipe].get(task, {}).get("mean", float("-inf"))


def markdown(summary: dict, settings: dict) -> str:
    limit, single = settings["time_limit"], settings["single_recipe"]
    options = " ".join(settings["train_args"])
    budget = f"{limit} s (`--train.time_limit`)" if limit else f"without a time limit (`train.py {options}`)"
    lines = [
        "# Recipes on the benchmark suite",
        "",
        f"`python benchmarks/recipes.py` ({settings['command']}): every run {budget}, "
        f"torch threads {settings['threads'] or 'per core'}, {settings['jobs']} run(s) "
        f"at once, "
        f"seeds {settings['seeds']}; test split, best validation checkpoint. Cells: mean ± sample std over seeds. "
        f"Normalised: each task's mean divided by the best recipe mean on it, averaged over the set's tasks. "
        f"1-minute load average at the start and end of runs: {settings['load']}. Runs finished: "
        f"{settings['finished']} (empty cells: not run yet).",
        "",
    ]
    for recipe, others in settings["same_configuration"].items():
        if recipe == "default":
            lines += [
                f"`default` (the dataclass defaults) resolves to the same configuration as {', '.join(others)}: "
                "their rows are the same runs.",
                "",
            ]
    recipes = [r for r in summary["recipes"]]
    complete = summary["complete_sets"]
    lines += [
        f"Mean normalised: over the {len(complete)} set(s) every recipe has finished "
        f"({', '.join(complete) or 'none yet'}). Steps: mean optimizer steps per run.",
        "",
        "## Suite",
        "",
        "| recipe | " + " | ".join(summary["sets"]) + " | mean normalised | default / recipe "
        "| time to best (s) | wall (s) | steps |",
        "|" + " --- |" * (len(summary["sets"]) + 6),
    ]
    for recipe in recipes:
        values = summary["recipes"][recipe]
        cells = [f"{values['normalised'][s]:.3f}" if s in values["normalised"] else "" for s in summary["sets"]]
        mean = f"{values['mean_normalised']:.3f}" if values["mean_normalised"] else ""
        ratio = f"{values['default_ratio']:.3f}" if "default_ratio" in values else ""
        lines.append(
            f"| {recipe} | " + " | ".join(cells) + f" | {mean} | {ratio} | {values['time_to_best_s']:.0f} "
            f"| {values['wall_s']:.0f} | {values['steps']:.0f} |"
        )
    for recipe in dict.fromkeys(["default", single]):  # the default's bar, and the single-task recipe's
        lines += behind_best(summary, recipe)
    for name, part in summary["sets"].items():
        tasks = part["tasks"]
        lines += ["", f"## {name}", ""]
        if part["left_out"]:
            counted = [t for t in part["left_out"] if t in part["delta_m_tasks"]]
            lines += [
                f"Left out of normalised scores (best recipe below {NEAR_ZERO}): {', '.join(part['left_out'])}"
                + (
                    f"; counted in delta-m, since its single-task model learns it: {', '.join(counted)}."
                    if counted
                    else "; and of delta-m."
                ),
                "",
            ]
        lines += [
            "| recipe | "
            + " | ".join(f"{t} ({m})" for t, m in tasks.items())
            + " | normalised | time to best (s) | steps |",
            "|" + " --- |" * (len(tasks) + 4),
        ]
        for recipe, row in part["rows"].items():
            normalised = f"{row['normalised']:.3f}" if "normalised" in row else ""
            lines.append(
                f"| {recipe} | "
                + " | ".join(cell(row.get(t)) for t in tasks)
                + f" | {normalised} | {row['time_to_best_s']:.0f} | {row['steps']:.0f} |"
            )
        if part["delta_m"]:
            lines += ["", f"delta-m of `{single}` against its single-task models: {cell(part['delta_m'], 2)} %"]
    lines += [
        "",
        "## Multi-task against single-task models (delta-m)",
        "",
        f"The `{single}` recipe's one model for all of a set's tasks against one model per task, each trained "
        f"{'under the same time limit' if limit else 'with the same options'}, seed by seed; test metrics, every "
        "metric of each task learned by some model (Maninis et al. 2019, higher is better).",
        "",
        "| set | delta-m (%) | per seed |",
        "| --- | --- | --- |",
    ]
    for name, part in summary["sets"].items():
        if part["delta_m"]:
            seeds = ", ".join(f"{v:+.2f}" for v in part["delta_m"]["per_seed"])
            lines.append(f"| {name} | {cell(part['delta_m'], 2)} | {seeds} |")
    if summary["delta_m"] is not None:
        lines.append(f"| mean over {summary['delta_m_sets']} sets | {summary['delta_m']:+.2f} | |")
    complete = summary["delta_m_complete_sets"]
    if complete:
        recipes = list(summary["recipes"])
        lines += [
            "",
            f"Every recipe's multi-task model against the same single-task models (the `{single}` recipe's model, "
            "one task each): for a recipe with another model or data setting the difference includes that change.",
            "",
            "| set | " + " | ".join(recipes) + " |",
            "|" + " --- |" * (len(recipes) + 1),
        ]
        for name in complete:
            by_recipe = summary["sets"][name]["delta_m_by_recipe"]
            lines.append(f"| {name} | " + " | ".join(cell(by_recipe[r], 2) for r in recipes) + " |")
        means = " | ".join(f"{summary['recipes'][r]['delta_m']:+.2f}" for r in recipes)
        lines.append(f"| mean over {len(complete)} sets | {means} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=180, help="seconds per run (--train.time_limit)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only-sets", nargs="+", choices=list(SETS), default=list(SETS))
    studied = [name for name in RECIPES if name not in SCREENS]
    parser.add_argument("--only-recipes", nargs="+", choices=[*RECIPES, "single"], default=[*studied, "single"])
    parser.add_argument(
        "--single-recipe",
        choices=list(RECIPES),
        default="default",
        help="the recipe of the single-task models (`single`), and whose multi-task model the delta-m headlines are",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="training runs at once (2 on a 2-core CPU; several can share one GPU)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (--train.cpu_threads; 0: cores)")
    parser.add_argument(
        "--suite", type=Path, default=ROOT / "runs" / "suite", help="where the suite's sets are (generated if not)"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "recipes", help="runs' output directories")
    parser.add_argument("--runs", type=Path, default=RESULTS / "recipes_runs.jsonl", help="finished runs (JSONL)")
    parser.add_argument("--train-args", default="", help="more train.py options for every run (one string)")
    parser.add_argument("--summarise", action="store_true", help="only write the tables from the recorded runs")
    parser.add_argument("--name", default="recipes", help="results/NAME.json and NAME.md")
    options = parser.parse_args()
    if options.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {options.jobs}")
    study = Study(options)
    plans, set_tasks = [], {}
    for name in options.only_sets:
        set_yaml = yaml.safe_load((generate(name, options.suite) / "tasks.yaml").read_text())
        set_tasks[name] = [TaskSpec(**task) for task in set_yaml["tasks"]]
        plans += study.plan(name, set_yaml)
    if not options.summarise:
        unique = {}
        for plan in interleaved(plans):
            unique.setdefault(run_key(plan), plan)

        def run_and_report(plan: dict) -> None:
            study.run(plan)
            with study.lock:
                write_tables(study, plans, set_tasks, options)  # tables of what has finished, after every run

        with ThreadPoolExecutor(options.jobs) as pool:
            list(pool.map(run_and_report, unique.values()))
    print(write_tables(study, plans, set_tasks, options))
    print(f"wrote {RESULTS / options.name}.json and .md")


def write_tables(study: Study, plans: list[dict], set_tasks: dict, options: argparse.Namespace) -> str:
    """results/NAME.json and NAME.md from the runs finished so far (missing cells say so); the markdown."""
    runs = [{**study.finished[run_key(p)], "recipe": p["recipe"]} for p in plans if run_key(p) in study.finished]
    recipes = [r for r in RECIPES if r in options.only_recipes]
    summary = summarise(runs, set_tasks, options.seeds, recipes, options.single_recipe)
    loads = [run["load_start"][0] for run in runs] + [run["load_end"][0] for run in runs]
    settings = {
        "command": "python benchmarks/recipes.py " + " ".join(sys.argv[1:]),
        "time_limit": options.time_limit,
        "seeds": options.seeds,
        "jobs": options.jobs,
        "threads": options.threads,
        "single_recipe": options.single_recipe,
        "train_args": study.train_args(),
        "runs": str(options.runs.relative_to(ROOT)) if options.runs.is_relative_to(ROOT) else str(options.runs),
        "finished": f"{len({run_key(p) for p in plans} & set(study.finished))} of {len({run_key(p) for p in plans})}",
        "load": f"{min(loads):.1f}-{max(loads):.1f} (median {statistics.median(loads):.1f})" if loads else "",
        "recipes": {name: yaml.safe_load(RECIPES[name].read_text()) for name in recipes},
        "same_configuration": same_configuration(plans),
    }
    table = markdown(summary, settings)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{options.name}.md").write_text(table)
    (RESULTS / f"{options.name}.json").write_text(
        json.dumps({"environment": environment(), "settings": settings, **summary}, indent=2)
    )
    return table


if __name__ == "__main__":
    main()
