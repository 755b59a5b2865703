"""A suite of generated image-text datasets that are not data/sample, for benchmarking recipes (issue 20).

    from suite import SETS, generate   # with benchmarks/ on sys.path
    path = generate("clutter", "runs/suite")   # runs/suite/clutter, with tasks.yaml for train.py --config

See README.md for what each set tests and its ceilings (ceilings.py), make.py for the command line.
"""

from .sets import SETS, SetSpec, generate

__all__ = ["SETS", "SetSpec", "generate"]
