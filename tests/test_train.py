"""``adalora-kernels train``: learns, reports, and matches PEFT trained side by side (tiny LLaMA, no download)."""

import json
import statistics

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from adalora_kernels.cli import main
from adalora_kernels.train import rank_table


def test_train_tiny_llama_matches_peft(tmp_path):
    out = tmp_path / "train.json"
    argv = ["train", "--model", "tiny-llama", "--steps", "30", "--init-r", "4", "--target-r", "2", "--lr", "1e-2",
            "--compare-peft", "--compare-accelerated", "--compare-frozen", "--json", str(out),
            "--plot", str(tmp_path / "ranks.png")]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert len(data["losses"]) == len(data["budgets"]) == 30
    assert data["budgets"][0] == 4 * 14 and data["budgets"][-1] == 2 * 14  # 2 layers × 7 projections
    assert sum(map(sum, data["rank_pattern"].values())) <= 2 * 14
    assert sum(data["losses"][-5:]) < sum(data["losses"][:5])  # it learns
    assert data["peft"]["max_loss_diff"] < 1e-4 and data["peft"]["same_rank_pattern"]  # interleaved runs too
    frozen = data["frozen"]  # the floor, measured in the same interleaved run
    assert len(frozen["step_ms"]) == 30 and frozen["slowdown_vs_frozen"] > 0
    ratio = statistics.median(data["peft"]["step_ms"]) / statistics.median(frozen["step_ms"])
    assert data["peft"]["slowdown_vs_frozen"] == pytest.approx(ratio)
    accelerated = data["accelerated"]  # PEFT's model after accelerate_peft, from PEFT's own adapters
    assert accelerated["max_loss_diff_vs_peft"] < 1e-4 and len(accelerated["step_ms"]) == 30
    assert accelerated["speedup_vs_peft"] > 0 and accelerated["slowdown_vs_frozen"] > 0
    assert (tmp_path / "ranks.png").stat().st_size > 1000


def test_rank_table_groups_layers_and_modules():
    pattern = {
        "bert.encoder.layer.0.attention.self.query": [True, False],
        "bert.encoder.layer.1.attention.output.dense": [True, True],
        "bert.encoder.layer.1.intermediate.dense": [False, False],
        "bert.pooler.dense": [True, False],
    }
    layers, modules, grid = rank_table(pattern)
    assert layers == ["0", "1", "pooler"] and modules == ["attn_out", "dense", "intermediate", "query"]
    assert grid == [[None, None, None, 1], [2, None, 0, None], [None, 1, None, None]]  # None: no such module


def test_bad_train_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--init-r", "2", "--target-r", "3"])
    assert exit_info.value.code == 2
    assert "--target-r: expected 0 <= target_r <= init_r (2), got 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--model", "gpt-9"])
    assert "unknown model 'gpt-9'; valid: auto, minilm, tiny-llama" in capsys.readouterr().err
