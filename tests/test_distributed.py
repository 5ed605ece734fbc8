"""torchrun with DistributedDataParallel on CPUs (gloo), two processes on tiny data."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from build import make_datasets
from conftest import ROOT, ndcg_at_10, write_ml1m
from ranking import model_scorer

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def even_data(tmp_path_factory) -> Path:
    """64 users of 22 ratings: 1,024 training windows, as many whole batches of 512 as of 2 x 256."""
    rows = [(u + 1, 7 + 3 * ((u * 5 + i) % 200), 1 + i % 5, 978_300_000 + i) for u in range(64) for i in range(22)]
    return write_ml1m(tmp_path_factory.mktemp("even") / "ml-1m", rows, num_users=64, num_movies=200)


def settings(data_dir: Path, batch_size: int) -> list[str]:
    return [f"trainer_config.data_dir={data_dir}", "trainer_config.cache=false", "trainer_config.compile=false",
            "trainer_config.num_epochs=2", "trainer_config.patience=null", f"trainer_config.batch_size={batch_size}",
            "trainer_config.run_name=run", *(f"model_config.transformer_config.{k}=0.0" for k in
                                             ("embedding_dropout", "attention_dropout", "residual_dropout"))]


def run_training(folder: Path, data_dir: Path, launcher: list[str], batch_size: int,
                 *extra: str) -> subprocess.CompletedProcess:
    args = extra if extra and extra[0] == "--resume" else [a for p in (*settings(data_dir, batch_size), *extra)
                                                            for a in ("--set", p)]
    return subprocess.run([*launcher, str(ROOT / "model_train.py"), *args], cwd=folder, capture_output=True,
                          text=True, timeout=300)


def train(folder: Path, data_dir: Path, launcher: list[str], batch_size: int, *extra: str) -> Path:
    result = run_training(folder, data_dir, launcher, batch_size, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "models" / "run"


def train_in_this_process(folder: Path, data_dir: Path, batch_size: int, *extra: str) -> Path:
    """One process's run, as `python model_train.py` in folder would train it, without a new
    process's start (seconds of imports)."""
    import model_train
    pairs = [*settings(data_dir, batch_size), f"trainer_config.model_dir={folder / 'models'}",
             f"trainer_config.tensorboard_dir={folder / 'runs'}", *extra]
    return model_train.main([a for p in pairs for a in ("--set", p)])


def one_and_two_processes(tmp_path: Path, data_dir: Path, batch_size: int, *extra: str) -> tuple[Path, Path]:
    """Run folders of one process at 2 x batch_size and of two processes at batch_size."""
    (tmp_path / "two").mkdir()
    return (train_in_this_process(tmp_path / "one", data_dir, 2 * batch_size, *extra),
            train(tmp_path / "two", data_dir, TORCHRUN, batch_size, *extra))


@pytest.fixture(scope="module")
def two_at_256(even_data, tmp_path_factory) -> Path:
    """Two processes at batch 256 for 2 epochs: the run folder (its TensorBoard folder beside it)."""
    return train(tmp_path_factory.mktemp("two"), even_data, TORCHRUN, 256)


def test_two_processes_at_batch_b_step_as_one_at_batch_2b(even_data, two_at_256, tmp_path):
    one = train_in_this_process(tmp_path, even_data, 512)
    a, b = load_checkpoint(one / "last.pt"), load_checkpoint(two_at_256 / "last.pt")
    assert a["schedule"]["last_epoch"] == b["schedule"]["last_epoch"] == 4  # two steps an epoch
    # Adam turns float noise in near-zero gradients (the key bias) into steps of up to ~1e-5
    assert all(torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=5e-5) for k in a["model"])
    # rank 0 alone wrote: one TensorBoard folder, one set of checkpoints
    assert sorted(p.name for p in two_at_256.iterdir()) == [".written", "best.pt", "config.yaml", "curves.png",
                                                            "last.pt"]
    writers = {f.name.split(".")[-2] for f in (two_at_256.parents[1] / "runs" / "run").iterdir()}  # events...<pid>.<n>
    assert len(writers) == 1


