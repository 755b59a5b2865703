"""The `mmfusion` console script: evaluate, predict and inspect, called in-process through `main`."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from accelerate import Accelerator
from test_predictor import CAPTIONS, TOPICS, fake_hub_cache, go_offline, make_checkpoint, write_image

from mmfusion.cli import main
from mmfusion.config import DataConfig
from mmfusion.data import load_splits
from mmfusion.evaluation import evaluate
from mmfusion.model import FusionModel
from mmfusion.predictor import Predictor
from mmfusion.processing import FusionProcessor
from mmfusion.rows import FusionDataset, RowReader, make_loader

TEST_TOPICS = ["cat", "dog", None, "bird", "cat", "cat", "dog"]  # one row without a topic label


def write_split(directory: Path, topics: list[str | None]) -> None:
    """An imagefolder split: PNGs plus metadata.jsonl with a caption and every task's column."""
    directory.mkdir(parents=True)
    with (directory / "metadata.jsonl").open("w") as f:
        for i, topic in enumerate(topics):
            write_image(directory / f"{i}.png", seed=100 + i)
            row = {
                "file_name": f"{i}.png",
                "caption": CAPTIONS[i % len(CAPTIONS)],
                "topic": topic,
                "tags": [["red"], ["blue", "green"], []][i % 3],
                "score": float(i) - 1.5,
            }
            f.write(json.dumps(row) + "\n")


