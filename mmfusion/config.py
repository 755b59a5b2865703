"""Typed configuration: the model (`FusionConfig`), its tasks (`TaskSpec`), data and training options.

One tree of dataclasses, `Config`; the attribute docstrings below are the `--help` text. `from_dict` builds
them from plain values naming any bad key; options.py reads YAML files and command lines into them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import tyro

TaskType = Literal["classification", "multilabel", "regression", "matching", "segmentation", "dense_regression"]
DENSE_TASK_TYPES = ("segmentation", "dense_regression")
"""Task types that predict a map per image (dense.py builds their heads) rather than one value per pair."""
# The registries' names (IMAGE_ENCODERS, TEXT_ENCODERS, FUSIONS, WEIGHTINGS), so --help lists them and typos stop early.
ImageEncoderName = Literal[
    "simple_cnn",
    "cnn_small",
    "cnn_base",
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet_b0",
    "convnext_tiny",
    "vit_b_16",
    "timm",
    "hf",
]
TextEncoderName = Literal["lstm", "gru", "transformer", "hf"]
FusionName = Literal["concat", "gated", "cross_attention", "film", "bilinear", "late"]
WeightingName = Literal["sum", "nll", "uncertainty", "dwa", "rlw", "gls", "pcgrad", "mgda", "cagrad", "gradnorm"]


@dataclass
class TaskSpec:
    """One prediction task: which column it reads, what kind of target, and how its head is built."""

    name: str
    """Task name, used as the key of logits, losses and metrics."""
    type: TaskType = "classification"
    """classification (one label), multilabel (a list of labels), regression (a float), matching (image-text),
    segmentation (a class per pixel, from a mask image) or dense_regression (a float per pixel)."""
    column: str | None = None
    """Dataset column holding the target (default: the task name); dense tasks: the mask file (path relative to the
    data, image bytes or a decoded image; dense_regression also .npy)."""
    num_labels: int | None = None
    """Number of classes (classification, multilabel, segmentation: mask ids 0..num_labels-1); filled from `labels`
    when given."""
    labels: list[str] | None = None
    """Class names in index order; built from the training split when not given."""
    weight: float = 1.0
    """Static loss weight."""
    depths: list[int] | None = None
    """Fusion layers that get a head (deep supervision), e.g. [0, 1]; default: the last layer only. Dense tasks:
    the decoder stages that get an output layer (0 = the coarsest), e.g. [0, -1]."""
    hidden_layers: int = 0
    """Task-specific MLP layers between the shared fusion output and the head's output layer."""
    label_smoothing: float | None = None
    """Label smoothing (classification, segmentation). Unset: train.label_smoothing for a classification task of a
    training run, 0 otherwise (`with_run_defaults`)."""
    class_weights: list[float] | None = None
    """Per-class loss weights for classification."""
    loss: Literal["mse", "huber", "l1", "silog"] | None = None
    """Regression and dense_regression loss: mse, huber, l1, or (dense_regression) silog, the scale-invariant log
    loss of positive targets (the head then predicts log values). Unset: train.regression_loss for a regression task
    of a training run, mse otherwise (`with_run_defaults`)."""
    dice_weight: float = 0.0
    """segmentation: the per-pixel cross-entropy plus this times the soft Dice loss (0: cross-entropy only)."""
    ignore_index: int = 255
    """segmentation: the mask id of unlabelled pixels (no loss, no metric)."""
    output_stride: int = 1
    """Dense tasks: maps are predicted at 1/output_stride of the input side (1: the input resolution); targets are
    resized to it by nearest neighbour."""
    value_scale: float = 1.0
    """dense_regression: the stored value times value_scale is the target (e.g. 1/256 for KITTI-style depth PNGs)."""
    invalid_value: float | None = None
    """dense_regression: a stored value that marks a pixel without a measurement (e.g. 0); NaN and inf always do."""
    target_mean: float = 0.0
    """Regression target mean (set from the training split); the head predicts standardised targets."""
    target_std: float = 1.0
    """Regression target standard deviation (set from the training split)."""

    def __post_init__(self) -> None:
        if self.column is None:
            self.column = self.name
        if self.labels is not None:
            self.labels = [str(label) for label in self.labels]
            if self.num_labels is None:
                self.num_labels = len(self.labels)
            elif self.num_labels != len(self.labels):
                raise ValueError(
                    f"task {self.name!r}: num_labels={self.num_labels} but {len(self.labels)} labels were given"
                )
        if self.type in ("classification", "multilabel", "segmentation") and (self.num_labels or 1) < 1:
            raise ValueError(f"task {self.name!r}: num_labels must be >= 1, got {self.num_labels}")
        clash = self.type == "segmentation" and 0 <= self.ignore_index < (self.num_labels or 0)
        smoothing = self.label_smoothing
        for bad, message in (
            (
                self.type in ("regression", "dense_regression") and self.target_std <= 0,
                f"target_std {self.target_std} <= 0",
            ),
            (self.loss == "silog" and self.type != "dense_regression", "loss silog is for dense_regression tasks"),
            (self.output_stride < 1, f"output_stride must be >= 1, got {self.output_stride}"),
            (self.dice_weight < 0, f"dice_weight must be >= 0, got {self.dice_weight}"),
            (smoothing is not None and not 0 <= smoothing < 1, f"label_smoothing must be in [0, 1), got {smoothing}"),
            (clash, f"ignore_index {self.ignore_index} is one of the {self.num_labels} class ids"),
        ):
            if bad:
                raise ValueError(f"task {self.name!r}: {message}")

    @property
    def is_dense(self) -> bool:
        """Whether the task predicts a map per image (segmentation, dense_regression)."""
        return self.type in DENSE_TASK_TYPES

    @property
    def out_features(self) -> int:
        """Width of the head's output layer."""
        if self.type in ("regression", "dense_regression"):
            return 1
        if self.type == "matching":
            return 0
        if self.num_labels is None:
            raise ValueError(f"task {self.name!r} ({self.type}) needs num_labels or labels")
        return self.num_labels

    @property
    def head_depths(self) -> list[int]:
        """Fusion depths with a head, deepest last (negative depths count from the end)."""
        return list(self.depths) if self.depths else [-1]


