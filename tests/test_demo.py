"""`vlmalign demo` end to end at a tiny step scale: every stage runs and the report is complete and self-contained.
(The full-scale demo and its accuracy table are measured separately; see the closing notes / README.)"""

import json

from vlmalign.recipes.demo import run_demo


def test_demo_writes_a_complete_report(tmp_path):
    summary = run_demo(tmp_path / "report", steps=0.04, n_compare=4, sft_target=0.0, n_test=16)
    methods = [row["method"] for row in summary["table"]]
    assert methods == ["random init", "SFT start", "DPO", "MPO", "GRPO", "GSPO"]
    out = tmp_path / "report"
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "http://" not in page and "https://" not in page
    assert page.count("<img alt='row ") == 4                       # every compared image is inlined
    assert page.count("data:image/png;base64,") >= 4 + 2           # + the training-curve plots
    for method in methods:
        assert f"<td>{method}</td>" in page
    md = (out / "report.md").read_text()
    assert "| GSPO |" in md and all((out / "images" / f"row_{i}.png").exists() for i in range(4))
    assert (out / "training_loss.png").exists()
    assert json.loads((out / "summary.json").read_text())["table"] == summary["table"]
