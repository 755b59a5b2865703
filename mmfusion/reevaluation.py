"""A checkpoint re-evaluated on its run's validation split, for the report: the modality-contribution table (every
evaluation condition), confusion matrices, the most confident errors, gate values and cross-attention maps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import send_to_device

from . import viz
from .config import Config, TaskSpec
from .errors import InputError
from .evaluation import CONDITIONS, evaluate
from .metrics import PRIMARY_METRIC
from .model import FusionModel
from .predictor import label_names
from .prepare import load_split
from .processing import FusionProcessor
from .rows import FusionDataset, make_loader, model_inputs
from .runlog import RUN_CONFIG_NAME

ATTENTION_IMAGES = 4  # validation images of the cross-attention figure
ATTENTION_WORDS = 3  # caption words per image
MISTAKES_SHOWN = 6  # most confident errors per classification task
STOPWORDS = frozenset(
    "the and with near are its this that there these those has have was were for from into onto you your our "
    "how what which here see seen shows show contains scene image picture photo very just some".split()
)  # left out of the attention figure's word choice, which prefers words that name things


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


@dataclass
class ValidationRows:
    """The run's validation split, encoded with the checkpoint's processor, and how to show its rows."""

    dataset: torch.utils.data.Dataset
    processor: FusionProcessor
    text_column: str
    device: torch.device
    batch_size: int

    def loader(self, batch_size: int | None = None) -> torch.utils.data.DataLoader:
        """The rows in order, as training's evaluation batches them (the same padding, the same numbers)."""
        return make_loader(self.dataset, batch_size or self.batch_size, self.processor.settings.pad_id, False, 0)

    def batches(self, batch_size: int | None = None):
        """Batches on the device, each row with its `position` in the dataset."""
        start = 0
        for batch in self.loader(batch_size):
            size = len(batch["row"])
            batch["position"] = torch.arange(start, start + size)  # rows are never shuffled here
            start += size
            yield send_to_device(batch, self.device)

    def picture(self, batch: dict, i: int) -> np.ndarray:
        """Row i's image as the model saw it, [S, S, 3] RGB in [0, 1]."""
        return self.processor.picture(batch["pixel_values"][i])

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
    data = config.data if data_path is None else dataclasses.replace(config.data, path=data_path)
    if not Path(data.path).exists():
        raise InputError(
            f"data.path {data.path!r} of the run's {RUN_CONFIG_NAME} not found (a relative path starts from the "
            f"working directory {Path.cwd()}); give the data's location with --data_path"
        )
    dataset, _ = load_split(data, "validation", processor, model.config.tasks)
    batch_size = batch_size or config.train.eval_batch_size  # as in training: the same padding, the same numbers
    return ValidationRows(dataset, processor, data.text_column, device, batch_size)


def modality_table(model: FusionModel, rows: ValidationRows) -> tuple[dict, dict]:
    """Each task's primary metric with both modalities, each one removed and both removed; and the confusion
    matrices of the pass with both."""
    tasks = model.config.tasks
    results = evaluate(model, rows.loader(), None, tasks, tuple(CONDITIONS))
    table = {spec.name: {} for spec in tasks}
    for condition, metrics in results.items():
        computed = metrics.compute()
        for spec in tasks:
            table[spec.name][condition] = computed[spec.name].get(PRIMARY_METRIC[spec.type][0])
    return table, results["both"].confusion_matrices()


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
    directory: Path,
    config: Config,
    data_path: str | None,
    batch_size: int | None,
    device: torch.device,
    validation: torch.utils.data.Dataset | None = None,
) -> CheckpointResults:
    """Re-evaluate a checkpoint on the run's validation split for the report's checkpoint sections (`validation`:
    the split as training prepared it, instead of reading the data again)."""
    model = FusionModel.from_pretrained(directory).to(device).eval()
    processor = FusionProcessor.from_pretrained(directory)
    if validation is None:
        rows = validation_rows(config, model, processor, data_path, device, batch_size)
    else:
        size = batch_size or config.train.eval_batch_size
        rows = ValidationRows(validation, processor, processor.settings.text_column, device, size)
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
