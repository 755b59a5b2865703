"""ONNX export: onnxruntime's outputs equal torch's (1e-4) on the sample test split for every fusion and the small
text encoders, with images and texts missing in some rows; the exported directory runs the Predictor."""

from __future__ import annotations

import json
import math

import onnx
import pytest
import torch
from helpers import SAMPLE, same_prediction, sample_checkpoint

from mmfusion.cli import main
from mmfusion.config import DataConfig
from mmfusion.export import ONNX_NAME, OnnxFusionModel, RNNReadFromSequence, export_onnx, task_outputs
from mmfusion.model import FusionModel
from mmfusion.predictor import Predictor
from mmfusion.prepare import load_split
from mmfusion.processing import FusionProcessor
from mmfusion.rows import Collator, model_inputs
from mmfusion.text_encoders import RNNEncoder

TOLERANCE = 1e-4
MODELS = [
    ("lstm", "concat"),
    ("lstm", "gated"),
    ("lstm", "cross_attention"),
    ("lstm", "film"),
    ("lstm", "bilinear"),
    ("lstm", "late"),
    ("gru", "gated"),
    ("transformer", "cross_attention"),
    ("hf", "concat"),
]


def largest_difference(checkpoint, exported, rows: int | None = None) -> float:
    """Over the sample test split (its first `rows`) in batches of 100, a fifth of the images and some texts removed.
    Against torch in NCHW layout: on CPU its channels_last GroupNorm is itself up to ~3e-4 off the float64 result
    (benchmarks/export.py), onnxruntime ~1e-5."""
    model = FusionModel.from_pretrained(checkpoint).eval().use_channels_last(False)
    onnx_model = OnnxFusionModel.from_pretrained(exported)
    processor = FusionProcessor.from_pretrained(checkpoint)
    dataset, _ = load_split(DataConfig(path=str(SAMPLE)), "test", processor, model.config.tasks)
    dataset = torch.utils.data.Subset(dataset, range(rows or len(dataset)))
    generator = torch.Generator().manual_seed(0)
    largest = 0.0
    for batch in torch.utils.data.DataLoader(dataset, batch_size=100, collate_fn=Collator(processor.settings.pad_id)):
        inputs = model_inputs(batch)
        size = len(batch["row"])
        inputs["image_present"] = torch.rand(size, generator=generator) > 0.2
        inputs["text_present"] = ~inputs["image_present"] | (torch.rand(size, generator=generator) > 0.2)
        with torch.no_grad():
            expected = task_outputs(model(**inputs), model.config.tasks)
        found = task_outputs(onnx_model(**inputs), model.config.tasks)
        largest = max(largest, *(float((a - b).abs().max()) for a, b in zip(expected, found)))
    return largest


@pytest.mark.parametrize(("text_encoder", "fusion"), MODELS)
def test_onnxruntime_equals_torch_on_the_sample_test_split(text_encoder, fusion, tmp_path, request):
    extra = {"text_model": request.getfixturevalue("minilm_path")} if text_encoder == "hf" else {}
    checkpoint = sample_checkpoint(tmp_path / "best", "simple_cnn", text_encoder, fusion, **extra)
    exported = export_onnx(checkpoint, tmp_path / "onnx")
    assert exported.max_difference <= TOLERANCE
    rows = 200 if text_encoder == "hf" else None  # MiniLM costs ~100x the small encoders: the first 200 rows
    assert largest_difference(checkpoint, tmp_path / "onnx", rows) <= TOLERANCE


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_rnn_pooled_read_from_the_sequence_is_the_final_state(cell, bidirectional):
    torch.manual_seed(0)
    encoder = RNNEncoder(cell, 30, 8, 2, bidirectional, 0.0).eval()
    mask = (torch.arange(7)[None] < torch.tensor([7, 3, 1, 5])[:, None]).long()
    ids = torch.randint(1, 30, (4, 7)) * mask
    with torch.no_grad():
        assert torch.equal(RNNReadFromSequence(encoder)(ids, mask).pooled, encoder(ids, mask).pooled)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A checkpoint and its export through the command line."""
    directory = tmp_path_factory.mktemp("export")
    checkpoint = sample_checkpoint(directory / "best", fusion="gated")
    assert main(["export", str(checkpoint), "--format", "onnx", "--output", str(directory / "onnx")]) == 0
    return checkpoint, directory / "onnx"


def test_the_export_directory_describes_itself(exported, capsys):
    checkpoint, directory = exported
    assert sorted(p.name for p in directory.iterdir()) == [
        "config.json",
        ONNX_NAME,
        "processor.json",
        "tokenizer.json",
    ]
    assert (directory / "config.json").read_text() == (checkpoint / "config.json").read_text()
    graph = onnx.load(str(directory / ONNX_NAME)).graph
    shapes = {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim] for value in graph.input
    }
    assert shapes == {
        "pixel_values": ["batch", 3, 32, 32],
        "input_ids": ["batch", "length"],
        "attention_mask": ["batch", "length"],
        "image_present": ["batch"],
        "text_present": ["batch"],
    }
    names = [value.name for value in graph.output]
    expected = [f"logits.{name}" for name in ("area", "background", "colors", "match", "tone")]
    assert names == [*expected, "matching_embeddings.pair"]


def test_the_onnx_predictor_predicts_and_evaluates_as_the_torch_one(exported):
    checkpoint, directory = exported
    torch_predictor = Predictor.from_pretrained(checkpoint, device="cpu")
    onnx_predictor = Predictor.from_pretrained(directory, backend="onnx")
    rows = [json.loads(line) for line in (SAMPLE / "test" / "metadata.jsonl").read_text().splitlines()[:40]]
    images = [None if i % 7 == 0 else row["file_name"] for i, row in enumerate(rows)]  # some rows without an image,
    texts = [None if i % 9 == 4 else row["caption"] for i, row in enumerate(rows)]  # some without a text
    expected = torch_predictor.predict(images, texts, image_root=SAMPLE / "test")
    found = onnx_predictor.predict(images, texts, image_root=SAMPLE / "test")
    for i, (got, want) in enumerate(zip(found, expected)):
        assert same_prediction(got, want, TOLERANCE), f"row {i}: {got} != {want}"
    metrics = onnx_predictor.evaluate(str(SAMPLE), split="test")
    reference = torch_predictor.evaluate(str(SAMPLE), split="test")
    for task, values in reference.items():  # 0.005: a label decided by a near-tie may flip in a row or two of 500
        if isinstance(values, dict):
            assert values.keys() == metrics[task].keys()
            assert all(math.isclose(values[k], metrics[task][k], abs_tol=5e-3) for k in values), task


def test_an_onnx_directory_without_a_graph_is_a_clear_error(tmp_path):
    from mmfusion.errors import CheckpointError

    checkpoint = sample_checkpoint(tmp_path / "best")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'best' / ONNX_NAME} not found: not an exported model"):
        Predictor.from_pretrained(checkpoint, backend="onnx")
