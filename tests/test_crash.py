"""A run killed at any point (SIGKILL mid-epoch or mid-checkpoint, Ctrl-C) and resumed ends where
the uninterrupted run ends, with a best.pt whose weights score the best NDCG@10 it records."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model_train
from checkpoint import load_checkpoint, model_from_checkpoint
from build import make_datasets
from conftest import ROOT, ndcg_at_10
from errors import run_script
from ranking import model_scorer
from run import Run

# Runs model_train.main(argv) and SIGKILLs itself at the N-th training step or at the N-th
# torch.save, which it first leaves half-written, as a crash or a power cut would.
KILLER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import torch, model_train
kind, at, calls = sys.argv[2], int(sys.argv[3]), 0

def killing(fn):
    def wrapped(*args, **kwargs):
        global calls
        calls += 1
        if calls == at:
            if kind == "save":  # torch.save(obj, an open file)
                args[1].write(b"half a checkpoint")
                args[1].flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapped

if kind == "save":
    torch.save = killing(torch.save)
else:
    make = model_train.make_training_step
    model_train.make_training_step = lambda *a, **k: killing(make(*a, **k))
model_train.main(sys.argv[4:])
"""


def run_args(data_dir: Path, name: str) -> list[str]:
    pairs = [f"trainer_config.data_dir={data_dir}", "trainer_config.cache=false", "trainer_config.compile=false",
             "trainer_config.num_epochs=3", "trainer_config.patience=null", "trainer_config.batch_size=256",
             f"trainer_config.run_name={name}", "model_config.transformer_config.embedding_dimension=16",
             "model_config.transformer_config.num_layers=1"]
    return [a for p in pairs for a in ("--set", p)]


def weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def uninterrupted(ml1m_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("whole")
    subprocess.run([sys.executable, str(ROOT / "model_train.py"), *run_args(ml1m_dir, "run")], cwd=folder,
                   check=True, capture_output=True)
    return folder / "models" / "run"


def assert_best_matches_its_score(run: Path) -> None:
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert best["state"]["best_ndcg"] == last["state"]["best_ndcg"]
    model, config, _ = model_from_checkpoint(best)
    validation = make_datasets(config)["validation"]
    assert ndcg_at_10(model_scorer(model), validation) == best["state"]["best_ndcg"]


# saves come two an epoch (last.pt, then best.pt when it improved): killed mid-epoch 2 (it resumes
# from epoch 1), writing epoch 1's last.pt (nothing saved: the same command starts the run afresh,
# removing what it wrote and keeping a user's files) and writing epoch 1's best.pt (last.pt intact:
# it resumes, and restores best.pt from it)
@pytest.mark.parametrize("kind,at", [("step", 30), ("save", 1), ("save", 2)])
def test_killed_and_resumed_run_ends_as_the_uninterrupted_one(kind, at, uninterrupted, ml1m_dir, tmp_path,
                                                              monkeypatch):
    killed = subprocess.run([sys.executable, "-c", KILLER, str(ROOT), kind, str(at), *run_args(ml1m_dir, "run")],
                            cwd=tmp_path, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    run = tmp_path / "models" / "run"
    notes = [run / "notes.txt", tmp_path / "runs" / "run" / "notes.txt"]
    for note in notes:
        note.write_text("mine")
    go_on = ["--resume", str(run)] if (run / "last.pt").exists() else run_args(ml1m_dir, "run")
    monkeypatch.chdir(tmp_path)
    model_train.main(go_on)  # in this process: the killed one was another
    assert not list(run.glob(".*.tmp")) and all(note.read_text() == "mine" for note in notes)
    assert_same_weights(run / "last.pt", uninterrupted / "last.pt")
    assert_same_weights(run / "best.pt", uninterrupted / "best.pt")
    assert_best_matches_its_score(run)


def test_ctrl_c_says_what_was_kept_and_resume_continues(uninterrupted, ml1m_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real_epoch = model_train.train_epoch

    def interrupted_in_epoch_2(*args, **kwargs):
        if args[5] == 2:  # the epoch number
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)
    monkeypatch.setattr(model_train, "train_epoch", interrupted_in_epoch_2)
    assert run_script(model_train.main, run_args(ml1m_dir, "run")) == 130
    message = capsys.readouterr().err.split("\r")[-1].strip()
    assert message == ("interrupted: the run stopped during epoch 2, whose progress is discarded; epoch 1 is saved; "
                       "python model_train.py --resume models/run continues with epoch 2")
    monkeypatch.setattr(model_train, "train_epoch", real_epoch)
    model_train.main(["--resume", "models/run"])
    assert_same_weights(tmp_path / "models/run/last.pt", uninterrupted / "last.pt")


def test_sigterm_stops_a_run_as_ctrl_c_does(ml1m_dir, tmp_path):
    """kill (a job scheduler's SIGTERM) keeps what Ctrl-C keeps: a run with no saved epoch leaves no folder."""
    import signal
    import time
    process = subprocess.Popen([sys.executable, str(ROOT / "model_train.py"), *run_args(ml1m_dir, "term"),
                                "--set", "trainer_config.num_epochs=50"], cwd=tmp_path, stderr=subprocess.PIPE,
                               text=True)
    while not (tmp_path / "runs" / "term").exists() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    message = process.communicate(timeout=120)[1].strip().splitlines()[-1].split("\r")[-1].strip()
    assert process.returncode == 130 and message.startswith("interrupted: the run stopped during epoch"), message
    saved = (tmp_path / "models" / "term" / "last.pt").exists()
    assert ("is saved; python model_train.py --resume" in message) == saved
    assert saved or not (tmp_path / "runs" / "term").exists()



# holds the lock files a training run holds (an flock, the holder's pid inside) until it is killed
HOLD_LOCKS = """
import fcntl, os, sys, time
for path in sys.argv[1:]:
    fd = os.open(path, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, str(os.getpid()).encode())
print("held", flush=True)
time.sleep(120)
"""


def test_a_run_that_a_live_process_trains_cannot_be_started_resumed_or_removed(ml1m_dir, tmp_path, monkeypatch,
                                                                            capsys):
    """The lock beside a run folder names its live holder; once that process is killed, the lock is free."""
    monkeypatch.chdir(tmp_path)
    one_epoch = ["--set", "trainer_config.num_epochs=1"]
    model_train.main(run_args(ml1m_dir, "done") + one_epoch)
    (tmp_path / "models" / "live").mkdir()
    live = Run(Path("models/live"), Path("runs/live"))
    live.wrote(live.config_file)
    live.config_file.write_text("{}")  # no epoch saved yet, as a live run early on
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCKS, "models/.live.lock", "models/.done.lock"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for argv, run in ((run_args(ml1m_dir, "live") + one_epoch, "live"), (["--resume", "models/done"], "done")):
            assert run_script(model_train.main, argv) == 2
            assert capsys.readouterr().err.strip().splitlines()[-1] == (
                f"error: the run models/{run} is in use by process {holder.pid} (lock file models/.{run}.lock); "
                "wait for it to end, or choose another trainer_config.run_name")
        assert (tmp_path / "models" / "live" / "config.yaml").read_text() == "{}"  # not removed as unsaved
    finally:
        holder.kill()
        holder.wait()
    model_train.main(run_args(ml1m_dir, "live") + one_epoch)  # the killed holder's lock is free: the unsaved run starts afresh
    assert (tmp_path / "models" / "live" / "last.pt").exists()
    assert not (tmp_path / "models" / ".live.lock").exists()  # released when the run ended


def test_a_folder_holding_only_best_pt_is_a_finished_run_never_started_afresh(ml1m_dir, tmp_path, monkeypatch,
                                                                             capsys):
    """A user who removed the bulky last.pt keeps best.pt: the same command and --resume refuse to
    touch it (before, it was taken for a run killed before its first epoch and removed)."""
    monkeypatch.chdir(tmp_path)
    args = run_args(ml1m_dir, "kept") + ["--set", "trainer_config.num_epochs=1"]
    model_train.main(args)
    (tmp_path / "models/kept/last.pt").unlink()
    best = (tmp_path / "models/kept/best.pt").read_bytes()
    assert run_script(model_train.main, args) == 2
    assert "error: models/kept already exists" in capsys.readouterr().err
    assert run_script(model_train.main, ["--resume", "models/kept/best.pt"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: models/kept holds best.pt but no last.pt, which resuming needs: a finished run whose last.pt was "
        "removed; evaluate it with python eval.py --checkpoint models/kept")
    assert (tmp_path / "models/kept/best.pt").read_bytes() == best
