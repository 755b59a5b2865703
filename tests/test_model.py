"""FusionModel across every image encoder family x text encoder x fusion, plus the model-level contracts."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import tiny_batch, tiny_config
from safetensors.torch import load_file, save_file

from mmfusion import FusionConfig, FusionModel, TaskSpec
from mmfusion.fusions import FUSIONS
from mmfusion.losses import task_loss

TEXT_ENCODERS = ["lstm", "gru", "transformer", "hf"]
TORCHVISION_FAMILIES = ["resnet18", "efficientnet_b0", "convnext_tiny", "vit_b_16"]
# Fusions only ever see EncoderOutputs, so every text encoder x fusion runs on the small CNN, and each torchvision
# family (several seconds per model on a 2-core CPU) runs with a pooled-vector and a token-level fusion.
COMBINATIONS = [
    *itertools.product(["simple_cnn"], TEXT_ENCODERS, sorted(FUSIONS)),
    *itertools.product(TORCHVISION_FAMILIES, ["lstm"], ["cross_attention"]),
    ("resnet18", "hf", "gated"),
    ("vit_b_16", "transformer", "film"),
]


def _inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}


def _assert_logits_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=f"task {name}")


def _build(image, text, fusion, minilm_path) -> FusionModel:
    extra = {"text_model": minilm_path} if text == "hf" else {}
    torch.manual_seed(0)
    return FusionModel(tiny_config(image, text, fusion, **extra))


@pytest.mark.parametrize("image,text,fusion", COMBINATIONS)
def test_every_combination(image, text, fusion, minilm_path, tmp_path):
    model = _build(image, text, fusion, minilm_path)
    batch = tiny_batch()
    absent_image = torch.tensor([True, True, False, True])
    absent_text = torch.tensor([True, False, True, True])

    # Training step: every trainable parameter (placeholders and deep-supervision heads included) gets a gradient.
    model.train()
    out = model(**batch, image_present=absent_image, text_present=absent_text)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"

    model.eval()
    with torch.no_grad():
        reference = model(**_inputs(batch)).logits
        assert reference["topic"].shape == (4, 3) and reference["score"].shape == (4,)
        assert reference["tags"].shape == (4, 4) and reference["pair"].shape == (4, 4)
        # Deterministic in eval mode.
        _assert_logits_close(model(**_inputs(batch)).logits, reference, atol=0)

        # Padding the text further changes nothing.
        padded = dict(_inputs(batch))
        padded["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, 7))
        padded["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, 7))
        _assert_logits_close(model(**padded).logits, reference)

        # Shuffling the batch permutes the outputs the same way.
        order = torch.tensor([2, 0, 3, 1])
        shuffled = model(**{k: v[order] for k, v in _inputs(batch).items()}).logits
        for name, logits in reference.items():
            expected = logits[order][:, order] if name == "pair" else logits[order]
            torch.testing.assert_close(shuffled[name], expected, atol=1e-5, rtol=1e-4, msg=f"task {name}")

        # Save and load give identical outputs.
        model.save_pretrained(tmp_path / "ckpt")
        loaded = FusionModel.from_pretrained(tmp_path / "ckpt").eval()
        _assert_logits_close(loaded(**_inputs(batch)).logits, reference, atol=0)


@pytest.mark.parametrize("deep_supervision", [False, True])
@pytest.mark.parametrize("text,fusion", list(itertools.product(TEXT_ENCODERS, sorted(FUSIONS))))
def test_every_parameter_gets_a_gradient_with_and_without_deep_supervision(text, fusion, deep_supervision, minilm_path):
    """A parameter without a gradient crashes DDP at its second step; a fusion layer that no head reads must not
    leave a dangling read-out behind."""
    extra = {"text_model": minilm_path} if text == "hf" else {}
    tasks = [
        TaskSpec("topic", num_labels=3, depths=[0, 1] if deep_supervision else None),
        TaskSpec("score", type="regression"),
        TaskSpec("pair", type="matching"),
    ]
    torch.manual_seed(0)
    model = FusionModel(tiny_config("simple_cnn", text, fusion, tasks=tasks, **extra)).train()
    model(**tiny_batch()).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient: {missing}"


DENSE_IMAGE_ENCODERS = {
    "cnn": {"image_encoder": "simple_cnn"},  # stage maps at strides 2 and 4: skip connections
    "vit": {"image_encoder": "timm", "image_model": "test_vit"},  # patch tokens as one map: upsampling stages
}


@pytest.mark.parametrize("family", sorted(DENSE_IMAGE_ENCODERS))
@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_dense_maps_with_every_fusion_and_image_encoder_family(fusion, family, tmp_path):
    """Segmentation (deep supervision on two decoder stages) and dense regression at stride 2 beside a per-pair
    task: maps of the right shape, a gradient for every parameter (absent images and texts too), the text changes
    the maps once trained a step, and save/load keeps them."""
    tasks = [
        TaskSpec("seg", "segmentation", num_labels=3, depths=[0, -1], dice_weight=0.5),
        TaskSpec("depth", "dense_regression", output_stride=2),
        TaskSpec("topic", num_labels=3),
    ]
    torch.manual_seed(0)
    model = FusionModel(tiny_config(fusion=fusion, tasks=tasks, **DENSE_IMAGE_ENCODERS[family])).train()
    batch = tiny_batch()
    generator = torch.Generator().manual_seed(1)
    seg = torch.randint(0, 3, (4, 32, 32), generator=generator)
    seg[0, :4] = 255
    depth = torch.rand(4, 16, 16, generator=generator)
    depth[1, 0] = float("nan")
    labels = {"seg": seg, "depth": depth, "topic": batch["labels"]["topic"]}
    present = {
        "image_present": torch.tensor([True, True, False, True]),
        "text_present": torch.tensor([True, False, True, True]),
    }
    out = model(**_inputs(batch), labels=labels, **present)
    assert out.logits["seg"].shape == (4, 3, 32, 32) and out.logits["depth"].shape == (4, 16, 16)
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no (finite) gradient: {missing}"
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.eval()
    with torch.no_grad():
        reference = model(**_inputs(batch)).logits
        other_text = {
            **_inputs(batch),
            "input_ids": batch["input_ids"].roll(1, 0),
            "attention_mask": batch["attention_mask"].roll(1, 0),
        }
        assert not torch.allclose(model(**other_text).logits["seg"], reference["seg"])
        model.save_pretrained(tmp_path / "ckpt")
        loaded = FusionModel.from_pretrained(tmp_path / "ckpt").eval()
        _assert_logits_close(loaded(**_inputs(batch)).logits, reference, atol=0)


def test_checkpoints_with_unread_fusion_read_outs_still_load(tmp_path):
    """mmfusion 0.1 saved a cross_attention read-out at every layer; the unread one is dropped on loading."""
    torch.manual_seed(0)
    config = tiny_config(fusion="cross_attention", tasks=[TaskSpec("topic", num_labels=3)])
    model = FusionModel(config).eval()
    model.save_pretrained(tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert "fusion.out.1.weight" in weights and "fusion.out.0.weight" not in weights
    save_file(
        {**weights, "fusion.out.0.weight": torch.zeros(32, 64), "fusion.out.0.bias": torch.zeros(32)},
        tmp_path / "ckpt" / "model.safetensors",
    )
    batch = _inputs(tiny_batch())
    _assert_logits_close(
        FusionModel.from_pretrained(tmp_path / "ckpt").eval()(**batch).logits, model(**batch).logits, 0
    )


def _with_labels(batch: dict, **replace) -> dict:
    return {**batch, "labels": {**batch["labels"], **replace}}


def test_cnn_encoders_run_channels_last_everywhere_and_agree_with_nchw(tmp_path):
    torch.manual_seed(0)
    model = FusionModel(tiny_config("simple_cnn", "gru", "concat")).eval()
    conv = next(m for m in model.image_encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert model.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last)
    batch = _inputs(tiny_batch())
    with torch.no_grad():
        nhwc = model(**batch).logits
        model.save_pretrained(tmp_path / "ckpt")
        loaded = FusionModel.from_pretrained(tmp_path / "ckpt").eval()  # what evaluate, report and predict load
        assert loaded.channels_last and next(
            m for m in loaded.image_encoder.modules() if isinstance(m, torch.nn.Conv2d)
        ).weight.is_contiguous(memory_format=torch.channels_last)
        _assert_logits_close(loaded(**batch).logits, nhwc, atol=0)
        nchw = model.use_channels_last(False)(**batch).logits
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)
    _assert_logits_close(nchw, nhwc)  # the layout changes speed, not results (beyond float rounding)


def test_deep_supervision_heads_only_in_training_loss():
    model = _build("simple_cnn", "gru", "concat", None)  # topic has heads at depths 0 and 1 (dropout 0)
    batch = tiny_batch()
    model.train()
    train_out = model(**batch)
    model.eval()
    eval_out = model(**batch)
    aux_head = model.aux_heads["topic"]["0"]
    fused = model.fusion(model.encode(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]))

    aux = task_loss(
        model.tasks["topic"], aux_head(fused.layers[0]), batch["labels"]["topic"], batch["labels"]["topic"] >= 0
    )
    torch.testing.assert_close(train_out.task_losses["topic"], eval_out.task_losses["topic"] + 0.5 * aux)
    torch.testing.assert_close(train_out.logits["topic"], eval_out.logits["topic"])  # the main head decides
    eval_out.loss.backward()
    assert all(p.grad is None for p in model.aux_heads.parameters())


def test_the_default_model_trains_without_dropout():
    """model.dropout defaults to 0 (chosen on the suite, benchmarks/results/recipes_no_dropout_suite.md): a default
    fusion and its heads in training mode give the same logits for the same batch twice."""
    model = FusionModel(tiny_config(fusion=FusionConfig.fusion, dropout=FusionConfig.dropout)).train()
    batch = tiny_batch()
    first, second = model(**batch).logits, model(**batch).logits
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)


@pytest.mark.parametrize("regression_dropout", [0.0, 0.5])
def test_regression_heads_have_their_own_dropout_off_by_default(regression_dropout):
    """Dropout before a regression output is `regression_dropout` (0: its training predictions are the evaluated
    ones); the other heads keep model.dropout."""
    model = FusionModel(tiny_config(dropout=0.5, regression_dropout=regression_dropout)).train()
    torch.manual_seed(0)
    features = torch.randn(64, 32)
    assert not torch.equal(model.heads["topic"](features), model.heads["topic"](features))
    score_train = model.heads["score"](features)
    assert torch.equal(score_train, model.heads["score"](features)) == (regression_dropout == 0)
    assert torch.equal(score_train, model.heads["score"].eval()(features)) == (regression_dropout == 0)


def test_missing_labels_for_a_whole_batch_give_zero_not_nan():
    model = _build("simple_cnn", "lstm", "gated", None)
    batch = _with_labels(tiny_batch(), topic=torch.full((4,), -1), score=torch.full((4,), float("nan")))
    out = model(**batch)
    assert out.task_losses["topic"].item() == 0.0 and out.task_losses["score"].item() == 0.0
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_task_weights_scale_the_total_loss():
    model = _build("simple_cnn", "lstm", "concat", None).eval()
    batch = tiny_batch()
    out = model(**batch)
    model.config.tasks[2].weight = 3.0  # score
    weighted = model(**batch)
    torch.testing.assert_close(weighted.loss, out.loss + 2.0 * out.task_losses["score"])


def test_absent_modality_uses_the_placeholder():
    model = _build("simple_cnn", "lstm", "concat", None).eval()
    batch = tiny_batch()
    absent = torch.tensor([False, True, True, True])
    out = model(**_inputs(batch), image_present=absent)
    noise = dict(_inputs(batch), pixel_values=torch.randn_like(batch["pixel_values"]) * 100)
    out_noise = model(**noise, image_present=absent)
    # the absent image's pixels are ignored; present ones are not
    torch.testing.assert_close(out.logits["topic"][0], out_noise.logits["topic"][0])
    assert not torch.allclose(out.logits["topic"][1], out_noise.logits["topic"][1])


def test_frozen_encoders_get_no_gradient_and_stay_in_eval_mode():
    model = FusionModel(tiny_config("resnet18", "lstm", "concat", freeze_image=True, freeze_text=True))
    model.train()
    assert not model.image_encoder.training and not model.text_encoder.training and model.fusion.training
    model(**tiny_batch()).loss.backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert all(p.grad is not None for p in model.fusion.parameters())
    assert model.num_parameters(trainable_only=True) < model.num_parameters()


def test_issue_example_works_as_written(tmp_path):
    from mmfusion import FusionConfig, TaskSpec

    cfg = FusionConfig(
        image_encoder="simple_cnn",
        text_encoder="lstm",
        fusion="gated",
        dim=128,
        vocab_size=1000,
        tasks=[TaskSpec(name="topic", type="classification", num_labels=3), TaskSpec(name="score", type="regression")],
    )
    model = FusionModel(cfg)
    images, ids, mask = torch.randn(2, 3, 64, 64), torch.randint(1, 1000, (2, 7)), torch.ones(2, 7)
    y, s = torch.tensor([0, 2]), torch.tensor([0.5, 1.5])
    out = model(pixel_values=images, input_ids=ids, attention_mask=mask, labels={"topic": y, "score": s})
    out.loss.backward()
    assert out.logits["topic"].shape == (2, 3)
    model.save_pretrained(tmp_path / "ckpt")
    same = FusionModel.from_pretrained(tmp_path / "ckpt")
    model.eval(), same.eval()
    torch.testing.assert_close(same(images, ids, mask).logits["topic"], model(images, ids, mask).logits["topic"])
    assert "gate" in model(images, ids, mask).extras and model(images, ids, mask).extras["gate"].shape == (2, 128)


def test_config_choices_match_the_registries():
    import typing

    from mmfusion.config import FusionName, ImageEncoderName, TextEncoderName
    from mmfusion.image_encoders import IMAGE_ENCODERS
    from mmfusion.text_encoders import TEXT_ENCODERS

    assert set(typing.get_args(FusionName)) == set(FUSIONS)
    assert set(typing.get_args(ImageEncoderName)) == set(IMAGE_ENCODERS)
    assert set(typing.get_args(TextEncoderName)) == set(TEXT_ENCODERS)
