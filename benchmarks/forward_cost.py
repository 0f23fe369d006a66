"""``python -m benchmarks.forward_cost --data gmm_digits``: an analytic teacher's forward in forwards of its
student network, the cost that the compute unit charges per teacher call (docs/algorithms.md §8,
:func:`distillbench.methods.accounting.compute_unit`).

Composes ``train data=<data>`` (so the teacher and student its runs use), times both networks' forward on the
same batch (median of ``--repeats`` timed calls, one thread by default: the ratio of two CPU kernels, not of
two contended processes), and writes the record to ``--out`` (JSON). The value goes into the teacher's
config (``conf/teacher/<data>.yaml``, ``cost.forward``) with the record's path beside it, so that a budget
means the same steps on every machine; re-measure it when the teacher or the student changes.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir

from distillbench.config import CONFIG_DIR
from distillbench.methods.accounting import measure_forward_cost


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="gmm_digits")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name="train", overrides=[f"data={args.data}"])
    teacher = hydra.utils.instantiate(cfg.teacher)
    student = hydra.utils.instantiate(cfg.student)
    record = measure_forward_cost(teacher, student, args.batch_size, args.repeats)
    record |= {"command": f"python -m benchmarks.forward_cost --data {args.data} --batch-size "
                          f"{args.batch_size} --repeats {args.repeats} --threads {args.threads}"
                          + (f" --out {args.out}" if args.out else ""),
               "teacher": f"teacher={args.data} (dtype {cfg.teacher.dtype})",
               "student": f"student={args.data}",
               "threads": args.threads, "machine": f"{platform.machine()}, torch {torch.__version__}",
               "measured": datetime.now().isoformat(timespec="minutes")}  # fmt: skip
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return record


if __name__ == "__main__":
    main()
