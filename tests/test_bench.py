"""The benchmark runs end to end on the synthetic fixture (its numbers are not checked here)."""
import json
import subprocess
import sys

from conftest import ROOT


def test_bench_writes_every_key(ml1m_dir, tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--data-dir", str(ml1m_dir),
                    "--json", str(out), "--repeats", "1", "--train-steps", "3"], check=True,
                   capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    keys = {"read_ratings_s", "load_s", "load_cached_s", "train_samples_per_s", "train_epoch_s", "eval_users_per_s",
            "rank_users_per_s", "peak_rss_mb"}
    assert keys <= set(result) and keys <= set(result["reference"]) and keys <= set(result["ratios"])
    assert result["device"].startswith("cpu")
    assert all(value > 0 for value in result["ratios"].values())
