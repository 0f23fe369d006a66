"""``make bench``'s comparisons are like for like: the bare loops compute the framework's losses."""

from __future__ import annotations

import json

import pytest

from benchmarks.run import METHODS, agree, bare_loop, build_run, main, make_trajectories, same_losses


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench")
    make_trajectories(path, n=128)  # two batches of the benchmark's 64
    return path


@pytest.mark.parametrize("name", list(METHODS))
def test_the_bare_loop_computes_the_framework_loss_on_the_same_inputs(folder, name):
    run = build_run(name, folder, folder / "pairs")
    bare, step = bare_loop(name, run)
    losses = same_losses(name, run, bare)
    assert agree(losses), losses
    assert losses["framework"] != 0
    step()  # and its step runs on a fresh batch


@pytest.mark.slow  # ~1 min: the whole bench at its smallest; `make bench` runs it for real
def test_a_short_bench_writes_its_results_and_table(folder):
    out = folder / "out"
    args = ["--repeats", "1", "--warmup", "1", "--steps", "1", "--methods", "di", "--sample-batch", "16",
            "--sections", "overhead", "sampling", "--out", str(out), "--folder", str(folder)]  # fmt: skip
    main(args)
    results = json.loads((out / "results.json").read_text())
    row = results["overhead"]["di"]
    assert row["same_loss"] and row["ratio"]["n"] == 1 and row["framework_s"]["median"] > 0
    assert set(results["sampling"]["rows"]) == {"student_1", "heun_35", "dpmpp2m_8", "dpmpp2m_20"}
    table = (out / "RESULTS.md").read_text()
    assert "## 1. Framework overhead" in table and "| di |" in table and "## 2. Sampling" in table