def write_data(directory: Path, test_topics: list[str | None]) -> Path:
    write_split(directory / "train", ["cat", "dog", "bird", "cat"])
    write_split(directory / "test", test_topics)
    return directory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A training run's output_dir: best/ plus the metrics files train.py writes beside it."""
    run = tmp_path_factory.mktemp("run")
    make_checkpoint(run / "best")
    validation = {"topic": {"count": 7, "accuracy": 0.5, "macro_f1": 0.25}, "summary": 0.25}
    records = [
        {"step": 10, "epoch": 0, "split": "train", "losses": {"topic": 1.1, "loss": 2.5}, "lr": 0.001},
        {"step": 10, "epoch": 0, "split": "validation", **validation},
        {"step": 20, "epoch": 1, "split": "validation", **validation, "summary": 0.125},
        {"step": 20, "epoch": 1, "split": "test", "checkpoint": "best", **validation, "summary": 0.3125},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 3')  # cut short
    (run / "test_metrics.json").write_text(json.dumps({**validation, "summary": 0.3125}))
    return run


@pytest.fixture(scope="module")
def checkpoint(run_dir) -> Path:
    return run_dir / "best"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"), TEST_TOPICS)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----- evaluate -----


def reference_metrics(checkpoint: Path, data_dir: Path) -> dict:
    """evaluation.evaluate on the test split, wired up by hand."""
    model, processor = FusionModel.from_pretrained(checkpoint), FusionProcessor.from_pretrained(checkpoint)
    config = DataConfig(path=str(data_dir))
    loaded = load_splits(config.path, config)
    reader = RowReader(processor, model.config.tasks, config, loaded.roots["test"], "test")
    loader = make_loader(FusionDataset(loaded.splits["test"], reader), 3, processor.settings.pad_id, False, 0)
    return evaluate(model, loader, Accelerator(), model.config.tasks)["both"].compute()


def test_evaluate_writes_the_metrics_of_evaluation_evaluate(capsys, checkpoint, data_dir, tmp_path):
    output = tmp_path / "out" / "metrics.json"
    code, out, err = run(capsys, "evaluate", checkpoint, "--data.path", data_dir, "--output", output, "--batch_size", 4)
    assert code == 0, err
    record = json.loads(output.read_text())
    reference = reference_metrics(checkpoint, data_dir)
    assert record["checkpoint"] == str(checkpoint) and record["split"] == "test"
    assert set(record["metrics"]) == set(reference)
    for task in ("topic", "tags", "score", "pair"):
        assert record["metrics"][task] == pytest.approx(reference[task], abs=1e-6), task
    assert record["metrics"]["summary"] == pytest.approx(reference["summary"], abs=1e-6)
    assert record["skipped"]["total"] == 0

    labelled = sum(topic is not None for topic in TEST_TOPICS)
    confusion = record["confusion_matrices"]["topic"]
    assert confusion["labels"] == TOPICS
    assert sum(map(sum, confusion["matrix"])) == labelled == record["metrics"]["topic"]["count"]
    true_counts = [sum(row) for row in confusion["matrix"]]
    assert true_counts == [TEST_TOPICS.count(topic) for topic in TOPICS]
    correct = sum(confusion["matrix"][i][i] for i in range(len(TOPICS)))
    assert correct / labelled == pytest.approx(record["metrics"]["topic"]["accuracy"])
    assert set(record["confusion_matrices"]) == {"topic"}  # classification tasks only

    for text in ("topic (classification, 6 labelled rows)", "confusion matrix", "macro_f1", "recall@1", "summary"):
        assert text in out
    assert f"{reference['topic']['accuracy']:.4f}" in out


def test_evaluate_modality_contribution_table(capsys, checkpoint, data_dir, tmp_path):
    output = tmp_path / "metrics.json"
    code, out, err = run(capsys, "evaluate", checkpoint, "--data.path", data_dir, "--output", output, "--modalities")
    assert code == 0, err
    record = json.loads(output.read_text())
    assert set(record) >= {"without_image", "without_text"}
    assert record["without_image"]["topic"]["count"] == record["metrics"]["topic"]["count"]
    row = next(line for line in out.splitlines() if line.startswith("topic (macro_f1)"))
    expected = [record[k]["topic"]["macro_f1"] for k in ("metrics", "without_image", "without_text")]
    assert [float(v) for v in row.split()[2:]] == pytest.approx(expected, abs=1e-4)


def test_evaluate_unseen_label_raises_or_is_skipped_and_counted(capsys, checkpoint, tmp_path):
    data = write_data(tmp_path / "data", ["cat", "dog", "zebra", "bird"])
    code, out, err = run(capsys, "evaluate", checkpoint, "--data.path", data)
    assert code == 2
    message = err.splitlines()[-1]  # after datasets' progress bars
    assert message.startswith("mmfusion evaluate: error: test split, row 2, field 'topic': label 'zebra'")
    assert "Traceback" not in err

    output = tmp_path / "skip.json"
    code, out, err = run(
        capsys, "evaluate", checkpoint, "--data.path", data, "--data.on_error", "skip", "--output", output
    )
    assert code == 0, err
    record = json.loads(output.read_text())
    assert record["skipped"]["total"] == 1
    assert record["skipped"]["by_reason"] == {"unseen label": 1}
    assert "zebra" in record["skipped"]["examples"][0]
    assert sum(map(sum, record["confusion_matrices"]["topic"]["matrix"])) == 3
    assert "skipped 1 bad rows" in out


def test_evaluate_missing_split_names_the_splits(capsys, checkpoint, data_dir):
    code, _, err = run(capsys, "evaluate", checkpoint, "--data.path", data_dir, "--split", "holdout")
    assert code == 2
    assert "no 'holdout' split" in err and "'test'" in err


# ----- predict -----


def test_predict_single_prints_each_task(capsys, checkpoint, data_dir):
    image = data_dir / "test" / "0.png"
    code, out, err = run(capsys, "predict", checkpoint, "--image", image, "--text", "a red cat")
    assert code == 0, err
    expected = Predictor.from_pretrained(str(checkpoint)).predict([image], ["a red cat"])[0]
    assert out.startswith(f"topic: {expected['topic']['label']}\n")
    for label in TOPICS:
        assert re.search(rf"^ +{label} +{expected['topic']['scores'][label]:.3f}$", out, re.MULTILINE), label
    assert f"score: {expected['score']['value']:.4g}" in out
    assert f"pair: image-text similarity {expected['pair']['score']:.4f}" in out


def test_predict_json_equals_the_predictor(capsys, checkpoint, data_dir):
    image = data_dir / "test" / "1.png"
    code, out, err = run(capsys, "predict", checkpoint, "--image", image, "--text", "a dog", "--json")
    assert code == 0, err
    expected = Predictor.from_pretrained(str(checkpoint)).predict([image], ["a dog"])[0]
    assert json.loads(out) == expected


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_predict_file_writes_one_line_per_row(capsys, checkpoint, tmp_path, suffix):
    for i in range(2):
        write_image(tmp_path / f"{i}.png", seed=i)
    rows = [
        {"image": "0.png", "caption": "a red cat", "other": 1},
        {"image": None, "caption": "a blue bird", "other": 2},  # no image: placeholder
        {"image": "1.png", "caption": None, "other": 3},  # no text: placeholder
    ]
    source = tmp_path / f"rows{suffix}"
    if suffix == ".csv":
        with source.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "caption", "other"])
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    else:
        source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "predictions.jsonl"
    code, _, err = run(capsys, "predict", checkpoint, "--input", source, "--output", output, "--batch_size", 2)
    assert code == 0, err
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["row"] for line in lines] == [0, 1, 2]
    expected = Predictor.from_pretrained(str(checkpoint), batch_size=2).predict(
        [tmp_path / "0.png", None, tmp_path / "1.png"], ["a red cat", "a blue bird", None]
    )
    assert [line["predictions"] for line in lines] == expected
    assert "wrote 3 predictions" in err