def with_run_defaults(
    tasks: list[TaskSpec],
    label_smoothing: float,
    regression_loss: str,
    class_balance: float = 0.0,
    label_counts: dict[str, list[int]] | None = None,
) -> list[TaskSpec]:
    """`tasks` with the fields a training run decides where a task leaves them unset: label_smoothing
    (`label_smoothing` for classification, 0 for every other type), loss (`regression_loss` for regression, mse
    for every other type) and, with `class_balance` > 0, a classification task's class_weights from its training
    label counts (`balanced_class_weights`)."""
    resolved = []
    for task in tasks:
        if task.label_smoothing is None:
            smoothing = label_smoothing if task.type == "classification" else 0.0
            task = dataclasses.replace(task, label_smoothing=smoothing)
        if task.loss is None:
            task = dataclasses.replace(task, loss=regression_loss if task.type == "regression" else "mse")
        if class_balance and task.type == "classification" and task.class_weights is None:
            counts = (label_counts or {})[task.name]
            task = dataclasses.replace(task, class_weights=balanced_class_weights(counts, class_balance))
        resolved.append(task)
    return resolved


def balanced_class_weights(counts: list[int], power: float) -> list[float]:
    """Per-class loss weights (n / (K n_k)) ** power from a task's training label counts n_k (n labelled rows, K
    classes): at 1 every class adds as much to the loss as any other, as macro-F1 counts them; a class with no
    training row gets the weight of a single row. Rounded to 6 digits, as config.yaml shows them."""
    total, classes = sum(counts), len(counts)
    return [round((total / (classes * max(count, 1))) ** power, 6) for count in counts]


