"""`mmfusion report RUN_DIR`: one self-contained HTML page about a training run.

    mmfusion report runs/mine                   # runs/mine/report.html, its figures also in runs/mine/report/
    mmfusion report runs/mine --data_path /data/mine --checkpoint final

The page shows the run's configuration and test metrics, the training curves and the validation metrics over
steps (as logged in metrics.jsonl; of the records a resume repeats for a step, the last), then, from the
checkpoint re-evaluated on the run's validation split: confusion matrices, the modality-contribution table, the
fusion's gate values or cross-attention maps, and the most confident errors. Figures are embedded as data URIs;
the numbers are also embedded as JSON in `<script type="application/json" id="report-data">`.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import send_to_device

from . import viz
from .config import Config, TaskSpec, load_yaml
from .data import FusionDataset, model_inputs
from .errors import InputError
from .evaluation import evaluate
from .metrics import LOWER_IS_BETTER, PRIMARY_METRIC, MultiTaskMetrics
from .model import FusionModel
from .predictor import label_names
from .processing import FusionProcessor
from .training import make_loader, prepare_data

REPORT_NAME = "report.html"
FIGURE_DIR = "report"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"
MISTAKES_SHOWN = 6  # most confident errors per classification task
ATTENTION_IMAGES = 4  # validation images of the cross-attention figure
ATTENTION_WORDS = 3  # caption words per image
CONDITIONS = {
    "both": "image + text",
    "without_image": "text only (image removed)",
    "without_text": "image only (text removed)",
    "without_both": "neither (both removed)",
}
REMOVED = {"both": (), "without_image": ("image",), "without_text": ("text",), "without_both": ("image", "text")}
STOPWORDS = frozenset(
    "the and with near are its this that there these those has have was were for from into onto you your our "
    "how what which here see seen shows show contains scene image picture photo very just some".split()
)  # left out of the attention figure's word choice, which prefers words that name things


# ----- what metrics.jsonl says -----


@dataclass
class History:
    """metrics.jsonl by split, one record per step in step order (the last written wins)."""

    train: list[dict]
    validation: list[dict]
    test: dict | None  # the last test record (metrics of the best checkpoint)


def read_history(path: Path) -> History:
    """Parse metrics.jsonl; a line cut short by a crash is left out, a step repeated by a resume keeps its last."""
    if not path.is_file():
        raise InputError(f"{path} not found: not a training run directory (train.py writes {METRICS_NAME})")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "split" in record and "step" in record:
            records.append(record)
    by_split: dict[str, dict[int, dict]] = {}
    for record in records:
        by_split.setdefault(record["split"], {})[record["step"]] = record
    ordered = {split: [steps[s] for s in sorted(steps)] for split, steps in by_split.items()}
    test = ordered.get("test", [])
    return History(ordered.get("train", []), ordered.get("validation", []), test[-1] if test else None)


def logged_value(record: dict, best_metric: str) -> float | None:
    """The record's value of train.best_metric: `summary` or `task/metric`."""
    if best_metric == "summary":
        return record.get("summary")
    task, _, metric = best_metric.partition("/")
    return record.get(task, {}).get(metric)


def selection_value(record: dict, best_metric: str) -> float | None:
    """What train.py maximises to pick best/: the best_metric's value, negated when lower is better."""
    value = logged_value(record, best_metric)
    if value is None:
        return None
    return -value if best_metric.partition("/")[2] in LOWER_IS_BETTER else value


def best_record(validation: list[dict], best_metric: str) -> dict | None:
    """The validation record train.py saved as best/: the first one with the highest selection value."""
    best, best_value = None, None
    for record in validation:
        value = selection_value(record, best_metric)
        if value is not None and (best_value is None or value > best_value):
            best, best_value = record, value
    return best


def read_config(run_dir: Path) -> Config:
    """The run's resolved configuration (config.yaml)."""
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise InputError(f"{path} not found: not a training run directory (train.py writes {CONFIG_NAME})")
    try:
        return load_yaml(path)
    except ValueError as error:
        raise InputError(str(error)) from None