def test_predict_file_with_a_missing_image_names_file_row_and_path(capsys, checkpoint, tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps({"image": "gone.png", "caption": "a cat"}) + "\n")
    code, _, err = run(capsys, "predict", checkpoint, "--input", source)
    assert code == 2
    assert str(source) in err and "row 0" in err and "gone.png" in err


def test_predict_file_with_a_wrong_column_says_so(capsys, checkpoint, tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps({"image": None, "text": "a cat"}) + "\n")
    code, _, err = run(capsys, "predict", checkpoint, "--input", source)
    assert code == 2
    assert "no column ['caption']" in err and "--text_column" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give --image and/or --text"),
        (["--input", "nowhere.jsonl"], "--input file not found: nowhere.jsonl"),
        (["--text", "a cat", "--batch_size", "0"], "--batch_size must be > 0"),
    ],
)
def test_predict_bad_options_exit_2(capsys, checkpoint, argv, message):
    code, _, err = run(capsys, "predict", checkpoint, *argv)
    assert code == 2
    assert err.startswith(f"mmfusion predict: error: {message}") and err.count("\n") == 1


def test_predict_from_a_hub_id_in_the_offline_cache(capsys, checkpoint, tmp_path, monkeypatch):
    fake_hub_cache(go_offline(monkeypatch, tmp_path / "hf"), "someone/tiny-fusion", checkpoint)
    code, out, err = run(capsys, "predict", "someone/tiny-fusion", "--text", "a cat", "--json")
    assert code == 0, err
    assert json.loads(out) == Predictor.from_pretrained(str(checkpoint)).predict([None], ["a cat"])[0]


# ----- inspect -----


def test_inspect_shows_architecture_tasks_parameters_and_run_metrics(capsys, checkpoint):
    code, out, err = run(capsys, "inspect", checkpoint)
    assert code == 0, err
    model = FusionModel.from_pretrained(checkpoint)
    assert "simple_cnn" in out and "lstm" in out and "fusion         gated" in out
    assert "3 labels: bird, cat, dog" in out and "3 labels: blue, green, red" in out
    assert "target mean 2, std 3" in out
    table = {
        line[:16].strip(): line[16:].split()
        for line in out.splitlines()
        if line.startswith(("image encoder ", "text encoder ", "fusion ", "heads ", "placeholders ", "total "))
    }
    counts = {name: int(values[0].replace(",", "")) for name, values in table.items() if len(values) == 2}
    assert counts["total"] == model.num_parameters()
    assert counts["image encoder"] == sum(p.numel() for p in model.image_encoder.parameters())
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
    assert "best validation summary (step 10): summary 0.2500" in out
    assert "last validation (step 20): summary 0.1250" in out
    assert "test (best checkpoint): summary 0.3125" in out


