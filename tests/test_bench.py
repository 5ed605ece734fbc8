"""The benchmark runs end to end on the synthetic fixture (its numbers are not checked here), and
its post-style reference reads every layout."""
import importlib.util
import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from data import load_movielens
from releases import FORMATS
from synthetic import write_movielens


def test_bench_writes_every_key(ml1m_dir, tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--data-dir", str(ml1m_dir),
                    "--json", str(out), "--repeats", "1", "--train-steps", "3",
                    "--set", "trainer_config.compile=false"], check=True,
                   capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    keys = {"read_ratings_s", "load_s", "load_cached_s", "train_samples_per_s", "train_epoch_s", "eval_users_per_s",
            "rank_users_per_s", "peak_rss_mb"}
    assert keys <= set(result) and keys <= set(result["reference"]) and keys <= set(result["ratios"])
    assert result["device"].startswith("cpu")
    assert all(value > 0 for value in result["ratios"].values())


def load_bench():
    """benchmarks/bench.py as a module (it imports its sibling measure.py)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_post_style_loader_reads_every_layout(fmt, tmp_path):
    """The post-style reference pipeline reads each release's layout into the same tokens: every
    window's target is EOS or a movie its user rated."""
    folder = write_movielens(tmp_path / fmt, fmt, num_users=30, num_movies=40, num_ratings=900, seed=1)
    inputs, targets, users = load_bench().load_post_style(folder)
    movielens = load_movielens(folder, cache=False)
    rated = {(u, int(m)) for u in range(movielens.metadata.num_users) for m in movielens.history(u)[0]}
    n = movielens.lengths.numpy()
    assert inputs.shape[1] == 5 and 0.8 * (n - 3).sum() < len(targets) <= (n - 3).sum()
    assert all(t == movielens.metadata.eos or (u, t) in rated for u, t in zip(users.tolist(), targets.tolist()))


def test_sequence_epoch_reports_its_shares_and_flops(ml1m_dir, tmp_path):
    out = tmp_path / "sequence.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sequence_epoch.py"), "--data-dir", str(ml1m_dir),
                    "--steps", "3", "--json", str(out), "--set", "model_config.transformer_config.context_window_size=20",
                    "--set", "trainer_config.batch_size=16", "--set", "trainer_config.compile=false"],
                   check=True, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    assert 0 < result["trained_share"] <= result["real_share"] <= 1
    assert result["batches"] == 3 and result["model_tflop"] > 0 and 0 < result["fraction_of_matmul"]


def test_time_to_quality_reads_each_validation_against_the_minutes(ml1m_dir, tmp_path, capfd):
    """One run stopped by --minutes: a row per validation, minutes rising, the thresholds it
    reached and not; the run is read back rather than trained again; one stopped otherwise
    cannot be timed."""
    spec = importlib.util.spec_from_file_location("time_to_quality", ROOT / "benchmarks" / "time_to_quality.py")
    time_to_quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(time_to_quality)
    config = tmp_path / "small.yaml"
    config.write_text(f"trainer_config: {{data_dir: {ml1m_dir}, num_epochs: 1000, batch_size: 256, compile: false}}\n"
                      "model_config: {transformer_config: {embedding_dimension: 16, num_layers: 1}}\n")
    argv = ["--config", str(config), "--out", str(tmp_path / "out"), "--thresholds", "0.01", "0.99", "--minutes", "0.4"]
    start = time.monotonic()
    curve = time_to_quality.main(argv)["small"]
    assert time.monotonic() - start < 0.4 * 60 + 30  # stopped at the cap, its checkpoint saved in seconds
    assert len(curve) >= 1 and list(curve.epoch) == list(range(1, len(curve) + 1))
    assert curve.minutes.is_monotonic_increasing and curve.minutes.iloc[-1] < 0.4
    assert (curve.train_minutes > 0).all() and (curve.validation_minutes > 0).all()
    assert (curve.train_minutes + curve.validation_minutes < curve.minutes).all()  # loading counts too
    row = next(line for line in (tmp_path / "out" / "time_to_quality.md").read_text().splitlines()
               if line.startswith("| small |")).split(" | ")
    assert row[1] != "-" and row[2] == "-"  # reached 0.01, never 0.99
    assert (tmp_path / "out" / "time_to_quality.png").stat().st_size > 1000
    capfd.readouterr()
    assert time_to_quality.main(argv)["small"].equals(curve)
    assert "epoch 1" not in capfd.readouterr().err  # read back, not trained again
    (tmp_path / "out" / "starts.json").write_text("{}")  # as if trained otherwise
    with pytest.raises(time_to_quality.UserError, match="did not time from its start"):
        time_to_quality.main(argv)
