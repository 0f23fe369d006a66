"""The analysis notebooks are stored without outputs and execute on small saved sweeps made here."""

from __future__ import annotations

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from tests.helpers import ROOT, environment, family_table, run_here

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TINY = ["data=toy2d", "method.batch_size=16", "method.duration_kimg=0.032", "eval.n=256",
        "eval.every_kimg=0.032", "eval.teacher=false", "logger=csv"]  # fmt: skip
ABLATIONS = {"sid_alpha": "method.alpha=0.5,1.2", "sim_c": "method.c=0.1,1.0",
             "sim_distance": "method.distance=pseudo_huber,l2", "sigma_init": "method.sigma_init=1.5,2.5",
             "time_law": "method.time_law=p_sim,p_edm"}  # fmt: skip


@pytest.fixture(scope="module")
def saved_sweeps(tmp_path_factory):
    """The real experiment configs, shrunk to toy2d and two settings each, run into ``<root>/outputs``."""
    root = tmp_path_factory.mktemp("notebooks")
    logs = f"paths.log_dir={root / 'outputs'}"
    run_here(
        "distillbench.train", "experiment=lr_robustness", "method=sim,sid", "seed=0", *TINY, logs, cwd=root
    )
    for name, values in ABLATIONS.items():
        run_here("distillbench.train", f"experiment=ablation/{name}", values, *TINY, logs, cwd=root)
    return root


def execute(name: str, cwd, parameters: str) -> nbformat.NotebookNode:
    """Run a notebook with its ``parameters`` cell replaced, in ``cwd``, on one thread, as Jupyter would."""
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = parameters
    kernel_env = {"OMP_NUM_THREADS": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    with environment(kernel_env):  # the kernel inherits them (conftest sets Agg for the tests themselves)
        client = NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
        )
        client.execute()
    return nb


def outputs_text(nb) -> str:
    return "\n".join(
        str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", ""))
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )


def images(nb) -> int:
    return sum(
        "image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert any("parameters" in c.metadata.get("tags", []) for c in code)


def lr_suite_table(folder) -> None:
    """The suite's leaderboard.csv: SIM and SiD at three rates, 2 seeds × 2 noise sets, and the floor; SIM's
    1e-5 cells far from its best, everything else close."""
    folder.mkdir(parents=True)
    shifts = {
        "sim": {"1e-5": 1.0, "1e-4": 0.0, "1e-3": 0.002},
        "sid": {"1e-5": 0.001, "1e-4": 0.0, "1e-3": 0.002},
    }
    family_table(shifts, repeats=2).to_csv(folder / "leaderboard.csv", index=False)


def test_lr_robustness_notebook_draws_the_figure_from_a_saved_sweep_and_the_suite(saved_sweeps):
    lr_suite_table(saved_sweeps / "outputs" / "leaderboard" / "gmm_digits_lr")
    nb = execute("lr_robustness.ipynb", saved_sweeps, 'SWEEP = None\nSWEEPS_ROOT = "outputs/lr_robustness"\n'
                 "WANDB_GROUP = None\nWANDB_PROJECT = 'distillbench'\n"
                 'LR_SUITE = "outputs/leaderboard/gmm_digits_lr"')  # fmt: skip
    text = outputs_text(nb)
    assert "4 runs, 8 evaluations" in text
    assert "final" in text and "best" in text and "sim" in text and "sid" in text
    assert "settings tied with the family's best FID: {'sim': 2, 'sid': 3}" in text, text[-2000:]
    assert images(nb) == 2


def test_ablations_notebook_plots_every_ablation(saved_sweeps):
    nb = execute("ablations.ipynb", saved_sweeps, 'ROOT = "outputs/ablations"\nRUN_MISSING = False\n'
                 "EXTRA_OVERRIDES = []")  # fmt: skip
    text = outputs_text(nb)
    assert f"loaded: {list(ABLATIONS)}" in text
    assert images(nb) == len(ABLATIONS)
    for value in ("p_edm", "pseudo_huber", "l2", "1.5"):
        assert value in text


def test_the_lr_notebook_reads_wandb_runs_named_by_their_overrides(tmp_path):
    """The W&B path of the notebooks, against a stand-in for ``wandb.Api`` (no network here)."""

    from distillbench.sweeps import load_wandb_group, plot_sweep

    class Run:
        def __init__(self, name, fid):
            self.name, self.fid = name, fid

        def history(self, samples, pandas):
            return pd.DataFrame({"train/kimg": [0.0, 0.5, 1.0, 1.0], "train/gen_step": [0, 8, 16, 16],
                                 "train/loss_gen": [None, 1.0, None, 0.5], "eval/samples": [None] * 4,
                                 "eval/fid_clf@1k": [self.fid, None, self.fid / 2, None]})  # fmt: skip

    class Api:
        def runs(self, project, filters):
            assert project == "distillbench" and filters == {"group": "lr_robustness/x"}
            return [
                Run("method=sim,method.lr=0.0001,seed=0", 4.0),
                Run("method=sid,method.lr=0.0001,seed=0", 6.0),
            ]

    frame = load_wandb_group("lr_robustness/x", api=Api())
    assert list(frame["method"]) == ["sim", "sim", "sid", "sid"]
    assert list(frame["fid_clf@1k"]) == [4.0, 2.0, 6.0, 3.0] and list(frame["kimg"]) == [0.0, 1.0, 0.0, 1.0]
    assert plot_sweep(frame, tmp_path / "f.png", metrics=["fid"], hue="method").axes