@dataclass
class FusionConfig:
    """Everything needed to build a `FusionModel` (and nothing about data or training)."""

    image_encoder: ImageEncoderName = "simple_cnn"
    """From scratch: simple_cnn (plain conv stages, `image_widths`), or the residual CNNs cnn_small / cnn_base
    (GroupNorm, four downsampling stages); a torchvision backbone: resnet18, resnet34, resnet50, efficientnet_b0,
    convnext_tiny, vit_b_16; timm (any timm architecture, --model.image_model) or hf (a transformers vision model,
    --model.image_model)."""
    image_model: str | None = None
    """timm: an architecture name (resnet50: random weights unless --model.image_weights; resnet50.a1_in1k: that
    pretrained tag), hf-hub:timm/NAME, or a local directory with config.json and weights. hf: a local path or Hub id
    (ViT, DeiT, DINOv2, ConvNeXt, Swin, the vision tower of CLIP/SigLIP). Hub ids are read from the Hub cache."""
    pretrained: str | None = None
    """clip:PATH_OR_ID: both encoders from one CLIP/SigLIP model (any transformers model with vision_model and
    text_model), with its tokenizer and image processor; matching tasks start from its projections and temperature.
    Sets image_encoder and text_encoder to hf, image_model and text_model to the model, text_pooling to pooler."""
    image_widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    """simple_cnn: channels of each conv stage (the number of entries is the depth)."""
    image_weights: str | None = None
    """Local file with pretrained torchvision or timm weights (safetensors or a state dict); nothing is downloaded."""
    image_size: int | None = None
    """Input image side in pixels; the processor resizes to it. Unset: timm and hf encoders take their own input
    size (the model's data config or image processor), the others 64."""
    image_pooling: Literal["mean", "max"] = "max"
    """simple_cnn, cnn_small/base and torchvision CNNs: feature map to one vector by mean, or max (the default: better
    at small objects, and the better recipe on the benchmark suite, benchmarks/results/recipes_dropout_v0.md).
    torchvision ViTs use their class token; timm and hf encoders their own pooling."""
    freeze_image: bool = False
    """Keep the image encoder's weights fixed."""
    decoder_dim: int = 64
    """Dense tasks: channels of each task's decoder (dense.py), which upsamples the image encoder's feature maps
    conditioned on the fused representation."""
    image_lora_rank: int = 0
    """timm and hf image encoders: train LoRA adapters of this rank (peft) instead of the encoder's weights (0: off);
    they train at --train.encoder_lr."""
    image_lora_targets: list[str] | None = None
    """Modules that get image LoRA adapters (peft target_modules names). Unset: the attention projections
    (q_proj/k_proj/v_proj, query/key/value, qkv); for CNNs, every convolution (not depthwise) and linear layer."""
    text_encoder: TextEncoderName = "lstm"
    """lstm, gru, transformer (from scratch) or hf (a Hugging Face transformers encoder)."""
    text_model: str | None = None
    """hf: local path or Hub id of the transformers model."""
    text_pooling: Literal["mean", "cls", "pooler"] = "mean"
    """How token features become one vector: masked mean, the first token, or (hf) the model's own pooled output
    (CLIP: the end-of-text token; SigLIP: its head)."""
    text_dim: int = 128
    """lstm/gru/transformer: hidden width (per direction for RNNs)."""
    text_layers: int = 1
    """lstm/gru/transformer: number of layers."""
    text_heads: int = 4
    """transformer: attention heads."""
    bidirectional: bool = True
    """lstm/gru: read the text in both directions."""
    vocab_size: int = 8000
    """lstm/gru/transformer: vocabulary size (set from the trained tokenizer)."""
    max_text_length: int = 64
    """transformer: longest text (number of position embeddings)."""
    freeze_text: bool = False
    """Keep the text encoder's weights fixed."""
    text_lora_rank: int = 0
    """hf text encoders: train LoRA adapters of this rank (peft) instead of the encoder's weights (0: off)."""
    text_lora_targets: list[str] | None = None
    """Modules that get text LoRA adapters (peft target_modules names). Unset: the attention projections."""
    lora_save: Literal["separate", "merged"] = "separate"
    """Checkpoints of LoRA models: adapters kept as their own tensors (the model reloads with them, trainable), or
    merged into the encoder weights (a plain model: no adapters, faster inference). Both load with from_pretrained."""
    gradient_checkpointing: bool = False
    """timm and hf encoders: recompute activations in the backward pass instead of storing them (less memory, about
    a third more compute)."""
    fusion: FusionName = "gated"
    """concat, gated (the default: a learned per-feature gate between the modalities), cross_attention, film,
    bilinear or late."""
    dim: int = 128
    """Width of the fused representation."""
    fusion_layers: int = 2
    """Depth of the fusion trunk; every layer's output can carry a head."""
    fusion_heads: int = 4
    """cross_attention: attention heads."""
    rank: int = 16
    """bilinear: rank of the low-rank factorisation."""
    dropout: float = 0.0
    """Dropout in fusion layers and heads (regression heads: `regression_dropout`). Off by default: the suite's models
    scored higher without it (benchmarks/results/recipes_no_dropout_suite.md; 0.1 before)."""
    regression_dropout: float = 0.0
    """Dropout in regression heads. Off by default: dropout before a regression output makes the predictions it
    trains on noisier than those it is evaluated on (measured on the suite:
    benchmarks/results/recipes_dropout_v0.md)."""
    tasks: tyro.conf.Suppress[list[TaskSpec]] = field(default_factory=list)
    """The tasks the model predicts. In a run configuration they are given at the top level (`tasks:`), and the
    trainer builds the model with them (`Config.model_config()`)."""
    text_model_config: tyro.conf.Suppress[dict[str, Any] | None] = None
    """hf: the transformers config, stored so a checkpoint rebuilds without the original model files."""
    image_model_config: tyro.conf.Suppress[dict[str, Any] | None] = None
    """timm and hf: the architecture (timm: name, model_args, pretrained_cfg; hf: the transformers config), stored so
    a checkpoint rebuilds without the original model files."""

    def __post_init__(self) -> None:
        self.tasks = [t if isinstance(t, TaskSpec) else TaskSpec(**t) for t in self.tasks]
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"task names must be unique; repeated: {duplicates}")

    def task_depths(self, spec: TaskSpec) -> list[int]:
        """The fusion layers `spec`'s heads read, as sorted non-negative indices, deepest last (a dense task's head
        reads the last; its `depths` are decoder stages)."""
        layers = self.fusion_layers
        if spec.is_dense:
            return [layers - 1]
        for depth in spec.head_depths:
            if not -layers <= depth < layers:
                raise ValueError(f"task {spec.name!r}: depth {depth} is outside the {layers} fusion layers")
        return sorted({depth % layers for depth in spec.head_depths})

    def readout_depths(self) -> list[int]:
        """The fusion layers any head reads (the last one always: it is the fused representation)."""
        depths = {self.fusion_layers - 1}
        for spec in self.tasks:
            if spec.type != "matching":
                depths.update(self.task_depths(spec))
        return sorted(depths)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FusionConfig:
        return from_dict(cls, values, where="config.json")


