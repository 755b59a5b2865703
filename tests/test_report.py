"""mmfusion report: every figure of a tiny gated and cross-attention run, a self-contained page whose numbers are
those of metrics.jsonl (the last record of a repeated step), the modality table, and a clear error without a run."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import tyro
from helpers import make_imagefolder, make_rows

from mmfusion.cli import Report
from mmfusion.errors import InputError
from mmfusion.report import CONDITION_NAMES, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

TINY = [
    "--model.image_widths",
    "8",
    "16",
    "--model.text_dim",
    "16",
    "--model.dim",
    "32",
    "--model.image_size",
    "32",
    "--train.batch_size",
    "8",
    "--train.eval_batch_size",
    "5",
    "--train.report",
    "false",
    "--train.max_steps",
    "6",
    "--train.eval_every",
    "3",
    "--train.log_every",
    "2",
    "--train.cpu_threads",
    "1",
]
FUSIONS = ("gated", "cross_attention")
DATA_SCRIPT = re.compile(r'<script type="application/json" id="report-data">(.*?)</script>', re.S)


def rows_with_a_coin(count: int, start: int) -> list[dict]:
    """The helpers' rows plus `coin`, a label unrelated to image and text, so the model surely makes errors."""
    return [{**row, "coin": ["heads", "tails"][(i * 37 % 11) % 2]} for i, row in enumerate(make_rows(count, start))]


def _train(args: list[str]) -> int:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return train.main(args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny gated run and a tiny cross-attention run (6 steps, evaluated at 3 and 6), each with its report."""
    root = tmp_path_factory.mktemp("report")
    data = root / "data"
    make_imagefolder(
        data,
        {"train": rows_with_a_coin(24, 0), "validation": rows_with_a_coin(13, 100), "test": rows_with_a_coin(5, 200)},
    )
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(root / "hf"))
        for fusion in FUSIONS:
            out = root / fusion
            assert (
                _train(["--data.path", str(data), *TINY, "--model.fusion", fusion, "--train.output_dir", str(out)]) == 0
            )
            assert write_report(out) == out / "report.html"
            runs[fusion] = out
    return runs


def page_data(run: Path) -> dict:
    """The numbers report.html embeds."""
    return json.loads(DATA_SCRIPT.search((run / "report.html").read_text()).group(1))


def last_per_step(path: Path, split: str) -> list[dict]:
    """metrics.jsonl's records of a split, the last one of each step, by step."""
    records = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("split") == split:
            records[record["step"]] = record
    return [records[step] for step in sorted(records)]


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_figure_is_written_and_embedded(runs, fusion):
    figures = {path.name for path in (runs[fusion] / "report").iterdir()}
    common = {
        "training.png",
        "validation.png",
        "modality.png",
        "confusion_label.png",
        "confusion_coin.png",
        "errors_coin.png",
    }
    assert figures >= common | {"gates.png" if fusion == "gated" else "attention.png"}
    assert figures - common <= {"gates.png", "attention.png", "errors_label.png"}
    page = (runs[fusion] / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == len(figures)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_the_page_is_self_contained(runs, fusion):
    page = (runs[fusion] / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    references = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', page, re.I)
    assert references and all(ref.startswith("data:image/png;base64,") for ref in references)
    assert not re.search(r"https?://", page) and "<link" not in page


def test_numbers_equal_metrics_jsonl(runs):
    run = runs["gated"]
    data, page = page_data(run), (run / "report.html").read_text()
    metrics = run / "metrics.jsonl"
    assert data["train"] == last_per_step(metrics, "train") and [r["step"] for r in data["train"]] == [2, 4, 6]
    assert data["validation"] == last_per_step(metrics, "validation")
    assert data["test"] == last_per_step(metrics, "test")[-1]
    assert json.loads((run / "test_metrics.json").read_text()).items() <= data["test"].items()
    best = max(data["validation"], key=lambda r: r["summary"])
    assert data["best_step"] == best["step"]
    for record in (best, data["test"]):  # every metric of the header's tables, as printed
        for task in ("label", "coin", "score", "tags"):
            for name, value in record[task].items():
                assert (str(value) if name == "count" else f"{value:.4f}") in page, (task, name)


def test_the_re_evaluated_checkpoint_reproduces_the_logged_best_step(runs):
    data = page_data(runs["cross_attention"])
    best = next(r for r in data["validation"] if r["step"] == data["best_step"])
    checkpoint = data["checkpoint"]
    for task, metric in checkpoint["primary_metric"].items():
        assert checkpoint["modality"][task]["both"] == pytest.approx(best[task][metric], abs=1e-5)
    confusion = checkpoint["confusion"]["label"]
    assert confusion["labels"] == ["blue", "red"]
    matrix = confusion["matrix"]
    assert sum(map(sum, matrix)) == best["label"]["count"]
    assert (matrix[0][0] + matrix[1][1]) / best["label"]["count"] == pytest.approx(best["label"]["accuracy"])


@pytest.mark.parametrize("fusion", FUSIONS)
def test_modality_table_has_four_finite_columns(runs, fusion):
    table = page_data(runs[fusion])["checkpoint"]["modality"]
    assert set(table) == {"label", "coin", "score", "tags"}
    for values in table.values():
        assert list(values) == list(CONDITION_NAMES) and all(
            v is not None and v == v and abs(v) < 1e9 for v in values.values()
        )
    page = (runs[fusion] / "report.html").read_text()
    assert all(f"<th>{label}</th>" in page for label in CONDITION_NAMES.values())


def test_a_resumed_run_shows_the_last_record_of_each_step(runs, tmp_path):
    run = tmp_path / "resumed"
    run.mkdir()
    shutil.copy(runs["gated"] / "config.yaml", run)
    lines = (runs["gated"] / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    repeated = [r for r in records if (r["split"], r["step"]) in {("validation", 3), ("train", 4)}]
    for record in repeated:  # a resume from step 2 logs steps 3 and 4 again, differently
        if record["split"] == "validation":
            record["summary"] = 0.999
        else:
            record["losses"]["loss"] = 42.0
    (run / "metrics.jsonl").write_text("\n".join(lines + [json.dumps(r) for r in repeated]) + '\n{"step": 7, "spl')
    write_report(run)  # no best/ here: the checkpoint sections say so
    data, page = page_data(run), (run / "report.html").read_text()
    assert data["validation"] == last_per_step(run / "metrics.jsonl", "validation")
    assert [r["step"] for r in data["validation"]] == [3, 6] and data["validation"][0]["summary"] == 0.999
    assert data["train"][1]["losses"]["loss"] == 42.0
    assert data["best_step"] == 3 and "3 (summary = 0.9990)" in page
    assert data["checkpoint"] is None and f"no checkpoint in {run / 'best'}" in page


def test_a_directory_without_metrics_is_a_clear_error(tmp_path):
    args = ["report", str(tmp_path), "--checkpoint", "final", "--data_path", "elsewhere"]
    command = tyro.extras.subcommand_cli_from_dict({"report": Report}, args=args, use_underscores=True)  # as cli.main
    assert command == Report(run_dir=str(tmp_path), checkpoint="final", data_path="elsewhere")
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "metrics.jsonl"))):
        command.run()
