"""``python -m distillbench.gpu_check``: the GPU check's cases, results file and bad input, run on the CPU
with a tiny DDPM++ (the check itself is for one GPU; see docs/performance.md)."""

from __future__ import annotations

import json

from tests.helpers import run_cli

TINY_NET = ["net.model_channels=16", "net.channel_mult=[1,1]", "net.num_blocks=1", "net.attn_resolutions=[]",
            "batch_size=2", "warmup=1", "steps=2", "compile=[false]"]  # fmt: skip


def test_every_case_gets_a_row_with_throughput_and_the_table_is_written(tmp_path):
    out = tmp_path / "check.json"
    run_cli("distillbench.gpu_check", *TINY_NET, "methods=[sim,sid]", f"out={out}",
            f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["device"].startswith("CPU") and result["network"] == "SongUNet" and result["parameters"] > 0
    cases = [(r["method"], r["precision"], r["compile"]) for r in result["rows"]]
    assert cases == [(m, p, False) for m in ("sim", "sid") for p in ("32-true", "bf16-mixed")]
    for row in result["rows"]:
        assert row["status"] == "ok" and row["images_per_second"] > 0 and row["ms_per_update"] > 0
    table = out.with_suffix(".md").read_text()
    assert table.count("| sim |") == 2 and "SongUNet" in table


def test_cases_past_the_budget_are_recorded_as_skipped(tmp_path):
    out = tmp_path / "check.json"
    run_cli("distillbench.gpu_check", *TINY_NET, "methods=[di]", "budget_s=-1", f"out={out}",
            f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["status"].startswith("skipped: past budget_s") for r in rows)


def test_an_unknown_method_exits_2_before_any_work(tmp_path):
    proc = run_cli("distillbench.gpu_check", "methods=[sim,dmd]", f"out={tmp_path / 'c.json'}",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 2 and "unknown ['dmd']" in proc.stderr and not (tmp_path / "c.json").exists()