@dataclass
class DataConfig:
    """Where the data is and how rows become model inputs."""

    path: str = "data/sample"
    """A directory in any layout `datasets` recognises (imagefolder with metadata.jsonl/csv, {split}.csv|jsonl|parquet,
    data/{split}-0000x-of-0000N.parquet shards, WebDataset .tar shards, save_to_disk), a .csv/.jsonl/.parquet file,
    or a Hub dataset id (owner/name) in the local Hugging Face cache."""
    format: Literal["auto", "imagefolder", "csv", "json", "parquet", "webdataset", "disk"] = "auto"
    """How to read `path`; auto decides from the file suffixes or directory contents."""
    image_column: str = "image"
    """Column with the image (a decoded image, bytes, or a path relative to the data file)."""
    text_column: str = "caption"
    """Column with the text."""
    image_root: str | None = None
    """Directory that relative image paths start from (default: the directory of the data file)."""
    val_fraction: float = 0.1
    """Share of train held out for validation when the data has no validation split."""
    split_seed: int = 0
    """Seed of the held-out validation split."""
    streaming: bool = False
    """Read the data as a stream (for data larger than memory): rows are read as training goes, the training stream
    split among the processes by shards; needs --train.max_steps."""
    shuffle_buffer: int = 1000
    """Streams: rows a training stream is shuffled through, besides its shards' order, each epoch (0: read in order)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad rows (unreadable image, empty text, unknown label): stop with an error, or skip and count them."""
    verify_images: bool = True
    """Decode every image once while loading, so broken files are found before training starts."""
    missing_modality: Literal["error", "placeholder"] = "error"
    """A row with no image or no text (null): an error, or a learned placeholder takes its place."""
    tokenizer: Literal["wordlevel", "bpe"] = "wordlevel"
    """Tokenizer trained on the training text for lstm/gru/transformer encoders."""
    max_text_length: int = 64
    """Texts are truncated to this many tokens (truncations are counted)."""
    augment: bool = False
    """Random crop of training images (data.crop_area-100 % of the area, resized back; seeded by seed, epoch and
    index). Off by default, with train.label_smoothing 0.1 as the regulariser: the crop enlarges the picture by up to
    1.12x and can cut off its border, so a label that depends on scale or borders (a size, a period, a count) no
    longer says what the picture shows. On the suite at ten passes, seeds 0 and 1, six sets, no crops with smoothing
    0.1 against crops without smoothing: mean normalised 0.997 against 0.996, delta-m +4.7 % against -0.8 % (against
    the same single-task models), within 2 points of the better on every task; on the sample, over three seeds, area
    R² 0.989 against 0.971 and background accuracy 1.000 against 0.984 (benchmarks/results/
    recipes_no_augment_ls01_two_seeds.md, default_run_no_augment_ls01.json). Crops without smoothing help the
    smallest set, scenes, most (recipes_no_augment_seeds.md)."""
    crop_area: float = 0.8
    """Smallest share of a training image's area that its random crop keeps (1: the whole image, only flipped where
    flips are on). A crop of area a is resized back, enlarging the picture by up to 1/sqrt(a). At 0.9 on textures
    and scenes (seeds 0 and 1, ten passes, without label smoothing) the mean normalised score was 0.962 against
    0.995 at 0.8, lower on scenes' pair retrieval (recipes_no_augment_ls01_seeds.md)."""
    num_workers: int | None = None
    """DataLoader worker processes per training process. Unset: 4 on a CUDA device (at most its CPUs per process),
    so decoding overlaps the GPU's work; 0 on CPU, where workers would take the model's cores, and for streams."""
    max_image_pixels: int = 50_000_000
    """Images with more pixels are rejected as possible decompression bombs."""
    image_mean: list[float] | None = None
    """Per-channel normalisation mean. Unset: the timm/hf encoder's own (data config or image processor), else
    ImageNet's."""
    image_std: list[float] | None = None
    """Per-channel normalisation standard deviation; unset as for image_mean."""
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] | None = None
    """Resampling filter of the resize. Unset: the timm/hf encoder's own, else bilinear."""
    crop_pct: float | None = None
    """Share of the resized image kept by the center crop (0.875: resize to size/0.875, crop the center). Unset: the
    timm/hf encoder's own, else 1 (the whole image squashed to a square)."""
    cache: str | None = None
    """Decoded-image cache: a directory, or auto (mmfusion_images/ in the datasets cache). Each split's images are
    decoded and resized once into a memory-mapped uint8 file, rebuilt when the data or the image settings change;
    evaluation reads the very pixels of the uncached path, training crops and flips the stored arrays. device:
    nothing stored; training JPEGs are decoded, cropped and resized on the accelerator (nvJPEG on a GPU), other
    formats and evaluation decode on the host."""


