"""Typed configuration: the model (`FusionConfig`), its tasks (`TaskSpec`), data and training options.

One tree of dataclasses, `Config`, that loads from YAML and takes dotted command-line overrides
(`--model.fusion gated`); the attribute docstrings below are the `--help` text.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tyro
import yaml

TaskType = Literal["classification", "multilabel", "regression", "matching"]
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
]
TextEncoderName = Literal["lstm", "gru", "transformer", "hf"]
FusionName = Literal["concat", "gated", "cross_attention", "film", "bilinear", "late"]
WeightingName = Literal["sum", "uncertainty", "dwa", "rlw", "gls", "pcgrad", "mgda", "cagrad", "gradnorm"]


@dataclass
class TaskSpec:
    """One prediction task: which column it reads, what kind of target, and how its head is built."""

    name: str
    """Task name, used as the key of logits, losses and metrics."""
    type: TaskType = "classification"
    """classification (one label), multilabel (a list of labels), regression (a float) or matching (image-text)."""
    column: str | None = None
    """Dataset column holding the target (default: the task name)."""
    num_labels: int | None = None
    """Number of classes (classification, multilabel); filled from `labels` when given."""
    labels: list[str] | None = None
    """Class names in index order; built from the training split when not given."""
    weight: float = 1.0
    """Static loss weight."""
    depths: list[int] | None = None
    """Fusion layers that get a head (deep supervision), e.g. [0, 1]; default: the last layer only."""
    hidden_layers: int = 0
    """Task-specific MLP layers between the shared fusion output and the head's output layer."""
    label_smoothing: float = 0.0
    """Label smoothing for classification."""
    class_weights: list[float] | None = None
    """Per-class loss weights for classification."""
    loss: Literal["mse", "huber"] = "mse"
    """Regression loss."""
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
        if self.type in ("classification", "multilabel") and self.num_labels is not None and self.num_labels < 1:
            raise ValueError(f"task {self.name!r}: num_labels must be >= 1, got {self.num_labels}")
        if self.type == "regression" and self.target_std <= 0:
            raise ValueError(f"task {self.name!r}: target_std must be > 0, got {self.target_std}")

    @property
    def out_features(self) -> int:
        """Width of the head's output layer."""
        if self.type == "regression":
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


@dataclass
class FusionConfig:
    """Everything needed to build a `FusionModel` (and nothing about data or training)."""

    image_encoder: ImageEncoderName = "simple_cnn"
    """From scratch: simple_cnn (plain conv stages, `image_widths`), or the residual CNNs cnn_small / cnn_base
    (GroupNorm, four downsampling stages); or a torchvision backbone: resnet18, resnet34, resnet50, efficientnet_b0,
    convnext_tiny, vit_b_16."""
    image_widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    """simple_cnn: channels of each conv stage (the number of entries is the depth)."""
    image_weights: str | None = None
    """Local file with pretrained torchvision weights (safetensors or a state dict); nothing is downloaded."""
    image_size: int = 64
    """Input image side in pixels (vit_b_16 needs it; the processor resizes to it)."""
    image_pooling: Literal["mean", "max"] = "mean"
    """CNN feature map to one vector: mean, or max (better at small objects); ViTs use their class token."""
    freeze_image: bool = False
    """Keep the image encoder's weights fixed."""
    text_encoder: TextEncoderName = "lstm"
    """lstm, gru, transformer (from scratch) or hf (a Hugging Face transformers encoder)."""
    text_model: str | None = None
    """hf: local path or Hub id of the transformers model."""
    text_pooling: Literal["mean", "cls"] = "mean"
    """How token features become one vector: masked mean or the first token."""
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
    fusion: FusionName = "concat"
    """concat, gated, cross_attention, film, bilinear or late."""
    dim: int = 128
    """Width of the fused representation."""
    fusion_layers: int = 2
    """Depth of the fusion trunk; every layer's output can carry a head."""
    fusion_heads: int = 4
    """cross_attention: attention heads."""
    rank: int = 16
    """bilinear: rank of the low-rank factorisation."""
    dropout: float = 0.1
    """Dropout in fusion layers and heads."""
    tasks: list[TaskSpec] = field(default_factory=list)
    """The tasks the model predicts (filled from the top-level `tasks` when training)."""
    text_model_config: tyro.conf.Suppress[dict[str, Any] | None] = None
    """hf: the transformers config, stored so a checkpoint rebuilds without the original model files."""

    def __post_init__(self) -> None:
        self.tasks = [t if isinstance(t, TaskSpec) else TaskSpec(**t) for t in self.tasks]
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"task names must be unique; repeated: {duplicates}")

    def task_depths(self, spec: TaskSpec) -> list[int]:
        """The fusion layers `spec`'s heads read, as sorted non-negative indices, deepest last."""
        layers = self.fusion_layers
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
    """Directory (imagefolder layout or save_to_disk), or a .csv/.jsonl/.parquet file."""
    format: Literal["auto", "imagefolder", "csv", "json", "parquet", "disk"] = "auto"
    """How to read `path`; auto decides from the file suffix or directory contents."""
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
    """Read the data as a stream (for data larger than memory)."""
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
    augment: bool = True
    """Random crop and flip of training images (seeded by seed, epoch and index)."""
    num_workers: int | None = None
    """DataLoader worker processes per training process. Unset: 4 on a CUDA device (at most its CPUs per process),
    so decoding overlaps the GPU's work; 0 on CPU, where workers would take the model's cores, and for streams."""
    max_image_pixels: int = 50_000_000
    """Images with more pixels are rejected as possible decompression bombs."""