# ----- what the checkpoint does on the validation split -----


@dataclass
class CheckpointResults:
    """The checkpoint re-evaluated on the validation split."""

    directory: Path
    rows: int  # validation rows evaluated
    primary: dict[str, str]  # task -> its primary metric
    modality: dict[str, dict[str, float | None]]  # task -> condition -> primary metric (None: no labels)
    confusion: dict[str, list[list[int]]]  # classification task -> counts, rows true, columns predicted
    labels: dict[str, list[str]]  # classification task -> class names
    mistakes: dict[str, list[viz.Mistake]]
    gates: np.ndarray | None = None  # gated fusion: [rows, dim]
    attention: list[viz.AttentionExample] = field(default_factory=list)
    attention_note: str = ""

    def as_json(self) -> dict[str, Any]:
        """The re-evaluated numbers: primary metric per task and condition, labelled confusion matrices."""
        return {
            "directory": str(self.directory),
            "primary_metric": self.primary,
            "modality": self.modality,
            "confusion": {task: {"labels": self.labels[task], "matrix": m} for task, m in self.confusion.items()},
        }


class OneProcess:
    """What `evaluation.evaluate` needs of an Accelerator, for this process alone: the report never syncs with
    other processes (train.py writes it on the main process only), runs in float32 and moves batches itself."""

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def gather_for_metrics(self, values: Any) -> Any:
        return values