@dataclass
class TrainConfig:
    """Optimisation, evaluation and checkpointing."""

    output_dir: str = "runs/default"
    """Where config.yaml, metrics.jsonl, checkpoints/, best/ and final/ go."""
    epochs: float = 0.0
    """Passes over the training data (ignored when max_steps > 0 or with a time_limit). 0: from the number of
    training rows N, epochs_at_3000_rows * sqrt(3000 / N) within [min_epochs, 30] (by default 17.3 passes at 1,000
    rows, 10 from 3,000), so a small set gets more passes and a large one more steps; config.yaml records the value
    used."""
    epochs_at_3000_rows: float = 10.0
    """With epochs 0: the passes at 3,000 training rows, the scale of the rule above (5 before the suite's
    no-time-limit screen, benchmarks/results/recipes_epochs.md)."""
    min_epochs: float = 10.0
    """With epochs 0: the fewest passes the rule gives, however many rows (1 before the suite's ten-pass runs,
    benchmarks/results/recipes_ten_passes.md, where fewer passes under-trained every set above 3,000 rows)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: use epochs); with a time_limit, at most this many."""
    time_limit: float = 0.0
    """Seconds for the whole run, start-up to report (0: no limit). After a short measured warm-up the number of
    steps is planned to fit, so the learning-rate schedule still anneals; best/ and final/ are saved in time."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without a better best_metric (0: never stop early)."""
    batch_size: int = 24
    """Batch size per process. 24 (32 before): a third more optimizer steps over the same rows. On the suite at 180 s
    a run, the mean normalised score is 0.972 at 24, 0.978 at 16 and 0.916 at 32; on the sample the matching task's
    test recall@5 is 0.871 +- 0.024 at 24 and 0.884 +- 0.028 at 32, but 0.810 +- 0.009 at 16
    (benchmarks/results/recipes_batch24_180s.md, default_run_batch24.json)."""
    eval_batch_size: int = 128
    """Evaluation batch size per process."""
    lr: float = 2e-3
    """Learning rate of the new parts (fusion, heads, encoders trained from scratch)."""
    encoder_lr: float = 5e-5
    """Learning rate of pretrained encoders (those loaded from weights), their LoRA adapters, and the matching heads
    of a --model.pretrained dual encoder."""
    weight_decay: float = 0.01
    """AdamW weight decay (never applied to norms and biases)."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = 0.05
    """Share of the steps spent warming up the learning rate."""
    grad_accumulation: int = 1
    """Batches per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: no clipping)."""
    loss_weighting: WeightingName = "uncertainty"
    """How task losses combine: sum, uncertainty (the default: each task's loss scaled by a learned 1 / its typical
    loss, so a task already fitted well, such as a regression, keeps improving;
    benchmarks/results/recipes_dropout_v0.md),
    nll (the joint negative log-likelihood of a row's labels: cross-entropies as they are, a multilabel loss times
    its number of labels, each regression's loss L weighted 0.5 / L at every step; the suite's best multi-task
    model against single-task ones under a time limit, but behind uncertainty without one and on the sample's
    image-read tasks: benchmarks/results/recipes_epochs_nll.md), dwa, rlw, gls, pcgrad, mgda, cagrad, gradnorm."""
    nll_noise_decay: float = 0.0
    """nll: 0 weighs each regression by c / its batch's loss; d in (0, 1) by c / a running mean of its loss (noise <-
    d noise + (1 - d) loss each batch, about 1 / (1 - d) batches of memory). Screened on two sets only
    (benchmarks/results/recipes_nll_noise.md, recipes_nll_noise_clutter.md)."""
    uncertainty_start: Literal["one", "outcomes"] = "outcomes"
    """uncertainty: where each learned weight starts: at the task's number of outcomes (outcomes, the default: a
    multilabel task's number of labels, 1 for the others, as nll counts them), or at 1 for every task (one). Under
    the default bound, on the suite at ten passes, seed 0, outcomes kept scenes' fills at mAP 0.906 and catalog's
    attributes at 1.000, where one let them fall to 0.736 and 0.868
    (benchmarks/results/recipes_weight_bound_outcomes.md)."""
    label_smoothing: float = 0.1
    """Label smoothing of every classification task that does not set its own (TaskSpec.label_smoothing): targets
    of 1 - s + s / K keep a cross-entropy from pushing its logits, and the shared features, ever further. 0.1 is the
    regulariser of the default recipe, which trains without random crops (see data.augment for its figures). With
    crops, at 0.2 the sample's image-only background task fell from 0.984 to 0.956 on test over three seeds, and at
    0.1 the suite lost two regressions (benchmarks/results/recipes_label_smoothing.md,
    default_run_label_smoothing.json)."""
    class_balance: float = 0.0
    """Weigh each class of a classification task that sets no class_weights by (n / (K n_k)) ** class_balance, n_k
    its rows in train (K classes, n rows with a label): 0 weighs every row alike; 1 makes each class count as much as
    any other in the loss, which is what macro-F1 scores; 0.5 goes half way. The weights are written into the
    task (config.yaml, the checkpoint's config). Not the default: on the suite at 180 s over four seeds (with
    train.uncertainty_max_weight 1), 1 lifted scenes' 70/30 faithful from 0.437 to 0.482 and clutter's shape from
    0.199 to 0.254 but lost spatial's imbalanced total on one seed (0.5 on two), the default on none
    (benchmarks/results/recipes_balanced_seeds_180s.md, recipes_balanced05_180s.md)."""
    regression_loss: Literal["mse", "huber", "l1"] = "mse"
    """The loss of every regression task that does not set its own (TaskSpec.loss): mse (squared error), huber, or
    l1 (absolute error). l1, on the suite at ten passes: textures' period MAE 0.028 against 0.053 (seed 0) beside a
    pattern task whose labels are noisy (delta-m +3.1 ± 3.2 % over seeds 0 and 1 against single-task models on l1
    too), but glyphs' and catalog's totals and the sample's background and pair tasks fell: an option, not the
    default (benchmarks/results/recipes_regression_l1.md, recipes_regression_l1_textures_seeds.md,
    default_run_regression_l1.json)."""
    uncertainty_max_weight: float = 0.5
    """uncertainty: the largest weight a classification or multilabel task's learned weight may reach, as a multiple
    of its start (0: no bound). A cross-entropy that falls towards zero drives its weight up without end, and in the
    shared encoders that weight is taken from the tasks still being fitted, such as a regression. At 0.5 (those
    weights begin at half their start and may only fall; regressions stay free), on the suite at ten passes, the mean
    delta-m over six sets is +1.9 %, against -4.5 % at 1 and -8.3 % without a bound (seed 0; over seeds 0 and 1 on
    five sets, -0.0 % against -5.3 % at 1); at 0.25 catalog's text-read sentiment was not learned
    (benchmarks/results/recipes_weight_bound_outcomes.md, recipes_weight_bound_outcomes_seeds.md)."""
    uncertainty_regression_max_weight: float = 0.0
    """uncertainty: the largest weight a regression's learned weight may reach, as a multiple of its start (0: no
    bound, the default). A regression whose error keeps falling otherwise outweighs the classifications bounded by
    uncertainty_max_weight in the encoders they share. At 0.5, on the suite at half the study's steps: catalog's
    text-read sentiment above 0.75 on two seeds of four (none without), clutter's count and spatial's total higher,
    but glyphs' digit, which its total regression teaches, learned on no seed of four (the default on one); an option
    (benchmarks/results/recipes_sentiment_weights_180s.md, recipes_bound_regressions_180s.md,
    recipes_bound_regressions_seeds_180s.md)."""
    weighting_lr: float = 0.0
    """Learning rate of the loss weighting's learned parameters (uncertainty's log-variances; 0: lr). Adam moves
    each by about its learning rate per step, so at lr a weight lags a loss that falls faster. The lag is useful:
    at 10x lr the weights follow the losses and the first task to fit takes the shared encoders
    (benchmarks/results/recipes_ten_pass_screens.md, default_run_weighting_lr.json)."""
    gradnorm_alpha: float = 1.5
    """gradnorm: how much a task whose loss has fallen least gets a larger gradient share (Chen et al.'s alpha;
    0 makes the tasks' weighted gradient norms equal)."""
    gradnorm_min_weight: float = 0.001
    """gradnorm: the smallest weight a task may get (the weights average 1). A squared error falls far faster than
    a cross-entropy, so at 0.001 a regression's weight falls to it: textures' period by step ~1,700 on the suite at
    180 s, where at 0.25 the period's test R² was 0.989 against 0.964 (benchmarks/results/recipes_weighting_180s.md).
    At ten passes GradNorm still loses the regressions at 0.25 (clutter's count R² 0.902 against the default's
    0.999: recipes_ten_pass_gradnorm.md)."""
    regression_warmup: float = 0.0
    """Share of the planned steps over which each regression's gradient into the model rises linearly from 0 to
    all of it (0: all of it from the first step); the learned weights see the whole loss throughout. Meant to keep
    a regression that fits fast from taking the shared encoders from a classification still at chance, early on.
    Not the default: on the suite at 180 s a run, glyphs' digit stayed at chance with 0.3 (macro-F1 0.088 ± 0.003
    over seeds 0 and 1, against the default's 0.488 ± 0.566), since there the regression on digit + number is what
    teaches the digit (benchmarks/results/recipes_short_budget_180s.md)."""
    matching_negatives: Literal["pairs", "rows"] = "pairs"
    """What each true pair of a matching task ranks its partner against in training: the batch's other true pairs
    (pairs), or every row's image and text (rows: a row whose label says its text does not match its image still
    has an image and a text unlike the pair's, so a batch where half the rows are true pairs gives twice the
    negatives). Not the default: on the sample at a batch of 16, rows gave pair recall@5 0.824 ± 0.005 on test
    (three seeds) against 0.810 ± 0.009 with pairs, where a batch of 32 gives 0.884 ± 0.028
    (benchmarks/results/default_run_batch16_rows.json, default_run_batch16.json, default_run_batch32_same_day.json)."""
    matching_memory: int = 0
    """True pairs from earlier training batches that each matching task's contrastive loss also ranks as
    candidates (their embeddings, without gradient; newest first); 0: the batch's own only. Not the default: on the
    sample at a batch of 16, pair recall@5 on test (three seeds) was 0.835 ± 0.032 with 16 remembered and
    0.736 ± 0.039 with 48, against 0.810 ± 0.009 with none: embeddings from an encoder that has moved since do not
    stand in for a larger batch (benchmarks/results/default_run_batch16_memory16.json, ..._memory48.json)."""
    without: Literal["none", "image", "text"] = "none"
    """Train and evaluate without this modality (its learned placeholder instead): single-modality baselines."""
    aux_schedule: Literal["constant", "linear_decay", "cosine_decay"] = "constant"
    """Deep-supervision weights over training: constant, or decaying to zero by the last step."""
    modality_dropout: float = 0.0
    """Probability of dropping the image or the text of a training sample."""
    seed: int = 0
    """Seed of everything random."""
    log_every: int = 10
    """Log the training losses, learning rate and speed every N steps."""
    eval_every: int = 0
    """Evaluate every N steps (0: each epoch)."""
    save_every: int = 0
    """Save the training state every N steps (0: each epoch)."""
    keep_checkpoints: int = 2
    """How many training-state checkpoints to keep."""
    best_metric: str = "summary"
    """Metric that picks best/: summary, or task/metric such as topic/accuracy."""
    resume: str | None = None
    """Continue from a training state: latest, or a checkpoints/step_N directory."""
    init_from: str | None = None
    """Start from a pretrained fusion checkpoint (directory or Hub id): encoders, fusion and the heads of unchanged
    tasks are loaded; new or changed tasks get fresh heads."""
    freeze_encoders_steps: int = 0
    """Keep the pretrained encoders fixed (learning rate 0) for the first N steps, while new heads settle."""
    layer_decay: float = 1.0
    """Layer-wise learning-rate decay of pretrained encoders: a parameter k blocks below the top trains at
    encoder_lr * layer_decay^k (embeddings lowest). 1: every layer at encoder_lr; 0.65-0.9 is usual for ViTs."""
    cache_features: bool | None = None
    """Compute the encoders' outputs once per row (no image augmentation), store them on disk ($MMFUSION_CACHE,
    default ~/.cache/mmfusion, keyed by the data, the processor and the encoder weights) and train only the fusion
    and heads. Unset: on when both encoders are frozen; true also freezes both encoders."""
    cpu_threads: int = 0
    """Torch threads per process on CPU (0: the physical cores shared among the local processes; accelerate launch
    would otherwise leave one)."""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """Experiment tracker."""
    report: bool = True
    """Write report.html at the end of training."""


@dataclass
class Config:
    """mmfusion training configuration."""

    config: str | None = None
    """YAML file with the base configuration; command-line options override it. Without --config and
    --data.path, train.py uses configs/default.yaml (the bundled sample data's recipe)."""
    model: FusionConfig = field(default_factory=FusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: list[TaskSpec] = field(default_factory=list)
    """Tasks; inferred from the training split's columns when empty."""
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.model.tasks:  # a run configuration holds one task list, at the top level
            if self.tasks and self.tasks != self.model.tasks:
                raise ValueError("tasks are given twice (tasks and model.tasks); give them once, under tasks")
            self.tasks, self.model = self.model.tasks, dataclasses.replace(self.model, tasks=[])

    def model_config(self) -> FusionConfig:
        """The model this run builds: `model` with the run's tasks."""
        return dataclasses.replace(self.model, tasks=list(self.tasks))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_dict(cls: type, values: Any, where: str) -> Any:
    """Build dataclass `cls` from nested plain values, naming any unknown key (and the nearest valid one)."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {sorted(fields)}"
            raise ValueError(f"{where}: unknown key {key!r}{hint}")
        kwargs[key] = _convert(hints[key], value, f"{where}: {key}")
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    """Check `value` against the type hint, building nested dataclasses; raise naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and (type(value) is hint):
        return value
    raise ValueError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
