"""benchmarks/recipes.py: how a run's configuration is merged, which runs are shared, the run order, and the
figures of its tables (normalised scores, sample std, delta-m) on hand-made run records."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from mmfusion.config import TaskSpec
from mmfusion.metrics import delta_m

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from recipes import (
    RECIPES,
    RESULTS,
    ROOT,
    SCREENS,
    Study,
    behind_best,
    fingerprint,
    interleaved,
    markdown,
    merged_config,
    run_key,
    same_configuration,
    summarise,
    train_environment,
)

SET_YAML = {
    "data": {"path": "/data/clutter", "text_column": "question"},
    "model": {"image_size": 96},
    "tasks": [{"name": "shape", "type": "classification"}, {"name": "count", "type": "regression"}],
}


def test_the_set_decides_data_and_tasks_and_the_recipe_the_rest():
    recipe = {
        "model": {"image_size": 32, "fusion": "concat"},
        "data": {"path": "elsewhere", "augment": False},
        "train": {"lr": 0.001},
        "tasks": [{"name": "align", "type": "matching"}],
    }
    config = merged_config(SET_YAML, recipe)
    assert config["model"] == {"image_size": 96, "fusion": "concat"}
    assert config["data"] == {"path": "/data/clutter", "text_column": "question", "augment": False}
    assert config["train"] == {"lr": 0.001}
    assert [t["name"] for t in config["tasks"]] == ["shape", "count", "align"]
    alone = merged_config(SET_YAML, {}, [SET_YAML["tasks"][1]])
    assert [t["name"] for t in alone["tasks"]] == ["count"]
    towers = merged_config(SET_YAML, {**recipe, "task_options": {"hidden_layers": 1}})
    assert [t.get("hidden_layers") for t in towers["tasks"]] == [1, 1, None]  # the set's tasks, not the recipe's
    assert SET_YAML["tasks"][0] == {"name": "shape", "type": "classification"}  # the set's fragment is left as it is


def test_screened_recipes_exist_and_the_compared_ones_are_not_screens():
    assert set(SCREENS) <= set(RECIPES)
    assert not {"default", "seed", "generic_v0", "sample_v0", "sum"} & set(SCREENS)


def test_fingerprint_ignores_seed_and_output_but_not_the_recipe(tmp_path):
    files = {}
    recipes = {"a": {}, "b": {"data": {"on_error": "raise"}}, "c": {"model": {"fusion": "film"}}}
    for name, recipe in recipes.items():
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(merged_config(SET_YAML, recipe)))
    base = fingerprint(files["a"], ["--train.time_limit", "60"])
    assert fingerprint(files["a"], ["--train.time_limit", "60", "--train.seed", "3", "--train.output_dir", "x"]) == base
    assert fingerprint(files["a"], ["--train.time_limit", "90"]) != base
    # under a time limit the number of threads decides how far a run gets; without one, only how fast
    assert fingerprint(files["a"], ["--train.time_limit", "60", "--train.cpu_threads", "1"]) != base
    passes = ["--train.time_limit", "0", "--train.epochs", "10"]
    assert fingerprint(files["a"], [*passes, "--train.cpu_threads", "1"]) == fingerprint(files["a"], passes)
    # the defaults are part of the fingerprint: a recipe that spells out a default resolves the same
    assert fingerprint(files["b"], ["--train.time_limit", "60"]) == base
    assert fingerprint(files["c"], ["--train.time_limit", "60"]) != base
    # The recorded runs (results/recipes_dropout_v0_runs.jsonl) are matched by fingerprint: this one (GradNorm, the default
    # then) was computed before --train.gradnorm_alpha existed. A new setting changes every fingerprint unless
    # recipes.ADDED_SETTINGS names the value that trains as before it existed; a changed default re-pins it.
    gradnorm = tmp_path / "gradnorm.yaml"
    gradnorm.write_text(yaml.safe_dump(merged_config(SET_YAML, {"train": {"loss_weighting": "gradnorm"}})))
    # regression_dropout came with a new default (0; before it, regression heads had model.dropout 0.1): at 0.1
    # the run trains as it did, and a set with a regression task gets a new fingerprint by default. model.dropout's
    # default later became 0, so the run pins its 0.1 too, and likewise the random crops, no label smoothing and the
    # batch of 32.
    old_heads = ["--train.time_limit", "60", "--model.regression_dropout", "0.1"]
    as_before = [*old_heads, "--model.dropout", "0.1", "--data.augment", "true", "--train.label_smoothing", "0"]
    as_before += ["--train.batch_size", "32"]
    pinned = fingerprint(gradnorm, as_before)
    assert pinned == "d6f36b3d987c", "a new setting changed the fingerprints: add it to recipes.ADDED_SETTINGS"
    assert fingerprint(gradnorm, [*as_before, "--train.gradnorm_alpha", "0"]) != pinned
    assert fingerprint(gradnorm, ["--train.time_limit", "60"]) != pinned
    classes = tmp_path / "classes.yaml"
    classes.write_text(yaml.safe_dump({**merged_config(SET_YAML, {}), "tasks": SET_YAML["tasks"][:1]}))
    assert fingerprint(classes, ["--train.time_limit", "60"]) == fingerprint(classes, old_heads)  # no regression
    # uncertainty_start only changes how uncertainty weighs a multilabel task: other runs keep their fingerprints
    labelled = tmp_path / "labelled.yaml"
    multilabel = {"name": "colors", "type": "multilabel"}
    labelled.write_text(yaml.safe_dump({**merged_config(SET_YAML, {}), "tasks": [*SET_YAML["tasks"], multilabel]}))
    ones = ["--train.time_limit", "60", "--train.uncertainty_start", "one"]
    assert fingerprint(labelled, ones) != fingerprint(labelled, ["--train.time_limit", "60"])
    assert fingerprint(files["a"], ones) == base  # no multilabel task
    other = ["--train.loss_weighting", "gradnorm", "--train.time_limit", "60"]
    saved = yaml.safe_load(labelled.read_text())
    saved["train"] = {**saved.get("train", {}), "uncertainty_start": "one"}  # as a saved config holds it
    (tmp_path / "saved.yaml").write_text(yaml.safe_dump(saved))
    assert fingerprint(tmp_path / "saved.yaml", other) == fingerprint(labelled, other)


@pytest.mark.parametrize(
    ("option", "reader"), [({"label_smoothing": 0.2}, "classification"), ({"loss": "l1"}, "regression")]
)
def test_a_task_option_changes_only_the_fingerprints_of_the_task_types_that_read_it(tmp_path, option, reader):
    """A task field set on every task (a recipe's task_options) trains the other task types as before: their
    single-task models keep their fingerprints, those of the type that reads it get new ones."""
    limit = ["--train.time_limit", "60"]
    for task in SET_YAML["tasks"]:
        prints = []
        for recipe in ({}, {"task_options": option}):
            alone = tmp_path / f"{task['name']}-{len(prints)}.yaml"
            alone.write_text(yaml.safe_dump(merged_config(SET_YAML, recipe, [task])))
            prints.append(fingerprint(alone, limit))
        assert (prints[0] != prints[1]) == (task["type"] == reader), task


@pytest.mark.parametrize(
    ("task_option", "train_option"),
    [({"label_smoothing": 0.2}, {"label_smoothing": 0.2}), ({"loss": "l1"}, {"regression_loss": "l1"})],
)
def test_a_train_option_shares_the_runs_of_the_task_option(tmp_path, task_option, train_option):
    """train.label_smoothing and train.regression_loss reach the tasks the task option does, so a recipe setting
    one shares that one's runs."""
    limit = ["--train.time_limit", "60"]
    for task in SET_YAML["tasks"]:
        prints = []
        for recipe in ({"task_options": task_option}, {"train": train_option}):
            alone = tmp_path / f"{task['name']}-{len(prints)}.yaml"
            alone.write_text(yaml.safe_dump(merged_config(SET_YAML, recipe, [task])))
            prints.append(fingerprint(alone, limit))
        assert prints[0] == prints[1], task


RECORDED_STUDIES = {
    "recipes_runs.jsonl": ("default", "default"),
    "recipes_sentiment_180s_runs.jsonl": ("default", "default"),
    "recipes_batch32_runs.jsonl": ("batch32", "batch32"),
    "recipes_dropout_v0_runs.jsonl": ("dropout_v0", "dropout_v0"),
    "recipes_ten_passes_runs.jsonl": ("dropout_v0", "dropout_v0"),
    "recipes_epochs_runs.jsonl": ("epochs_v1", "epochs_v1"),
    "recipes_ten_pass_screens_runs.jsonl": ("dropout_v0", "no_dropout"),
    "recipes_weighting_180s_runs.jsonl": ("batch32", "batch32"),
    "recipes_short_budget_180s_runs.jsonl": ("batch32", "batch32"),
    "recipes_batch24_180s_runs.jsonl": ("batch32", "batch32"),
}
"""Studies on record -> the recipes that resolve today as their `default` did (the defaults have moved since) and as
the recipe of their single-task models (all of them for recipes_ten_pass_screens_runs.jsonl: its screens compare
against single-task models without dropout)."""


@pytest.mark.parametrize("runs_file", RECORDED_STUDIES)
def test_recorded_studies_keep_their_fingerprints(tmp_path, runs_file):
    """Every compared recipe and single-task model of a recorded study resolves today to the configuration its runs
    trained with, so `--summarise` rebuilds the study's tables: a changed default is pinned in the recipes recorded
    before the change (e.g. model.dropout 0.1)."""
    runs = [json.loads(line) for line in (RESULTS / runs_file).read_text().splitlines()]
    recorded = defaultdict(set)
    for run in runs:
        recorded[run["set"], run["recipe"]].add(run["fingerprint"])
    as_default, single_recipe = RECORDED_STUDIES[runs_file]
    threads = int(runs[0]["train_args"][1])  # --train.cpu_threads N --train.report false, then the study's options
    train_args = runs[0]["train_args"][4:]
    time_limit = float(train_args[1]) if train_args[:1] == ["--train.time_limit"] else 0
    checked = 0
    for name in sorted({run["set"] for run in runs}):
        config = next(run for run in runs if run["set"] == name and run["recipe"] == "default")["config"]
        set_yaml = {
            "data": {key: config["data"][key] for key in ("path", "text_column")},
            "model": {"image_size": config["model"]["image_size"]},
            "tasks": config["tasks"],
        }
        labels = {run["recipe"] for run in runs if run["set"] == name}
        compared = [r for r in RECIPES if r in labels and r not in SCREENS and r != "default"]
        options = {
            "seeds": [0],
            "threads": threads,
            "time_limit": time_limit,
            "train_args": "" if time_limit else " ".join(train_args),
        }
        study = Study(
            argparse.Namespace(
                **options,
                only_recipes=[as_default, *compared, "single"],
                single_recipe=single_recipe,
                work=tmp_path / name,
                runs=tmp_path / "none",
            )
        )
        for plan in study.plan(name, set_yaml):
            label = "default" if plan["recipe"] == as_default else plan["recipe"]
            if (name, label) in recorded:
                assert plan["fingerprint"] in recorded[name, label], (runs_file, name, plan["recipe"])
                checked += 1
    assert checked >= len({run["set"] for run in runs})


def _plan(recipe, seed, name="clutter", key="k"):
    return {"set": name, "recipe": recipe, "seed": seed, "fingerprint": f"{key}-{recipe}"}


def test_run_order_rotates_recipes_puts_seed_zero_first_and_single_task_models_last():
    plans = [_plan(r, seed, name) for name in ("clutter", "glyphs") for r in ("a", "b", "single: x") for seed in (0, 1)]
    order = [(p["recipe"], p["seed"], p["set"]) for p in interleaved(plans)]
    assert order == [
        ("a", 0, "clutter"),
        ("b", 0, "clutter"),
        ("b", 0, "glyphs"),
        ("a", 0, "glyphs"),
        ("a", 1, "clutter"),
        ("b", 1, "clutter"),
        ("b", 1, "glyphs"),
        ("a", 1, "glyphs"),
        ("single: x", 0, "clutter"),
        ("single: x", 0, "glyphs"),
        ("single: x", 1, "clutter"),
        ("single: x", 1, "glyphs"),
    ]


def test_recipes_with_the_same_configuration_share_their_runs():
    plans = [
        {**_plan(r, s), "fingerprint": "same" if r in ("default", "tuned") else r}
        for r in ("default", "tuned", "other")
        for s in (0, 1)
    ]
    assert run_key(plans[0]) == run_key(plans[2])
    assert same_configuration(plans) == {"default": ["tuned"], "tuned": ["default"]}


def _run(recipe, seed, shape, count, pair=0.001):
    test = {"shape": {"macro_f1": shape, "accuracy": shape + 0.1}, "count": {"r2": count, "mae": 1 - count}}
    if pair is not None:
        test["pair"] = {"recall@1": pair}
    return {
        "set": "clutter",
        "recipe": recipe,
        "seed": seed,
        "test": test,
        "time_to_best_s": 10.0 * (seed + 1),
        "wall_s": 100.0,
        "steps": 50,
        "load_start": [1.0, 1.0, 1.0],
    }


def test_summary_normalises_by_the_best_recipe_leaves_out_near_zero_tasks_and_computes_delta_m():
    tasks = [TaskSpec("shape"), TaskSpec("count", "regression"), TaskSpec("pair", "matching")]
    runs = [
        _run("default", 0, 0.8, 0.5),
        _run("default", 1, 0.6, 0.7),
        _run("seed", 0, 0.5, 0.8),
        _run("seed", 1, 0.5, 0.6),
        _run("single: shape", 0, 0.7, 0.0, None),
        _run("single: shape", 1, 0.7, 0.0, None),
        _run("single: count", 0, 0.0, 0.4, None),
        _run("single: count", 1, 0.0, 0.6, None),
    ]
    summary = summarise(runs, {"clutter": tasks}, [0, 1], ["default", "seed"])
    part = summary["sets"]["clutter"]
    assert part["left_out"] == ["pair"] and part["best"] == {"shape": 0.7, "count": 0.7, "pair": 0.001}
    default, seed = part["rows"]["default"], part["rows"]["seed"]
    assert default["shape"]["mean"] == pytest.approx(0.7)
    assert default["shape"]["std"] == pytest.approx(statistics.stdev([0.8, 0.6]))  # sample std, not population
    # best: shape 0.7 (default), count 0.7 (seed); default's count 0.6, seed's shape 0.5
    assert default["normalised"] == pytest.approx((1 + 0.6 / 0.7) / 2)
    assert seed["normalised"] == pytest.approx((0.5 / 0.7 + 1) / 2)
    assert default["gap_points"] == {"shape": 0.0, "count": 10.0} and seed["gap_points"] == {
        "shape": 20.0,
        "count": 0.0,
    }
    assert default["time_to_best_s"] == 15.0
    # the bar: which scored tasks a recipe misses the best recipe on by more than 2 points
    assert behind_best(summary, "default")[3:] == [
        "Scored tasks on which `default` is more than 2 points below the best recipe's mean: 1 of 2.",
        "",
        "| set | task | default | best | best recipe | points behind |",
        "| --- | --- | --- | --- | --- | --- |",
        "| clutter | count | 0.600 | 0.700 | seed | 10.0 |",
    ]
    assert behind_best(summary, "default", points=10.0)[3:] == [
        "Scored tasks on which `default` is more than 10 points below the best recipe's mean: 0 of 2."
    ]
    assert summary["recipes"]["default"]["default_ratio"] == 1.0
    assert summary["recipes"]["seed"]["default_ratio"] == pytest.approx(default["normalised"] / seed["normalised"])
    assert summary["complete_sets"] == ["clutter"]
    single = {(r["recipe"], r["seed"]): r["test"] for r in runs}
    expected = [
        delta_m(runs[seed]["test"], {t: single[(f"single: {t}", seed)][t] for t in ("shape", "count")}, tasks[:2])
        for seed in (0, 1)
    ]
    assert part["delta_m"]["per_seed"] == pytest.approx(expected)
    assert summary["delta_m"] == pytest.approx(statistics.fmean(expected))
    without_seed_one = summarise([r for r in runs if r != runs[-1]], {"clutter": tasks}, [0, 1], ["default", "seed"])
    assert without_seed_one["sets"]["clutter"]["delta_m"]["per_seed"] == pytest.approx(expected[:1])
    # every recipe against the same single-task models: seed's model is scored like the default's
    seed_expected = [
        delta_m(runs[2 + seed]["test"], {t: single[(f"single: {t}", seed)][t] for t in ("shape", "count")}, tasks[:2])
        for seed in (0, 1)
    ]
    assert part["delta_m_by_recipe"]["seed"]["per_seed"] == pytest.approx(seed_expected)
    assert part["delta_m_by_recipe"]["default"] == part["delta_m"]
    assert summary["recipes"]["seed"]["delta_m"] == pytest.approx(statistics.fmean(seed_expected))
    assert summary["delta_m_complete_sets"] == ["clutter"]
    # with the single-task models of another recipe, the headline delta-m is that recipe's
    summary_of_seed = summarise(runs, {"clutter": tasks}, [0, 1], ["default", "seed"], single="seed")
    of_seed = summary_of_seed["sets"]["clutter"]
    assert of_seed["delta_m"] == part["delta_m_by_recipe"]["seed"]
    # the page then states the bar for the default and for that recipe
    settings = {"time_limit": 180, "single_recipe": "seed", "train_args": [], "command": "recipes.py", "threads": 0}
    settings |= {"jobs": 1, "seeds": [0, 1], "load": "1.0", "finished": "8 of 8", "same_configuration": {}}
    page = markdown(summary_of_seed, settings).splitlines()
    headers = [line for line in page if line.startswith("## Within")]
    assert headers == ["## Within 2 points of the best recipe: default", "## Within 2 points of the best recipe: seed"]
    # a task no recipe learns but its single-task model does counts in delta-m (and stays out of normalised)
    learned_alone = [*runs, *(_run("single: pair", seed, 0.0, 0.0, 0.3) for seed in (0, 1))]
    with_pair = summarise(learned_alone, {"clutter": tasks}, [0, 1], ["default", "seed"])["sets"]["clutter"]
    assert with_pair["left_out"] == ["pair"] and with_pair["delta_m_tasks"] == ["shape", "count", "pair"]
    assert with_pair["rows"]["default"]["normalised"] == default["normalised"]
    single[("single: pair", 0)] = learned_alone[-2]["test"]
    assert with_pair["delta_m"]["per_seed"][0] == pytest.approx(
        delta_m(runs[0]["test"], {t: single[(f"single: {t}", 0)][t] for t in ("shape", "count", "pair")}, tasks)
    )


def test_single_task_models_follow_the_single_recipe_and_sum_their_loss(tmp_path):
    plans = {}
    for recipe in ("default", "dropout_v0"):
        options = {"only_recipes": ["single"], "seeds": [0], "threads": 0, "time_limit": 60, "train_args": ""}
        study = Study(
            argparse.Namespace(**options, work=tmp_path / recipe, runs=tmp_path / "none", single_recipe=recipe)
        )
        plans[recipe] = study.plan("clutter", SET_YAML)
    for recipe, plan in plans.items():
        assert [p["recipe"] for p in plan] == ["single: shape", "single: count"]
        configs = [yaml.safe_load(p["config_file"].read_text()) for p in plan]
        assert [c["train"]["loss_weighting"] for c in configs] == ["sum", "sum"]
        assert [c["model"].get("dropout") for c in configs] == ([None, None] if recipe == "default" else [0.1, 0.1])
    assert plans["default"][0]["fingerprint"] != plans["dropout_v0"][0]["fingerprint"]


def test_train_runs_import_this_checkout_and_keep_the_callers_pythonpath(monkeypatch):
    """train.py runs import this checkout's mmfusion first and still find packages the caller put on PYTHONPATH
    (how a GPU machine without `datasets` gets it)."""
    root = str(ROOT)
    monkeypatch.setenv("PYTHONPATH", "/wheels")
    assert train_environment()["PYTHONPATH"] == f"{root}{os.pathsep}/wheels"
    monkeypatch.delenv("PYTHONPATH")
    assert train_environment()["PYTHONPATH"] == root


def test_jobs_below_one_are_refused():
    script = ROOT / "benchmarks" / "recipes.py"
    result = subprocess.run([sys.executable, str(script), "--jobs", "0"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "--jobs must be >= 1, got 0" in result.stderr