@dataclass
class TrainConfig:
    """Optimisation, evaluation and checkpointing."""

    output_dir: str = "runs/default"
    """Where config.yaml, metrics.jsonl, checkpoints/, best/ and final/ go."""
    epochs: int = 3
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: use epochs)."""
    batch_size: int = 32
    """Batch size per process."""
    eval_batch_size: int = 128
    """Evaluation batch size per process."""
    lr: float = 2e-3
    """Learning rate of the new parts (fusion, heads, encoders trained from scratch)."""
    encoder_lr: float = 5e-5
    """Learning rate of pretrained encoders (those loaded from weights)."""
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
    loss_weighting: WeightingName = "sum"
    """How task losses combine: sum, uncertainty, dwa, rlw, gls, pcgrad, mgda, cagrad, gradnorm."""
    ablate: Literal["none", "image", "text"] = "none"
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


def load_yaml(path: str | Path) -> Config:
    """Read a YAML config file into a `Config`, naming the file and key of anything invalid."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    values.pop("config", None)
    return from_dict(Config, values, where=str(path))


def save_yaml(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def parse_args(argv: list[str] | None = None, prog: str = "train.py") -> Config:
    """`--config file.yaml` (optional) then dotted overrides such as `--model.fusion gated`; exits 2 on errors."""
    argv = sys.argv[1:] if argv is None else list(argv)
    base = Config()
    path = _option_value(argv, "--config")
    if path is None and _option_value(argv, "--data.path") is None and DEFAULT_RECIPE.is_file():
        path = str(DEFAULT_RECIPE)
    if path is not None:
        try:
            base = load_yaml(path)
        except (OSError, ValueError) as error:
            raise SystemExit(f"{prog}: error: {error}") from None
        base.config = path
    config = tyro.cli(
        Config,
        default=base,
        args=_normalise_booleans(argv),
        prog=prog,
        use_underscores=True,
        config=(tyro.conf.FlagConversionOff,),
    )
    problems = check_values(config)
    if problems:
        raise SystemExit(f"{prog}: error: " + "; ".join(problems))
    return config


BOOLEAN_WORDS = {"true": "True", "yes": "True", "1": "True", "false": "False", "no": "False", "0": "False"}


def _boolean_options(cls: type = Config, prefix: str = "--") -> set[str]:
    options = set()
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if hint is bool:
            options.add(prefix + f.name)
        elif dataclasses.is_dataclass(hint):
            options |= _boolean_options(hint, f"{prefix}{f.name}.")
    return options


def _normalise_booleans(argv: list[str]) -> list[str]:
    """Accept `--data.augment false` (any case, yes/no, 1/0) as well as tyro's `False`."""
    booleans = _boolean_options()
    return [BOOLEAN_WORDS.get(arg.lower(), arg) if i and argv[i - 1] in booleans else arg for i, arg in enumerate(argv)]


def _option_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def check_values(config: Config) -> list[str]:
    """Values that parse but make no sense, each named by its option."""
    train, data, model = config.train, config.data, config.model
    rules = [
        (train.batch_size > 0, f"--train.batch_size must be > 0, got {train.batch_size}"),
        (train.eval_batch_size > 0, f"--train.eval_batch_size must be > 0, got {train.eval_batch_size}"),
        (train.lr > 0, f"--train.lr must be > 0, got {train.lr}"),
        (train.encoder_lr >= 0, f"--train.encoder_lr must be >= 0, got {train.encoder_lr}"),
        (train.epochs > 0 or train.max_steps > 0, "--train.epochs or --train.max_steps must be > 0"),
        (train.max_steps >= 0, f"--train.max_steps must be >= 0, got {train.max_steps}"),
        (train.grad_accumulation >= 1, f"--train.grad_accumulation must be >= 1, got {train.grad_accumulation}"),
        (0 <= train.warmup_ratio < 1, f"--train.warmup_ratio must be in [0, 1), got {train.warmup_ratio}"),
        (0 <= train.modality_dropout < 1, f"--train.modality_dropout must be in [0, 1), got {train.modality_dropout}"),
        (train.max_grad_norm >= 0, f"--train.max_grad_norm must be >= 0, got {train.max_grad_norm}"),
        (
            train.freeze_encoders_steps >= 0,
            f"--train.freeze_encoders_steps must be >= 0, got {train.freeze_encoders_steps}",
        ),
        (train.log_every >= 1, f"--train.log_every must be >= 1, got {train.log_every}"),
        (train.keep_checkpoints >= 1, f"--train.keep_checkpoints must be >= 1, got {train.keep_checkpoints}"),
        (0 < data.val_fraction < 1, f"--data.val_fraction must be in (0, 1), got {data.val_fraction}"),
        (data.max_text_length > 0, f"--data.max_text_length must be > 0, got {data.max_text_length}"),
        (data.num_workers is None or data.num_workers >= 0, f"--data.num_workers must be >= 0, got {data.num_workers}"),
        (
            not (data.streaming and data.num_workers),
            "--data.num_workers must be 0 with --data.streaming true: a stream is read in the main process, "
            "where its row numbers and skipped-row counts are kept",
        ),
        (model.dim > 0, f"--model.dim must be > 0, got {model.dim}"),
        (0 <= model.dropout < 1, f"--model.dropout must be in [0, 1), got {model.dropout}"),
        (model.image_size > 0, f"--model.image_size must be > 0, got {model.image_size}"),
    ]
    return [message for ok, message in rules if not ok]