def test_sequence_mode_weighs_each_target_once_over_processes(even_data, tmp_path):
    """Chunks hold different numbers of targets, so the two processes' shares of a step differ;
    the step must still be that of one process over all of them. 64 users cut into 192-256
    chunks of context 8: one step an epoch at 256 chunks, or 128 per process (the rest on rank 1)."""
    sequence = ["model_config.mode=sequence", "model_config.transformer_config.context_window_size=8",
                "trainer_config.learning_rate=0.01"]
    one, two = one_and_two_processes(tmp_path, even_data, 128, *sequence)
    a, b = load_checkpoint(one / "last.pt"), load_checkpoint(two / "last.pt")
    assert a["schedule"]["last_epoch"] == b["schedule"]["last_epoch"] == 2
    # packed rows sum in another order than one process's: Adam's noise reaches ~7e-5 here; a
    # share weighed wrongly moves weights by ~1e-3 (learning rate 0.01)
    assert all(torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=2e-4) for k in a["model"])


def test_sharded_validation_equals_one_process_and_resume_continues(even_data, two_at_256, tmp_path):
    best = load_checkpoint(two_at_256 / "best.pt")
    model, config, _ = model_from_checkpoint(best)
    single = ndcg_at_10(model_scorer(model), make_datasets(config)["validation"])
    assert best["state"]["best_ndcg"] == pytest.approx(single, abs=1e-12)

    halted = train(tmp_path, even_data, TORCHRUN, 256, "trainer_config.num_epochs=1")
    resumed = train(tmp_path, even_data, TORCHRUN, 256, "--resume", str(halted), "--set", "trainer_config.num_epochs=2")
    a, b = load_checkpoint(two_at_256 / "last.pt")["model"], load_checkpoint(resumed / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_error_on_rank_0_ends_every_process_with_its_line(even_data, tmp_path):
    """Rank 0 finds the run folder taken: its one line, and every process exits with the error's
    status (2) rather than waiting for rank 0 or aborting on the way out."""
    (tmp_path / "models" / "run").mkdir(parents=True)
    (tmp_path / "models" / "run" / "last.pt").write_bytes(b"a run's checkpoint")
    result = run_training(tmp_path, even_data, TORCHRUN, 256)
    assert result.returncode != 0
    assert "error: models/run already exists" in result.stderr
    assert re.search(r"exitcode\s*:\s*2 ", result.stderr), result.stderr[-3000:]  # torchrun's report
    assert "terminate called" not in result.stderr
    assert (tmp_path / "models" / "run" / "last.pt").read_bytes() == b"a run's checkpoint"


def test_a_config_error_under_torchrun_is_said_once(even_data, tmp_path):
    result = run_training(tmp_path, even_data, TORCHRUN, 256, "trainer_config.num_epochs=0")
    said = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and said == ["error: trainer_config.num_epochs is 0 (from --set); it must be "
                                               "at least 1"], result.stderr[-2000:]


def test_sigterm_to_torchrun_ends_every_process_at_once(even_data, tmp_path):
    """kill (a job scheduler's SIGTERM) reaches every rank, and they end at once (the others waited
    for torchrun's kill 30 s later), the last checkpoint whole. Rank 0 says what is kept unless the
    signal found it waiting in a collective for a rank that had already ended (then gloo's error
    is its last word: a race this test leaves alone)."""
    import signal
    import time
    args = [f"trainer_config.data_dir={even_data}", "trainer_config.cache=false", "trainer_config.compile=false",
            "trainer_config.num_epochs=500", "trainer_config.patience=null", "trainer_config.batch_size=64",
            "trainer_config.run_name=run"]
    process = subprocess.Popen([*TORCHRUN, str(ROOT / "model_train.py"), *(a for p in args for a in ("--set", p))],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.perf_counter() + 180
        while not (tmp_path / "models" / "run" / "last.pt").exists() and process.poll() is None:
            assert time.perf_counter() < deadline, "no epoch saved in 3 minutes"
            time.sleep(0.1)
        sent = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        err = process.communicate(timeout=60)[1]
    finally:
        process.kill()  # a no-op once it has ended
    assert time.perf_counter() - sent < 10, err[-2000:]
    assert load_checkpoint(tmp_path / "models" / "run" / "last.pt")["state"]["epoch"] >= 1
