"""The bad-input catalogue: every case goes through a public entry point (train.py, `mmfusion evaluate`,
`mmfusion predict`, the Python API) and must end in a message naming the file / row / field / option and what
was expected, or in a counted skip under `--data.on_error skip`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import make_imagefolder, make_rows, write_image
from test_train import TINY, _run

from mmfusion import FusionModel, Predictor, cli
from mmfusion.config import DataConfig
from mmfusion.errors import BadInputError, CheckpointError
from mmfusion.processing import FusionProcessor, train_tokenizer
from mmfusion.rows import RowReader


def _public(rows):
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def _write_metadata(directory: Path, rows: list[dict]) -> None:
    (directory / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _public(rows)))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base")
    make_imagefolder(root, {"train": make_rows(16), "validation": make_rows(6, 100), "test": make_rows(6, 200)})
    return root


@pytest.fixture(scope="module")
def checkpoint(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert _run(["--data.path", str(base), *TINY, "--train.max_steps", "2", "--train.output_dir", str(out)]) == 0
    return out / "best"


def _variant(base: Path, tmp_path: Path, change) -> Path:
    """A copy of the base data with `change(train_directory, train_rows)` applied to row 2 of train."""
    root = tmp_path / "data"
    shutil.copytree(base, root)
    rows = make_rows(16)
    change(root / "train", rows)
    _write_metadata(root / "train", rows)
    return root


def _train(data: Path, tmp_path: Path, *extra: str) -> int:
    return _run(
        ["--data.path", str(data), *TINY, "--train.max_steps", "2", "--train.output_dir", str(tmp_path / "out"), *extra]
    )


def _set(field, value):
    def change(directory, rows):
        rows[2][field] = value

    return change


def _file(write):
    def change(directory, rows):
        write(directory / rows[2]["file_name"])

    return change


def _huge(path):
    write_image(path, size=(2000, 2000))


TRAIN_CASES = {
    "missing image": (
        _set("file_name", "nowhere.png"),
        r"train split, row 2, field 'image' \(file nowhere.png\): image file not found",
    ),
    "corrupt image": (
        _file(lambda p: p.write_bytes(b"GIF89a garbage")),
        r"row 2, field 'image' \(file 002.png\): not a readable image",
    ),
    "truncated image": (
        _file(lambda p: p.write_bytes(p.read_bytes()[:60])),
        r"row 2, field 'image' \(file 002.png\): (image is corrupt or truncated|not a readable image)",
    ),
    "zero-byte image": (
        _file(lambda p: p.write_bytes(b"")),
        r"row 2, field 'image' \(file 002.png\): not a readable image",
    ),
    "directory instead of image": (
        _file(lambda p: (p.unlink(), p.mkdir())),
        r"row 2, field 'image' \(file 002.png\): not a readable image",
    ),
    "path escaping the data directory": (
        _set("file_name", "../../etc/passwd"),
        r"row 2, field 'image' \(file ../../etc/passwd\): image path '../../etc/passwd' escapes the data directory",
    ),
    "absolute path outside": (_set("file_name", "/etc/hostname"), r"row 2, .*escapes the data directory"),
    "empty text": (_set("caption", ""), r"train split, row 2, field 'caption': text is empty"),
    "whitespace text": (_set("caption", " \t\n "), r"row 2, field 'caption': text is empty"),
    "missing text": (
        _set("caption", None),
        r"row 2: field 'caption' is missing \(set data.missing_modality: placeholder\)",
    ),
    "text of the wrong type": (_set("caption", 42), r"row 2, field 'caption': expected text \(a string\), got int 42"),
    "classification label of the wrong type": (
        _set("label", [1, 2]),
        r"row 2, field 'label': expected a class label .* got \[1, 2\]",
    ),
    "multilabel not a list": (
        _set("tags", "red"),
        r"row 2, field 'tags': expected a list of labels for multilabel task 'tags', got 'red'",
    ),
    "regression target not a number": (
        _set("score", "high"),
        r"row 2, field 'score': expected a number for regression task 'score', got 'high'",
    ),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_bad_row(base, tmp_path, capsys, case):
    change, message = TRAIN_CASES[case]
    data = _variant(base, tmp_path, change)
    assert _train(data, tmp_path) == 2
    err = capsys.readouterr().err
    assert pytest.importorskip("re").search(message, err), err


def test_decompression_bomb(base, tmp_path, capsys):
    data = _variant(base, tmp_path, _file(_huge))
    assert _train(data, tmp_path, "--data.max_image_pixels", "1000000") == 2
    assert (
        "row 2, field 'image' (file 002.png): image of 2000x2000 pixels exceeds data.max_image_pixels=1000000"
        in capsys.readouterr().err
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file: test_unreadable_image_as_an_unprivileged_user")
def test_unreadable_image(base, tmp_path, capsys):
    data = _variant(base, tmp_path, _file(lambda p: p.chmod(0)))
    assert _train(data, tmp_path) == 2
    assert "permission denied" in capsys.readouterr().err


def test_unreadable_image_as_an_unprivileged_user(base):
    """The same refusal where tests run as root (CI): a forked child drops to user nobody, then reads the row."""
    directory = Path(tempfile.mkdtemp())  # /tmp/pytest-of-root is closed to other users
    try:
        directory.chmod(0o755)
        image = directory / "002.png"
        shutil.copy(base / "train" / "002.png", image)
        image.chmod(0)
        reader = RowReader(FusionProcessor(train_tokenizer(["a"])), [], DataConfig(), directory, "train")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                try:
                    reader.read({"image": "002.png", "caption": "a"}, 2)
                    message = "read"
                except BadInputError as error:
                    message = str(error)
                os.write(write, message.encode())
            finally:
                os._exit(0)
        os.close(write)
        message = os.read(read, 4096).decode()
        os.waitpid(pid, 0)
    finally:
        shutil.rmtree(directory)
    assert (
        message
        == f"train split, row 2, field 'image' (file 002.png): image file is not readable (permission denied): {image}"
    )


def test_nan_regression_target_in_csv(base, tmp_path, capsys):
    root = tmp_path / "csv"
    shutil.copytree(base, root)
    rows = _public(make_rows(16))
    lines = ["file_name,caption,label,score"] + [
        f"{r['file_name']},{r['caption']},{r['label']},{r['score']}" for r in rows
    ]
    lines[3] = lines[3].rsplit(",", 1)[0] + ",nan"
    (root / "train" / "metadata.jsonl").unlink()
    (root / "train" / "metadata.csv").write_text("\n".join(lines) + "\n")
    for split in ("validation", "test"):
        shutil.rmtree(root / split)
    assert _train(root, tmp_path) == 2
    assert "row 2, field 'score': regression target for task 'score' is not finite ('nan')" in capsys.readouterr().err


def test_non_utf8_text(base, tmp_path, capsys):
    root = tmp_path / "csv"
    (root / "train").mkdir(parents=True)
    for row in make_rows(8):
        write_image(root / "train" / row["file_name"], row["_color"])
    lines = [b"file_name,caption,label"] + [
        f"{r['file_name']},{r['caption']},{r['label']}".encode() for r in make_rows(8)
    ]
    lines[3] = lines[3].replace(b"picture", b"pict\xe9re")
    (root / "train" / "metadata.csv").write_bytes(b"\n".join(lines) + b"\n")
    assert _train(root, tmp_path, "--data.val_fraction", "0.25") == 2
    assert "field 'caption': text contains undecodable bytes" in capsys.readouterr().err


def test_bad_rows_are_skipped_and_counted(base, tmp_path, capsys):
    def several(directory, rows):
        rows[2]["file_name"] = "gone.png"
        rows[5]["caption"] = ""
        rows[7]["label"] = [1]
        (directory / rows[9]["file_name"]).write_bytes(b"")

    data = _variant(base, tmp_path, several)
    assert _train(data, tmp_path, "--data.on_error", "skip") == 0
    out = capsys.readouterr().out
    assert "skipped 4 bad rows" in out
    for reason in ("missing image file", "empty text", "wrong field type", "unreadable image"):
        assert f"train: 1 x {reason}" in out


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda root: None, "data.path does not exist"),
        (lambda root: root.mkdir(), "no data found"),
        (
            lambda root: make_imagefolder(root, {"validation": make_rows(4)}),
            r"no train split; found splits \['validation'\]",
        ),
        (
            lambda root: (
                make_imagefolder(root, {"train": make_rows(4)}),
                (root / "train" / "metadata.jsonl").write_text(""),
            ),
            "the train split is empty",
        ),
    ],
)
def test_unusable_data_directories(tmp_path, capsys, make, message):
    make(tmp_path / "d")
    assert _train(tmp_path / "d", tmp_path) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)


def test_missing_column_names_the_columns_that_exist(base, tmp_path, capsys):
    assert _train(base, tmp_path, "--data.text_column", "text") == 2
    assert (
        "data.text_column 'text' not found; the data has columns ['image', 'caption', 'label', 'score', 'tags']"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "yaml_text,message",
    [
        ("train:\n  batchsize: 8\n", "unknown key 'batchsize'; did you mean 'batch_size'"),
        ("train:\n  lr: fast\n", "train: lr: expected float, got 'fast'"),
        ("model: [1, 2]\n", "expected a mapping for FusionConfig"),
        ("train: {lr: 0.1\n", "not valid YAML"),
    ],
)
def test_bad_yaml(tmp_path, yaml_text, message):
    config = tmp_path / "x.yaml"
    config.write_text(yaml_text)
    with pytest.raises(SystemExit, match=message):
        _run(["--config", str(config)])


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--train.batch_size", "0", "--train.batch_size must be > 0, got 0"),
        ("--train.batch_size", "-4", "--train.batch_size must be > 0, got -4"),
        ("--train.lr", "0", "--train.lr must be > 0, got 0.0"),
        ("--train.lr", "-0.001", "--train.lr must be > 0, got -0.001"),
    ],
)
def test_bad_numbers(option, value, message):
    with pytest.raises(SystemExit, match=message):
        _run([option, value])


def test_output_dir_that_is_a_file(base, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _run(["--data.path", str(base), *TINY, "--train.output_dir", str(tmp_path / "file")]) == 2
    assert f"--train.output_dir {tmp_path / 'file'} exists and is not a directory" in capsys.readouterr().err


def _cli(capsys, *argv) -> tuple[int, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def test_unseen_label_at_evaluation(base, checkpoint, tmp_path, capsys):
    root = tmp_path / "eval"
    shutil.copytree(base, root)
    rows = make_rows(6, 200)
    rows[1]["label"] = "purple"
    _write_metadata(root / "test", rows)
    code, out = _cli(capsys, "evaluate", str(checkpoint), "--data.path", str(root), "--split", "test")
    assert (
        code == 2 and "test split, row 1, field 'label': label 'purple' of task 'label' was not seen in training" in out
    )
    code, out = _cli(capsys, "evaluate", str(checkpoint), "--data.path", str(root), "--data.on_error", "skip")
    assert code == 0 and "skipped 1 bad rows" in out and "test: 1 x unseen label" in out


def test_checkpoint_from_another_config(base, checkpoint, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    config = json.loads((other / "config.json").read_text())
    config["dim"] = 48
    (other / "config.json").write_text(json.dumps(config))
    code, out = _cli(capsys, "evaluate", str(other), "--data.path", str(base))
    assert (
        code == 2
        and "model.safetensors does not match" in out
        and "shape mismatch" in out
        and "fusion.image.weight: expected (48, 16), found (32, 16)" in out
    )


def test_truncated_safetensors(base, checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    code, out = _cli(capsys, "evaluate", str(broken), "--data.path", str(base))
    assert code == 2 and "model.safetensors is not a readable safetensors file (truncated or corrupt?)" in out
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        FusionModel.from_pretrained(broken)


def test_predict_with_an_image_that_does_not_exist(checkpoint, tmp_path, capsys):
    code, out = _cli(capsys, "predict", str(checkpoint), "--image", str(tmp_path / "cat.jpg"), "--text", "a cat")
    assert code == 2 and "image file not found" in out and "cat.jpg" in out


def test_python_api_errors(checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match=r"not an mmfusion checkpoint: .*config.json is missing"):
        FusionModel.from_pretrained(tmp_path)
    predictor = Predictor.from_pretrained(checkpoint)
    with pytest.raises(BadInputError, match="both the image and the text are missing"):
        predictor.predict([None], [None])
    with pytest.raises(BadInputError, match="text is empty"):
        predictor.predict([None], ["   "])
