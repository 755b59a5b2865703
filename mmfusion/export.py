"""ONNX export of a checkpoint, and `OnnxFusionModel`, which runs the exported graph with onnxruntime.

    mmfusion export runs/mine/best --format onnx --output exported/
    Predictor.from_pretrained("exported/", backend="onnx").predict(["cat.png"], ["a cat"])

The output directory is self-describing: `model.onnx`, and beside it the checkpoint's `config.json` (tasks, labels,
regression statistics), `processor.json` and `tokenizer.json`. Graph inputs: pixel_values float32 [B, 3, S, S],
input_ids int64 [B, T], attention_mask int64 [B, T], image_present and text_present bool [B] (False: the learned
placeholder replaces that modality); B and T are dynamic. Outputs: `logits.<task>` per task, and for a matching
task `matching_embeddings.<task>` [B, 2E] (image half, then text half) instead of its B x B similarity matrix.

The exporter is torch's TorchScript-based one (`torch.onnx.export(dynamo=False)`): the torch.export-based default
cannot export the RNN encoders (packed sequences need their lengths as data, not shapes), and it takes ~50x longer
on a small model. The TorchScript exporter writes RNNs over packed sequences as ONNX LSTM/GRU nodes with
`sequence_lens`, so padding never changes a sample's output, as in torch.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import FusionConfig, TaskSpec
from .errors import CheckpointError, InputError
from .hub import resolve_checkpoint
from .layers import EncoderOutput
from .model import MODEL_CONFIG_NAME, FusionModel, FusionOutput, read_model_config
from .processing import FusionProcessor
from .text_encoders import RNNEncoder

ONNX_NAME = "model.onnx"
OPSET = 17
TOLERANCE = 1e-3  # largest |onnxruntime - torch| accepted on the check batch (measured: below 1e-4)
INPUTS = ("pixel_values", "input_ids", "attention_mask", "image_present", "text_present")
DYNAMIC_AXES = {
    "pixel_values": {0: "batch"},
    "input_ids": {0: "batch", 1: "length"},
    "attention_mask": {0: "batch", 1: "length"},
    "image_present": {0: "batch"},
    "text_present": {0: "batch"},
}


class ExportError(InputError):
    """The model cannot be written as ONNX, or the written graph does not compute what the model does."""


@dataclass
class Exported:
    path: Path  # model.onnx
    max_difference: float  # largest |onnxruntime - torch| over every output on a check batch


def output_name(spec: TaskSpec) -> str:
    """The graph output that carries a task's result."""
    return f"matching_embeddings.{spec.name}" if spec.type == "matching" else f"logits.{spec.name}"


def task_outputs(output: FusionOutput, tasks: list[TaskSpec]) -> tuple[torch.Tensor, ...]:
    """Each task's exported result, in task order: its logits, or a matching task's embeddings."""
    matching = output.extras["matching_embeddings"]
    return tuple(matching[spec.name] if spec.type == "matching" else output.logits[spec.name] for spec in tasks)


class ExportGraph(nn.Module):
    """FusionModel.forward with positional inputs and a flat tuple of outputs: what the exporter traces."""

    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values, input_ids, attention_mask, image_present, text_present) -> tuple:
        output = self.model(
            pixel_values, input_ids, attention_mask, image_present=image_present, text_present=text_present
        )
        return task_outputs(output, self.model.config.tasks)


class RNNReadFromSequence(nn.Module):
    """An RNN encoder whose pooled vector is read from its output sequence (forward direction at the last real
    token, backward direction at the first): the very numbers of its final hidden state. The TorchScript exporter
    fails on a packed RNN whose output sequence is unused, which it is behind pooled-only fusions (concat)."""

    def __init__(self, encoder: RNNEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        encoded = self.encoder(input_ids, attention_mask)
        last = (encoded.mask.sum(1).clamp(min=1) - 1).view(-1, 1, 1)
        tokens = encoded.tokens
        forward = tokens.gather(1, last.expand(-1, 1, tokens.shape[-1])).squeeze(1)
        if not self.encoder.rnn.bidirectional:
            return EncoderOutput(pooled=forward, tokens=tokens, mask=encoded.mask)
        half = self.encoder.rnn.hidden_size
        pooled = torch.cat([forward[:, :half], tokens[:, 0, half:]], dim=-1)
        return EncoderOutput(pooled=pooled, tokens=tokens, mask=encoded.mask)


def example_inputs(processor: FusionProcessor, batch: int = 2, length: int = 4, seed: int = 0) -> tuple:
    """Random model inputs: texts of different lengths, every third row without its image, every fourth without
    its text."""
    size = processor.settings.image_size
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, processor.vocab_size, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2 :] = 0
    image_present = torch.arange(batch) % 3 != 2
    text_present = torch.arange(batch) % 4 != 3
    mask[~text_present] = 0
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    return pixels, ids * mask, mask, image_present, text_present


