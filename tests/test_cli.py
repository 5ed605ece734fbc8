import copy
import csv
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model_train
from build import pick_device
from checkpoint import load_checkpoint, model_from_checkpoint
from config import DEFAULT_CONFIG, load_config
from errors import ConfigError, run_script
from conftest import ROOT, SMALL_MODEL

FAST = [*SMALL_MODEL, "trainer_config.log_every=5"]


def sets(*pairs: str) -> list[str]:
    return [arg for pair in (*FAST, *pairs) for arg in ("--set", pair)]


@pytest.fixture()
def workdir(tmp_path, monkeypatch, ml1m_dir) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_eval_resume_end_to_end(workdir, ml1m_dir, capsys):
    run = model_train.main(sets(f"trainer_config.data_dir={ml1m_dir}", "trainer_config.num_epochs=2",
                                "trainer_config.run_name=e2e", "trainer_config.patience=null",
                                "trainer_config.eval_every=2",
                                "trainer_config.compile=false"))  # compiled: tests/test_train_step.py, test_eval.py
    assert run == Path("models/e2e")
    assert {p.name for p in run.iterdir()} >= {"best.pt", "last.pt", "config.yaml"}
    assert list(Path("runs/e2e").glob("events.out.tfevents.*"))
    last = load_checkpoint(run / "last.pt")
    assert last["state"]["epoch"] == 2 and last["metadata"]["name"] == "ml-1m"

    capsys.readouterr()
    importlib.import_module("eval").main(["--checkpoint", str(run / "best.pt"), "--save-predictions", "pred.csv"])
    out = capsys.readouterr().out  # eval.py as a script: tests/test_experiments.py's sweeps run it
    assert "| model |" in out and "| most-rated |" in out and "| top-rated-popular |" in out
    assert "ndcg@10" in out and (run / "eval_test_history_k10.json").exists()
    rows = list(csv.DictReader(open("pred.csv")))
    assert len(rows) == 300 * 10 and rows[0]["rank"] == "1"
    assert {int(r["item_id"]) for r in rows} <= {7 + 3 * m for m in range(200)}  # MovieLens ids

    model_train.main(["--resume", str(run), "--set", "trainer_config.num_epochs=3"])
    resumed = load_checkpoint(run / "last.pt")
    assert resumed["state"]["epoch"] == 3
    from tbparse import SummaryReader
    scalars = SummaryReader("runs/e2e").scalars
    assert sorted(scalars[scalars.tag == "loss/train"].step.tolist()) == [1, 2, 3]
    # validation (its loss too) every eval_every epochs and after the last: epoch 1 paid none
    for tag in ("loss/validation", "metrics/validation/ndcg@10", "time/validation_s"):
        assert sorted(scalars[scalars.tag == tag].step.tolist()) == [2, 3], tag
    assert set(scalars.tag) >= {"loss/validation", "metrics/validation/ndcg@10", "lr",
                                "throughput/samples_per_s"}


def test_a_run_says_when_it_compiles_and_how_long_it_will_take(workdir, ml1m_dir, monkeypatch):
    """The messages of a compiled run; torch.compile itself returns its function unchanged here
    (a cold compile of the training step took 60 s; tests/test_train_step.py checks what it builds)."""
    from loguru import logger
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f))
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    try:
        model_train.main(sets(f"trainer_config.data_dir={ml1m_dir}", "trainer_config.num_epochs=3",
                              "trainer_config.run_name=pace", "trainer_config.compile=true"))
    finally:
        logger.remove(sink)
    starts = next(i for i, line in enumerate(lines) if line.startswith("epoch 1:"))
    assert any(line.startswith("torch.compile builds the training step") for line in lines[:starts])
    pace = [line for line in lines if " s an epoch: the " in line]
    assert len(pace) == 1 and lines.index(pace[0]) == lines.index(next(line for line in lines
                                                                      if line.startswith("epoch 2:"))) + 1
    assert "the 1 epoch left (trainer_config.num_epochs 3) take at most" in pace[0]


def test_tqdm_disable_silences_the_progress_bars(workdir, ml1m_dir):
    """Notebooks set TQDM_DISABLE=1 to keep progress bars out of their cells."""
    import os
    result = subprocess.run([sys.executable, str(ROOT / "model_train.py"),
                             *sets(f"trainer_config.data_dir={ml1m_dir}", "trainer_config.num_epochs=1",
                                   "trainer_config.compile=false", "trainer_config.run_name=quiet")],
                            capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}, check=True)
    assert "epoch 1:" in result.stderr and "it/s" not in result.stderr and "\r" not in result.stderr


@pytest.mark.parametrize("script, shown", [("eval", "the cut-offs K of the metrics (default: 10)"),
                                           ("recommend", "movies to recommend (default: 10)"),
                                           ("experiments", "seeds 1..N for every variant (default: 3)")])