def test_missing_checkpoint_directory_exits_2_naming_it(capsys, tmp_path, monkeypatch):
    go_offline(monkeypatch, tmp_path / "hf")
    missing = tmp_path / "runs" / "best"
    code, _, err = run(capsys, "inspect", missing)
    assert code == 2
    assert err.startswith("mmfusion inspect: error: ") and str(missing) in err
    assert "checkpoint directory not found" in err  # a path, so not looked up as a Hub id
    code, _, err = run(capsys, "inspect", "someone/no-such-model")
    assert code == 2 and "neither a local directory nor a Hugging Face Hub model" in err


def test_unknown_option_exits_2_with_tyros_message(capsys, checkpoint):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(checkpoint), "--bogus"])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert "--bogus" in out + err


def test_console_script_help():
    result = subprocess.run(["mmfusion", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("evaluate", "predict", "inspect"):
        assert command in result.stdout


def test_evaluate_and_predict_read_the_columns_the_checkpoint_was_trained_with(capsys, checkpoint, data_dir, tmp_path):
    """processor.json remembers the data columns; flags override them; a checkpoint without them keeps the defaults."""
    renamed = tmp_path / "ckpt"
    shutil.copytree(checkpoint, renamed)
    settings = json.loads((renamed / "processor.json").read_text())
    assert settings["text_column"] == "caption" and settings["missing_modality"] == "error"
    settings.update(text_column="description", image_column="picture")
    (renamed / "processor.json").write_text(json.dumps(settings))
    data = tmp_path / "data" / "test"
    shutil.copytree(data_dir / "test", data)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    (data / "metadata.jsonl").write_text(
        "".join(json.dumps({("description" if k == "caption" else k): v for k, v in r.items()}) + "\n" for r in rows)
    )

    code, out, err = run(capsys, "evaluate", renamed, "--data.path", data.parent, "--output", tmp_path / "a.json")
    assert code == 0, err
    code, _, err = run(capsys, "evaluate", checkpoint, "--data.path", data_dir, "--output", tmp_path / "b.json")
    assert code == 0, err
    renamed_metrics = json.loads((tmp_path / "a.json").read_text())["metrics"]
    assert renamed_metrics == json.loads((tmp_path / "b.json").read_text())["metrics"]

    code, _, err = run(capsys, "evaluate", renamed, "--data.path", data.parent, "--data.text_column", "caption")
    assert code == 2 and "data.text_column 'caption' not found" in err

    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text(json.dumps({"picture": str(data / "0.png"), "description": CAPTIONS[0]}) + "\n")
    code, out, err = run(capsys, "predict", renamed, "--input", rows_file)
    assert code == 0, err
    expected = Predictor.from_pretrained(str(checkpoint)).predict([str(data / "0.png")], [CAPTIONS[0]])[0]
    assert json.loads(out)["predictions"] == expected

    old = tmp_path / "old"  # written before processor.json remembered the columns
    shutil.copytree(checkpoint, old)
    settings = json.loads((old / "processor.json").read_text())
    for key in ("image_column", "text_column", "image_root", "missing_modality"):
        del settings[key]
    (old / "processor.json").write_text(json.dumps(settings))
    code, _, err = run(capsys, "evaluate", old, "--data.path", data_dir, "--output", tmp_path / "c.json")
    assert code == 0, err
    assert json.loads((tmp_path / "c.json").read_text())["metrics"] == renamed_metrics