def max_difference(model: FusionModel, exported: OnnxFusionModel, inputs: tuple) -> float:
    """Largest absolute difference between the model's and the exported graph's outputs on `inputs`."""
    names = dict(zip(("image_present", "text_present"), inputs[3:]))
    with torch.no_grad():
        expected = task_outputs(model.eval()(*inputs[:3], **names), model.config.tasks)
    found = task_outputs(exported(*inputs), model.config.tasks)
    return max(float((a - b).abs().max()) for a, b in zip(expected, found))


def write_onnx(model: FusionModel, processor: FusionProcessor, path: str | os.PathLike, opset: int = OPSET) -> Path:
    """Trace `model` (eval mode) into an ONNX file with dynamic batch and text length."""
    model = model.eval()
    names = [output_name(spec) for spec in model.config.tasks]
    text_encoder = model.text_encoder
    if isinstance(text_encoder, RNNEncoder):
        model.text_encoder = RNNReadFromSequence(text_encoder)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # nn.MultiheadAttention's fused kernel (ViT) has no ONNX form
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The legacy exporter announces its deprecation; the tracer notes shape checks it fixes as constants
            # (e.g. the transformer's length limit, which the processor's truncation keeps anyway); RNNs and
            # BERT's indexing come with generic cautions. export_onnx's check batch (another batch size and text
            # length, absent modalities) and the parity tests show the graphs compute what the model does.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
            warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
            torch.onnx.export(
                ExportGraph(model),
                example_inputs(processor),
                str(path),
                input_names=list(INPUTS),
                output_names=names,
                dynamic_axes={**DYNAMIC_AXES, **{name: {0: "batch"} for name in names}},
                opset_version=opset,
                dynamo=False,
            )
    except torch.onnx.errors.OnnxExporterError as error:  # e.g. an operator without an ONNX form
        encoders = f"{type(model.image_encoder).__name__} + {type(text_encoder).__name__}"
        raise ExportError(f"cannot export the {encoders} model: {str(error).splitlines()[0]}") from None
    finally:
        model.text_encoder = text_encoder
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return Path(path)


def export_onnx(checkpoint: str | os.PathLike, output: str | os.PathLike, opset: int = OPSET) -> Exported:
    """`mmfusion export`: the checkpoint's model as `output/model.onnx`, with its config and processor files.
    The graph is then run on a check batch of another size and text length than the traced one, with absent
    images and texts; it must give the model's outputs (up to TOLERANCE) in torch's NCHW layout, the exact one
    (benchmarks/export.py: the channels_last path's GroupNorm drifts up to ~3e-4 from float64 on CPU)."""
    directory = resolve_checkpoint(str(checkpoint))
    model = FusionModel.from_pretrained(directory)
    processor = FusionProcessor.from_pretrained(directory)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    path = write_onnx(model, processor, output / ONNX_NAME, opset)
    processor.save_pretrained(output)
    shutil.copyfile(directory / MODEL_CONFIG_NAME, output / MODEL_CONFIG_NAME)
    model.use_channels_last(False)  # the reference: torch's channels_last GroupNorm on CPU is ~1e-4 off exact
    difference = max_difference(model, OnnxFusionModel(model.config, path), example_inputs(processor, 5, 7, seed=1))
    if not difference <= TOLERANCE:
        raise ExportError(f"{path}: onnxruntime's outputs differ from torch's by {difference:.3g} on a check batch")
    return Exported(path, difference)


class OnnxFusionModel(nn.Module):
    """An exported graph behind FusionModel's call: tensors in, a FusionOutput with each task's logits and the
    matching embeddings out (a matching task has no logits here). It has no parameters, so `.to()`, `.eval()`
    and accelerate's `prepare` leave it as it is, and Predictor and `evaluation.evaluate` run it unchanged."""

    def __init__(self, config: FusionConfig, path: str | os.PathLike) -> None:
        super().__init__()
        import onnxruntime

        self.config = config
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_names = {node.name for node in self.session.get_inputs()}

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> OnnxFusionModel:
        """Load `model.onnx` and `config.json` from a directory written by `export_onnx`."""
        directory = Path(directory)
        path = directory / ONNX_NAME
        if not path.is_file():
            raise CheckpointError(f"{path} not found: not an exported model directory (see mmfusion export)")
        return cls(read_model_config(directory), path)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_present: torch.Tensor | None = None,
        text_present: torch.Tensor | None = None,
    ) -> FusionOutput:
        everyone = torch.ones(pixel_values.shape[0], dtype=torch.bool)
        feeds = {
            "pixel_values": pixel_values.float(),
            "input_ids": input_ids.long(),
            "attention_mask": attention_mask.long(),
            "image_present": everyone if image_present is None else image_present.bool(),
            "text_present": everyone if text_present is None else text_present.bool(),
        }
        feeds = {name: np.ascontiguousarray(value.cpu().numpy()) for name, value in feeds.items()}
        names = [output_name(spec) for spec in self.config.tasks]
        values = self.session.run(names, {name: feeds[name] for name in INPUTS if name in self.input_names})
        logits, embeddings = {}, {}
        for spec, value in zip(self.config.tasks, values):
            (embeddings if spec.type == "matching" else logits)[spec.name] = torch.from_numpy(value)
        return FusionOutput(logits=logits, extras={"matching_embeddings": embeddings})