@dataclass
class ValidationRows:
    """The run's validation split, encoded with the checkpoint's processor, and how to show its rows."""

    dataset: torch.utils.data.Dataset
    processor: FusionProcessor
    text_column: str
    device: torch.device
    batch_size: int

    def batches(self, removed: tuple[str, ...] = (), batch_size: int | None = None):
        """Batches on the device, with the modalities in `removed` marked absent (the model's placeholders)."""
        loader = make_loader(self.dataset, batch_size or self.batch_size, self.processor.settings.pad_id, False, 0)
        start = 0
        for batch in loader:
            size = len(batch["row"])
            batch["position"] = torch.arange(start, start + size)  # in the dataset (rows are never shuffled here)
            start += size
            batch = send_to_device(batch, self.device)
            for modality in removed:
                batch[f"{modality}_present"] = torch.zeros_like(batch[f"{modality}_present"])
            yield batch

    def picture(self, batch: dict, i: int) -> np.ndarray:
        """Row i's normalised image tensor back to [S, S, 3] RGB in [0, 1]."""
        mean = torch.tensor(self.processor.settings.mean).view(3, 1, 1)
        std = torch.tensor(self.processor.settings.std).view(3, 1, 1)
        return (batch["pixel_values"][i].float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()

    def caption(self, batch: dict, i: int) -> str:
        """Row i's text as written in the data (a streamed split: as the model read it, from its token ids)."""
        if not batch["text_present"][i]:
            return "(no text)"
        if isinstance(self.dataset, FusionDataset):
            return str(self.dataset.split[int(batch["position"][i])][self.text_column])
        return self.processor.tokenizer.decode(self.token_ids(batch, i))

    def token_ids(self, batch: dict, i: int) -> list[int]:
        return batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()


def validation_rows(
    config: Config,
    model: FusionModel,
    processor: FusionProcessor,
    data_path: str | None,
    device: torch.device,
    batch_size: int | None,
) -> ValidationRows:
    """The run's validation split, checked and encoded with the checkpoint's processor and label maps (held out
    from train exactly as in training when the data has no validation split)."""
    if data_path is not None:
        config.data.path = data_path
    if not Path(config.data.path).exists():
        raise InputError(
            f"data.path {config.data.path!r} of the run's {CONFIG_NAME} not found (a relative path starts from the "
            f"working directory {Path.cwd()}); give the data's location with --data_path"
        )
    config.tasks = model.config.tasks
    dataset = prepare_data(config, processor, splits=("validation",)).datasets["validation"]
    batch_size = batch_size or config.train.eval_batch_size  # as in training: the same padding, the same numbers
    return ValidationRows(dataset, processor, config.data.text_column, device, batch_size)


def modality_table(model: FusionModel, rows: ValidationRows) -> tuple[dict, dict]:
    """Each task's primary metric with both modalities, each one removed and both removed; and the confusion
    matrices of the pass with both."""
    tasks = model.config.tasks
    table: dict[str, dict[str, float | None]] = {spec.name: {} for spec in tasks}
    matrices = {}
    for condition, removed in REMOVED.items():
        results = MultiTaskMetrics(tasks)
        metrics = evaluate(model, rows.batches(removed), OneProcess(), tasks, metrics=results)
        for spec in tasks:
            table[spec.name][condition] = metrics[spec.name].get(PRIMARY_METRIC[spec.type][0])
        if condition == "both":
            matrices = results.confusion_matrices()
    return table, matrices


def batch_mistakes(spec: TaskSpec, logits: torch.Tensor, batch: dict, rows: ValidationRows) -> list[viz.Mistake]:
    """The batch's most confident wrong predictions of a classification task (at most MISTAKES_SHOWN)."""
    confidence, predicted = logits.float().softmax(-1).cpu().max(-1)
    target, mask = batch["labels"][spec.name].cpu(), batch["label_mask"][spec.name].cpu().bool()
    wrong = (mask & (predicted != target)).nonzero().flatten().tolist()
    wrong = sorted(wrong, key=lambda i: -confidence[i].item())[:MISTAKES_SHOWN]
    names = label_names(spec)
    return [
        viz.Mistake(
            rows.picture(batch, i),
            rows.caption(batch, i),
            names[int(target[i])],
            names[int(predicted[i])],
            confidence[i].item(),
            int(batch["row"][i]),
        )
        for i in wrong
    ]


@torch.no_grad()
def inspect_rows(model: FusionModel, rows: ValidationRows):
    """One pass over the validation rows: each classification task's most confident errors, and the gate values
    of a gated fusion ([rows, dim], else None)."""
    tasks = [spec for spec in model.config.tasks if spec.type == "classification"]
    mistakes: dict[str, list[viz.Mistake]] = {spec.name: [] for spec in tasks}
    gates = []
    for batch in rows.batches():
        output = model(**model_inputs(batch))
        if "gate" in output.extras:
            gates.append(output.extras["gate"].float().cpu())
        for spec in tasks:
            found = mistakes[spec.name] + batch_mistakes(spec, output.logits[spec.name], batch, rows)
            mistakes[spec.name] = sorted(found, key=lambda m: (-m.probability, m.row))[:MISTAKES_SHOWN]
    return mistakes, torch.cat(gates).numpy() if gates else None


def chosen_words(tokens: list[str], weights: torch.Tensor) -> list[int]:
    """Positions of up to ATTENTION_WORDS distinct caption words whose attention is the most peaked; content
    words (alphabetic, 3+ letters, not a stop word) come first, special tokens never. In caption order."""
    ranked = []
    for position, token in enumerate(tokens):
        word = token.lstrip("#Ġ▁").lower()
        content = word.isalpha() and len(word) >= 3 and word not in STOPWORDS
        if not word.startswith(("[", "<")):
            ranked.append((not content, -weights[position].max().item(), position, word))
    chosen: dict[str, int] = {}
    for _, _, position, word in sorted(ranked):
        chosen.setdefault(word, position)
    return sorted(list(chosen.values())[:ATTENTION_WORDS])


@torch.no_grad()
def attention_examples(model: FusionModel, rows: ValidationRows) -> tuple[list[viz.AttentionExample], str]:
    """Cross-attention: for the first validation images, chosen words' attention over the image patches (last
    fusion layer, mean over heads); and a note on what is shown (or why nothing is)."""
    batch = next(rows.batches(batch_size=ATTENTION_IMAGES))
    layers = model(**model_inputs(batch), output_attentions=True).extras["text_to_image_attention"]
    weights = layers[-1].float().mean(1).cpu()  # [B, T, P]
    patches = weights.shape[-1]
    side = math.isqrt(patches)
    if side * side != patches:
        return [], f"the image encoder's {patches} tokens do not form a square grid, so no map is drawn"
    examples = []
    for i in range(weights.shape[0]):
        tokens = [rows.processor.tokenizer.id_to_token(token) or "?" for token in rows.token_ids(batch, i)]
        positions = chosen_words(tokens, weights[i])
        maps = [weights[i, p].view(side, side).numpy() for p in positions]
        words = [tokens[p] for p in positions]
        examples.append(viz.AttentionExample(rows.picture(batch, i), rows.caption(batch, i), words, maps))
    heads = model.config.fusion_heads
    return examples, f"last of {len(layers)} fusion layers, mean over {heads} heads, {side}x{side} image patches"


def evaluate_checkpoint(
    directory: Path, config: Config, data_path: str | None, batch_size: int | None, device: torch.device
) -> CheckpointResults:
    """Re-evaluate a checkpoint on the run's validation split for the report's checkpoint sections."""
    model = FusionModel.from_pretrained(directory).to(device).eval()
    rows = validation_rows(config, model, FusionProcessor.from_pretrained(directory), data_path, device, batch_size)
    table, matrices = modality_table(model, rows)
    mistakes, gates = inspect_rows(model, rows)
    tasks = model.tasks
    results = CheckpointResults(
        directory=directory,
        rows=len(rows.dataset) if isinstance(rows.dataset, FusionDataset) else -1,
        primary={name: PRIMARY_METRIC[spec.type][0] for name, spec in tasks.items()},
        modality=table,
        confusion=matrices,
        labels={name: label_names(tasks[name]) for name in matrices},
        mistakes=mistakes,
        gates=gates,
    )
    if model.config.fusion == "cross_attention":
        results.attention, results.attention_note = attention_examples(model, rows)
    return results


# ----- the report -----


@dataclass
class ReportData:
    """Everything report.html shows; `as_json()` is what it embeds."""

    run_dir: Path
    config: Config
    history: History
    best: dict | None  # the validation record of the best step
    checkpoint: CheckpointResults | None
    checkpoint_note: str = ""  # why there are no checkpoint results

    @property
    def tasks(self) -> list[TaskSpec]:
        return self.config.model.tasks or self.config.tasks

    def as_json(self) -> dict[str, Any]:
        """The logged records (deduplicated), the best step and the checkpoint's re-evaluated numbers."""
        return {
            "run_dir": str(self.run_dir),
            "best_metric": self.config.train.best_metric,
            "best_step": self.best["step"] if self.best else None,
            "train": self.history.train,
            "validation": self.history.validation,
            "test": self.history.test,
            "checkpoint": None if self.checkpoint is None else self.checkpoint.as_json(),
        }


def collect(
    run_dir: Path,
    checkpoint: str = "best",
    data_path: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
) -> ReportData:
    """Read the run's files and re-evaluate its checkpoint (sections that need it are skipped, with the reason,
    when the checkpoint directory is not there)."""
    if not run_dir.is_dir():
        raise InputError(f"run directory not found: {run_dir}")
    history = read_history(run_dir / METRICS_NAME)
    config = read_config(run_dir)
    best = best_record(history.validation, config.train.best_metric)
    data = ReportData(run_dir, config, history, best, None)
    directory = run_dir / checkpoint
    if not (directory / "config.json").is_file():
        data.checkpoint_note = f"There is no checkpoint in {directory}, so nothing was re-evaluated."
        return data
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data.checkpoint = evaluate_checkpoint(directory, config, data_path, batch_size, target)
    return data


def write_report(
    run_dir: Path,
    checkpoint: str = "best",
    data_path: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
) -> Path:
    """Write RUN_DIR/report.html (self-contained) and its figures as RUN_DIR/report/*.png; returns the page."""
    run_dir = Path(run_dir)
    data = collect(run_dir, checkpoint, data_path, batch_size, device)
    figure_dir = run_dir / FIGURE_DIR
    figure_dir.mkdir(exist_ok=True)
    for old in figure_dir.glob("*.png"):
        old.unlink()
    sections = [header(data), curves_section(data, figure_dir), validation_section(data, figure_dir)]
    sections += [confusion_section(data, figure_dir), modality_section(data, figure_dir)]
    sections += [fusion_section(data, figure_dir), mistakes_section(data, figure_dir)]
    page = run_dir / REPORT_NAME
    page.write_text(render_page(f"Training report: {run_dir.name}", sections, data.as_json()))
    return page


# ----- HTML -----

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1280px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: .8em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-family: ui-monospace, Menlo, Consolas, monospace; }
th { background: #f2f2f2; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; margin: .5em 0; }
p.note { color: #555; font-style: italic; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value))


def number(value: Any) -> str:
    """A metric as shown: integers as they are, floats with 4 decimals, missing as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.4f}" if isinstance(value, float) else esc(value)


def table(headers: list[str], rows: list[list[Any]], numeric_from: int = 1) -> str:
    """An HTML table; cells from column `numeric_from` on are numbers (right-aligned, 4 decimals)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = ""
    for row in rows:
        cells = [
            f"<td>{esc(v)}</td>" if i < numeric_from else f'<td class="num">{number(v)}</td>' for i, v in enumerate(row)
        ]
        body += "<tr>" + "".join(cells) + "</tr>\n"
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def image(path: Path, alt: str) -> str:
    """The PNG at `path` embedded as a data URI."""
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{esc(alt)}">'


def figure(fig, path: Path, alt: str, caption: str = "") -> str:
    """Save a matplotlib figure beside the page and embed it, with an optional caption paragraph."""
    embedded = image(viz.save_png(fig, path), alt)
    return embedded + (f"<p>{caption}</p>" if caption else "")


def section(title: str, body: str) -> str:
    return f"<section>\n<h2>{esc(title)}</h2>\n{body}\n</section>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def file_name(prefix: str, task: str) -> str:
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_.-]', '_', task)}.png"


def render_page(title: str, sections: list[str], data: dict) -> str:
    """The whole page: inline CSS, the sections, and the report data as JSON (never executed)."""
    embedded = json.dumps(data).replace("</", "<\\/")
    head = f'<head>\n<meta charset="utf-8">\n<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>'
    script = f'<script type="application/json" id="report-data">{embedded}</script>'
    body = "\n".join([f"<h1>{esc(title)}</h1>", *sections, script])
    return f'<!DOCTYPE html>\n<html lang="en">\n{head}\n<body>\n{body}\n</body>\n</html>\n'


def metric_rows(records: list[dict | None], tasks: list[TaskSpec]) -> list[list[Any]]:
    """[task, metric, value per record] for every metric of every task, then the summary."""
    rows = []
    for spec in tasks:
        names = list(dict.fromkeys(k for r in records if r for k in r.get(spec.name, {})))
        rows += [
            [spec.name, viz.metric_label(n), *[(r or {}).get(spec.name, {}).get(n) for r in records]] for n in names
        ]
    rows.append(["summary", "mean primary metric", *[(r or {}).get("summary") for r in records]])
    return rows


def describe_model(config: Config) -> list[list[str]]:
    """Configuration rows of the header: encoders, fusion, tasks, data and optimisation."""
    model, train = config.model, config.train
    image = model.image_encoder + (f" (widths {model.image_widths})" if model.image_encoder == "simple_cnn" else "")
    text = f"hf {model.text_model}" if model.text_encoder == "hf" else f"{model.text_encoder} (dim {model.text_dim})"
    heads = f", {model.fusion_heads} heads" if model.fusion == "cross_attention" else ""
    tasks = "; ".join(
        f"{t.name} ({t.type}{f', {t.num_labels} labels' if t.num_labels else ''})" for t in model.tasks or config.tasks
    )
    length = f"{train.max_steps} steps" if train.max_steps else f"{train.epochs} epochs"
    return [
        ["image encoder", f"{image}, {model.image_size}x{model.image_size} px"],
        ["text encoder", text],
        ["fusion", f"{model.fusion} (dim {model.dim}, {model.fusion_layers} layers{heads}, dropout {model.dropout})"],
        ["tasks", tasks],
        ["data", config.data.path],
        [
            "training",
            f"{length}, batch size {train.batch_size} x {train.grad_accumulation} accumulation, lr "
            f"{train.lr:g} ({train.scheduler}, warmup {train.warmup_ratio:g}), loss weighting "
            f"{train.loss_weighting}, seed {train.seed}",
        ],
    ]


def header(data: ReportData) -> str:
    """Configuration summary, best step, validation metrics at the best and last steps, and test metrics."""
    history, best = data.history, data.best
    last_step = max((r["step"] for r in history.train + history.validation), default=None)
    rows = describe_model(data.config) + [["run directory", str(data.run_dir)], ["last logged step", last_step]]
    if best:
        metric = data.config.train.best_metric
        rows.append(["best step", f"{best['step']} ({metric} = {number(logged_value(best, metric))})"])
    body = table(["setting", "value"], rows, numeric_from=2)
    if history.validation:
        last = history.validation[-1]
        headers = [
            "task",
            "metric",
            f"best step ({best['step']})" if best else "best step",
            f"last step ({last['step']})",
        ]
        body += "<h3>Validation metrics (as logged in metrics.jsonl)</h3>" + table(
            headers, metric_rows([best, last], data.tasks), 2
        )
    if history.test:
        body += "<h3>Test metrics (best checkpoint, as logged)</h3>"
        body += table(["task", "metric", "test"], metric_rows([history.test], data.tasks), 2)
    else:
        body += note("The run has no test split, so there are no test metrics.")
    return section("Run", body)


def curves_section(data: ReportData, figure_dir: Path) -> str:
    """Losses, learning rate, loss weights and throughput over steps."""
    records = data.history.train
    if not records:
        return section("Training curves", note("metrics.jsonl has no training records yet."))
    colors = viz.task_colors([spec.name for spec in data.tasks])
    fig = viz.training_curves(records, colors, data.config.train.loss_weighting)
    caption = (
        f"{len(records)} training log records (every {data.config.train.log_every} steps). Task losses are "
        "the unweighted per-task losses; the total is what was optimised (the weighted combination)."
    )
    return section("Training curves", figure(fig, figure_dir / "training.png", "training curves", esc(caption)))


def validation_section(data: ReportData, figure_dir: Path) -> str:
    """Each task's validation metrics over steps, best step marked."""
    records = data.history.validation
    if not records:
        return section("Validation metrics", note("metrics.jsonl has no validation records yet."))
    best_step = data.best["step"] if data.best else None
    tasks = [(spec.name, spec.type) for spec in data.tasks]
    fig = viz.validation_curves(records, tasks, best_step, data.config.train.best_metric)
    caption = (
        f"{len(records)} evaluations of the validation split. The dashed line is the best step "
        f"({best_step}), whose weights are in best/."
    )
    return section("Validation metrics", figure(fig, figure_dir / "validation.png", "validation metrics", caption))


def checkpoint_intro(results: CheckpointResults) -> str:
    rows = f"{results.rows} validation rows" if results.rows >= 0 else "the validation stream"
    return f"Computed by re-evaluating {esc(results.directory)} on {rows}."


def confusion_section(data: ReportData, figure_dir: Path) -> str:
    """One confusion matrix per classification task (validation split, re-evaluated checkpoint)."""
    title = "Confusion matrices (validation)"
    results = data.checkpoint
    if results is None:
        return section(title, note(data.checkpoint_note))
    if not results.confusion:
        return section(title, note("The run has no classification task, so there is no confusion matrix."))
    body = f"<p>{checkpoint_intro(results)} Rows are the true label, columns the prediction.</p>"
    for task, matrix in results.confusion.items():
        labelled = sum(map(sum, matrix))
        fig = viz.confusion_matrix(task, results.labels[task], matrix, f"validation split, {labelled} labelled rows")
        body += figure(fig, figure_dir / file_name("confusion", task), f"{task} confusion matrix")
    return section(title, body)


def modality_section(data: ReportData, figure_dir: Path) -> str:
    """The primary metric of every task with both inputs, each removed, and both removed: table and bars."""
    title = "Modality contributions (validation)"
    results = data.checkpoint
    if results is None:
        return section(title, note(data.checkpoint_note))
    headers = ["task", "primary metric", *CONDITIONS.values()]
    rows = [
        [task, viz.metric_label(results.primary[task]), *(values[c] for c in CONDITIONS)]
        for task, values in results.modality.items()
    ]
    body = (
        f"<p>{checkpoint_intro(results)} A removed input is replaced by the model's learned placeholder. "
        "A task that drops when the image is removed relies on the image, and likewise for the text.</p>"
    )
    body += table(headers, rows, numeric_from=2)
    fig = viz.modality_bars(results.modality, results.primary, CONDITIONS)
    return section(title, body + figure(fig, figure_dir / "modality.png", "modality contributions"))


def fusion_section(data: ReportData, figure_dir: Path) -> str:
    """Gated fusion: gate histogram; cross-attention: attention maps; other fusions: why there is nothing."""
    fusion = data.config.model.fusion
    title = f"Fusion diagnostics ({fusion})"
    results = data.checkpoint
    if results is None:
        return section(title, note(data.checkpoint_note))
    if results.gates is not None:
        fig = viz.gate_histogram(results.gates)
        caption = (
            "Each fused dimension is g·image + (1 − g)·text. Values near 1 take the image, near 0 the text; "
            "a mass at 0.5 means the gate mixes both evenly (or has not learned to choose)."
        )
        return section(
            title,
            f"<p>{checkpoint_intro(results)}</p>"
            + figure(fig, figure_dir / "gates.png", "gate histogram", esc(caption)),
        )
    if fusion == "cross_attention":
        if not results.attention:
            return section(title, note(f"No attention maps: {results.attention_note}."))
        fig = viz.attention_maps(results.attention, results.attention_note)
        caption = (
            "Each map is how strongly the word's token attends to each image patch; per image the colour "
            "scale is shared by its words. Words are the most sharply focused content words of the caption."
        )
        return section(
            title,
            f"<p>{checkpoint_intro(results)}</p>"
            + figure(fig, figure_dir / "attention.png", "attention maps", esc(caption)),
        )
    return section(
        title,
        note(
            f"The {fusion} fusion has no gate values or attention weights to show: this section "
            "is drawn for gated (gate histogram) and cross_attention (attention maps) runs."
        ),
    )


def mistakes_section(data: ReportData, figure_dir: Path) -> str:
    """Per classification task, the most confident errors: gallery and a table with the full captions."""
    title = "Most confident errors (validation)"
    results = data.checkpoint
    if results is None:
        return section(title, note(data.checkpoint_note))
    if not results.mistakes:
        return section(title, note("The run has no classification task, so there are no errors to show."))
    body = (
        f"<p>{checkpoint_intro(results)} Per classification task, the {MISTAKES_SHOWN} wrong predictions with "
        "the highest predicted probability.</p>"
    )
    for task, mistakes in results.mistakes.items():
        body += f"<h3>{esc(task)}</h3>"
        if not mistakes:
            body += note(f"No {task} errors on the validation split.")
            continue
        body += figure(viz.error_gallery(task, mistakes), figure_dir / file_name("errors", task), f"{task} errors")
        rows = [[m.row, m.caption, m.true, m.predicted, m.probability] for m in mistakes]
        body += table(["row", "caption", "true", "predicted", "probability"], rows, numeric_from=4)
    return section(title, body)