def test_help_shows_the_defaults(script, shown, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(script).main(["--help"])
    assert shown in " ".join(capsys.readouterr().out.split())


def test_same_config_gives_same_losses(workdir, ml1m_dir):
    losses = []
    for name in ("a", "b"):
        run = model_train.main(sets(f"trainer_config.data_dir={ml1m_dir}", "trainer_config.num_epochs=1",
                                    "trainer_config.compile=false", f"trainer_config.run_name={name}"))
        state = load_checkpoint(run / "last.pt")["model"]
        losses.append(state)
    assert all(torch.equal(losses[0][k], losses[1][k]) for k in losses[0])


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="learning_rat"):
        load_config(DEFAULT_CONFIG, ["trainer_config.learning_rat=0.1"])
    with pytest.raises(ValueError, match="trainer_config.batch_size"):
        load_config(DEFAULT_CONFIG, ["trainer_config.batch_size=many"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(DEFAULT_CONFIG, ["batch_size"])


def test_renamed_and_removed_keys_name_what_replaced_them(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("trainer_config:\n  window_size: 2\n")
    with pytest.raises(ValueError, match="trainer_config.window_size is now called trainer_config.window_stride"):
        load_config(old)
    with pytest.raises(ValueError, match="compile_mode is no longer a setting"):
        load_config(DEFAULT_CONFIG, ["trainer_config.compile_mode=default"])


def test_checkpoint_of_an_earlier_version(workdir, ml1m_dir, capsys):
    """A checkpoint without the keys added since (they take their defaults) loads for eval.py and
    recommend.py and resumes; one with a key this version renamed (window_size) or dropped
    (compile_mode) gets one line from each script saying what to do, and is left as it was."""
    run = model_train.main(sets(f"trainer_config.data_dir={ml1m_dir}", "trainer_config.num_epochs=1",
                                "trainer_config.compile=false", "trainer_config.run_name=old"))
    checkpoint = load_checkpoint(run / "last.pt")
    tc, mc = checkpoint["config"]["trainer_config"], checkpoint["config"]["model_config"]
    del tc["rating_weights"], mc["position_bias"], mc["movie_features"], checkpoint["metadata"]["user_features"]
    _, config, _ = model_from_checkpoint(checkpoint)
    assert config.trainer_config.rating_weights is None and config.model_config.movie_features == []
    torch.save(checkpoint, run / "last.pt")
    model_train.main(["--resume", str(run), "--set", "trainer_config.num_epochs=2"])
    assert load_checkpoint(run / "last.pt")["state"]["epoch"] == 2

    current = load_checkpoint(run / "last.pt")
    for old, value in (("window_size", 1), ("compile_mode", "default")):
        checkpoint = copy.deepcopy(current)
        checkpoint["config"]["trainer_config"][old] = value
        torch.save(checkpoint, run / "old.pt")
        for main, argv in ((model_train.main, ["--resume", str(run)]),
                           (importlib.import_module("eval").main, ["--checkpoint", str(run / "old.pt")]),
                           (importlib.import_module("recommend").main, ["--checkpoint", str(run / "old.pt"),
                                                                        "--user", "1"])):
            if main is model_train.main:
                torch.save(checkpoint, run / "last.pt")
            capsys.readouterr()
            assert run_script(main, argv) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"trainer_config.{old}" in err, err
            assert "written by an earlier version of this repo" in err and "--set" not in err, err


def test_default_config_is_the_posts_model():
    config = load_config()
    mc, tc = config.model_config, config.trainer_config
    assert (mc.transformer_config.context_window_size, mc.transformer_config.embedding_dimension,
            mc.transformer_config.num_layers, mc.transformer_config.num_heads) == (5, 32, 4, 4)
    assert (mc.user_embedding_dimension, mc.interaction_mlp_hidden_sizes) == (32, [16])
    assert (tc.batch_size, tc.learning_rate, tc.split) == (512, 1e-3, "leave_one_out")


def test_missing_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        pick_device("cuda")
    assert pick_device("auto").type in ("cpu", "mps")


def test_checkpoint_is_written_atomically(tmp_path):
    from run import Run

    run = Run(tmp_path, tmp_path / "runs")
    run.save({"x": torch.ones(2)}, improved=True)
    assert torch.equal(torch.load(run.last, weights_only=True)["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".written", "best.pt", "last.pt"]


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for the signal (Python installs none for SIGTERM itself)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signum - 1) & 1)


@pytest.mark.parametrize("script", ["model_train.py", "eval.py", "recommend.py", "experiments.py"])
def test_ctrl_c_while_a_script_loads_is_one_line(script, tmp_path):
    """Ctrl-C in the seconds a script spends importing torch ended in an import's traceback. The
    signal goes once the script's first statement has taken SIGTERM (Linux: /proc's SigCgt mask),
    so that it finds the script loading, however fast the machine."""
    import signal
    import time
    for _ in range(5):  # a loaded machine may leave this process asleep until the script is done: try again
        process = subprocess.Popen([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while process.poll() is None and not catches(process.pid, signal.SIGTERM):
            time.sleep(0.01)
        if process.poll() is None:
            break
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 130 and err == "interrupted\n", (process.returncode, err)
