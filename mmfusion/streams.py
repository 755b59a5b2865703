"""Streamed splits (`--data.streaming true`): data larger than memory, read row by row from sharded parquet, WebDataset
tar shards or any other `datasets` stream.

A training stream is shuffled each epoch (its shards' order and a buffer of `data.shuffle_buffer` rows, seeded by
seed + epoch) and split among the training processes by `datasets.distributed.split_dataset_by_node` (whole shards
when their number divides among the processes, else every n-th row), so each process reads only its part. Each
process counts the rows it has read in the epoch; the training state saves the counts and a resumed run reads its
stream again from the epoch's start, passing over that many rows undecoded, so it continues with the very rows,
crops and order the interrupted run would have had.
"""

from __future__ import annotations

import itertools

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object, send_to_device
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node

from .errors import BadInputError, InputError
from .rows import RowReader, SkipReport, reason


class FusionStream(torch.utils.data.IterableDataset):
    """A streamed split: rows are checked as they arrive; bad ones raise or are skipped and counted. With `training`,
    shuffled per epoch and split among the processes; `position` is the number of rows this process has read in
    the epoch, and `resume_at` makes the next pass start there."""

    def __init__(
        self,
        split: IterableDataset,
        reader: RowReader,
        on_error: str,
        augment: bool = False,
        seed: int = 0,
        modality_dropout: float = 0.0,
        training: bool = False,
        shuffle_buffer: int = 1000,
    ) -> None:
        self.split, self.reader, self.on_error = split, reader, on_error
        self.augment, self.seed, self.modality_dropout = augment, seed, modality_dropout
        self.training, self.shuffle_buffer = training, shuffle_buffer
        self.epoch = self.position = self.start = 0
        self.report = SkipReport()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, position: int) -> None:
        self.start = position

    def process(self) -> tuple[int, int]:
        """(this process's index, the number of processes) a training stream is split among."""
        if not self.training:
            return 0, 1
        state = PartialState()
        return state.process_index, state.num_processes

    def rows(self) -> IterableDataset:
        """This epoch's raw rows for this process."""
        stream = self.split
        if self.training and self.shuffle_buffer:
            stream = stream.shuffle(seed=self.seed + self.epoch, buffer_size=self.shuffle_buffer)
        rank, world = self.process()
        return split_dataset_by_node(stream, rank, world) if world > 1 else stream

    def __iter__(self):
        rank, world = self.process()
        start, self.start = self.start, 0
        self.position = start
        rows = itertools.islice(iter(self.rows()), start, None)  # a resumed pass: the rows already read, undecoded
        for position, row in enumerate(rows, start):
            self.position = position + 1
            index = position * world + rank  # unique across processes: it keys the row's augmentation
            try:
                yield self.reader.read(row, index, self.epoch, self.augment, self.seed, self.modality_dropout)
            except BadInputError as error:
                if self.on_error == "raise":
                    raise
                self.report.add(self.reader.split, reason(str(error)), str(error))

    def describe(self, number: int) -> str:
        return f"{self.reader.split} stream row {number}"


def stream_batches(loader: torch.utils.data.DataLoader, accelerator: Accelerator):
    """The batches of this process's part of a training stream, on the device. With several processes all stop
    together when the first runs out: one without a batch would leave the others waiting in the gradient all-reduce
    (so one small gather per batch)."""
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        if accelerator.num_processes > 1:
            more = accelerator.gather(torch.tensor([batch is not None], device=accelerator.device))
            if not bool(more.all()):
                return
        elif batch is None:
            return
        yield send_to_device(batch, accelerator.device, non_blocking=True)


def stream_positions(stream: FusionStream) -> list[int]:
    """Every process's position in the training stream (a collective: all processes call it)."""
    return gather_object([stream.position])


def resume_stream(stream: FusionStream, positions: list[int] | None, num_processes: int, process_index: int) -> None:
    """Start the training stream where the saved state left it."""
    if not positions:
        return
    if len(positions) != num_processes:
        raise InputError(
            f"--train.resume: the stream was read by {len(positions)} processes and cannot resume exactly on "
            f"{num_processes}; resume with {len(positions)} processes"
        )
    stream.resume_at(positions[process_index])
