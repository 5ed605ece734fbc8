import os
import re
import time
"""Bad input gets one line that names it and a non-zero exit; nothing already written is lost."""
import errno
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from loguru import logger

import data
import releases
import eval as evaluation
import experiments
import model_train
import recommend
from build import make_datasets
from config import DEFAULT_CONFIG, load_config
from conftest import ROOT, write_ml1m
from errors import ConfigError, run_script

FAST = ["model_config.transformer_config.embedding_dimension=16", "model_config.transformer_config.num_layers=1",
        "trainer_config.batch_size=256", "trainer_config.compile=false"]


def sets(*pairs: str) -> list[str]:
    return [arg for pair in (*FAST, *pairs) for arg in ("--set", pair)]


def one_line_error(capsys, main, argv: list[str]) -> str:
    """Run a script's main as the command line would; its stderr, checked to be one line."""
    capsys.readouterr()
    code = run_script(main, argv)
    err = capsys.readouterr().err.split("\r")[-1].strip()  # after the progress bars
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), (code, err)
    return err


@pytest.fixture()
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def checkpoint(ml1m_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    config = load_config(overrides=[f"trainer_config.data_dir={ml1m_dir}", "trainer_config.num_epochs=1",
                                    f"trainer_config.model_dir={folder / 'models'}",
                                    f"trainer_config.tensorboard_dir={folder / 'runs'}", *FAST])
    return model_train.train(config) / "best.pt"


# ----------------------------------------------------------------------------- data

def test_any_64_bit_timestamps_keep_each_users_order():
    """Timestamps spanning more than 2^32 (milliseconds, one stray huge value) once interleaved users."""
    rng = np.random.default_rng(0)
    n = 2000
    ratings = pd.DataFrame({"user_id": rng.integers(1, 41, n), "movie_id": rng.integers(1, 51, n),
                            "rating": rng.integers(1, 6, n),
                            "timestamp": rng.integers(0, 3, n) * 10**12 + rng.integers(0, 1000, n)})
    ratings.loc[7, "timestamp"] = 2**62
    ratings.loc[8, "timestamp"] = -2**62
    users, movies = pd.DataFrame({"user_id": range(1, 41)}), pd.DataFrame(
        {"movie_id": range(1, 51), "title": "t", "genres": "g"})
    movielens = data.tokenize("ml-1m", users, movies, ratings)
    expected = ratings.assign(line=range(n)).sort_values(["user_id", "timestamp", "line"])
    for u in range(40):
        got = movielens.history(u)[0].tolist()
        assert got == (expected[expected.user_id == u + 1].movie_id - 1).tolist()
    assert data.time_order(np.array([1, 0, 1]), np.array([5, 2**40, -3])).tolist() == [1, 2, 0]


def test_millisecond_timestamps_are_an_error_naming_the_line(tmp_path):
    folder = write_ml1m(tmp_path / "ml-1m", num_users=3, num_movies=3)
    (folder / "ratings.dat").write_text("1::7::3::978300000\n2::10::4::978300001000\n")
    with pytest.raises(releases.MovieLensFormatError, match=r"ratings.dat, line 2: timestamp 978300001000 .* seconds"):
        releases.read_movielens(folder)


def test_duplicate_ratings_are_dropped_and_reported(tmp_path):
    folder = write_ml1m(tmp_path / "ml-1m", num_users=3, num_movies=3)
    (folder / "ratings.dat").write_text("1::7::3::10\n2::10::4::11\n1::7::3::10\n1::7::5::12\n1::7::3::10\n")
    messages = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        _, _, _, ratings = releases.read_movielens(folder)
    finally:
        logger.remove(sink)
    assert ratings.timestamp.tolist() == [10, 11, 12]  # a later re-rating is a rating of its own
    assert len(messages) == 1 and "2 duplicate ratings" in messages[0] and "line 3" in messages[0]


def test_an_empty_ratings_file_has_its_own_message(tmp_path):
    folder = write_ml1m(tmp_path / "ml-1m", num_users=3, num_movies=3)
    (folder / "ratings.dat").write_text("")
    with pytest.raises(releases.DataError, match="ratings.dat holds no ratings"):
        releases.read_movielens(folder)


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("assignment,message", [
    ("trainer_config.batch_size=-5", "trainer_config.batch_size is -5 (from --set); it must be at least 1"),
    ("trainer_config.patience=0", "trainer_config.patience is 0 (from --set); it must be at least 1, or null"),
    ("trainer_config.eval_every=0", "trainer_config.eval_every is 0"),
    ("trainer_config.eval_batch_size=0", "trainer_config.eval_batch_size is 0"),
    ("trainer_config.num_epochs=0", "trainer_config.num_epochs is 0"),
    ("trainer_config.split=random", "trainer_config.split is 'random' (from --set); it must be one of"),
    ("model_config.mode=seq", "model_config.mode is 'seq'"),
    ("model_config.transformer_config.num_heads=5", "num_heads is 5 (from --set); it must be a divisor"),
    ("model_config.transformer_config.attention_dropout=1.0", "attention_dropout is 1.0"),
    ("trainer_config.optimizer=sgd", "trainer_config.optimizer is 'sgd'"),
    ("trainer_config.lr_schedule=linear", "trainer_config.lr_schedule is 'linear'"),
    ("model_config.tie_output_embeddings=true", "a list ending in embedding_dimension (32) when tie_output_embeddings"),
    ("trainer_config.batch_size=many", "trainer_config.batch_size is 'many' (from --set), which is not of type int"),
    ("trainer_config.learning_rat=0.1", "unknown config key trainer_config.learning_rat (from --set); did you mean "
                                        "trainer_config.learning_rate?"),
    ("trainer_confg.seed=1", "unknown config key trainer_confg (from --set); did you mean trainer_config?"),
    ("trainer_config.tensorboard_dir=models", "trainer_config.tensorboard_dir is 'models' (from --set); it must be "
                                              "another folder than trainer_config.model_dir ('models')"),
])
def test_a_bad_setting_fails_at_once_naming_key_and_origin(assignment, message):
    with pytest.raises(ConfigError) as error:
        load_config(DEFAULT_CONFIG, [assignment])
    assert message in str(error.value)


def test_bad_config_files_name_the_file(tmp_path):
    empty, broken, bad = tmp_path / "empty.yaml", tmp_path / "broken.yaml", tmp_path / "bad.yaml"
    empty.write_text("")
    broken.write_text("trainer_config:\n  batch_size: [1\n  seed: 2\n")
    bad.write_text("trainer_config:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match="empty.yaml is empty"):
        load_config(empty)
    with pytest.raises(ConfigError, match=r"broken.yaml, line \d: not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match=r"trainer_config.batch_size is 0 \(from .*bad.yaml\)"):
        load_config(bad)


BOMB = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]  # 9**9 values once expanded


@pytest.mark.parametrize("value, message", [
    ("{" + ", ".join(BOMB) + "}", "more than 100,000 values once its aliases are expanded"),
    ("[" * 5000 + "]" * 5000, "nested too deeply (at most 32 levels)"),
    ("[" * 40 + "]" * 40, "nested too deeply (at most 32 levels)"),
    ("{seed: 1, seed: 2}", "line 1: not valid YAML (the key 'seed' is given twice)"),
])
def test_a_hostile_yaml_is_refused_at_once_naming_the_file(tmp_path, value, message):
    """An alias bomb was a MemoryError after ~50 s, deep nesting a RecursionError, a key given
    twice silently the last; each is now a ConfigError at once, in a config, a --set value and a
    grid."""
    path = tmp_path / "hostile.yaml"
    path.write_text(f"trainer_config: {value}\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"hostile.yaml.*{re.escape(message)}"):
        load_config(path)
    assert time.perf_counter() - start < 1
    with pytest.raises(ConfigError, match=f"--set 'model_config.mode=.*{re.escape(message)}"):
        load_config(DEFAULT_CONFIG, ["model_config.mode=" + value])
    with pytest.raises(ConfigError, match=re.escape(message)):
        experiments.read_grid(path)


def test_data_that_leaves_no_validation_target_is_named(workdir, capsys):
    """Users of two ratings each leave leave-one-out no validation target: it was a ValueError from
    torch.cat in the first validation."""
    rows = [(u, 7 + 3 * m, 4, 1000 * u + m) for u in range(1, 31) for m in range(2)]
    data_dir = write_ml1m(workdir / "ml-1m", rows=rows, num_users=30, num_movies=10)
    assert "no validation targets in" in one_line_error(capsys, model_train.main,
                                                         sets(f"trainer_config.data_dir={data_dir}"))


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_a_seed_out_of_range_is_refused(seed):
    with pytest.raises(ConfigError, match=r"trainer_config.seed is -?\d+ \(from --set\); it must be"):
        load_config(DEFAULT_CONFIG, [f"trainer_config.seed={seed}"])


@pytest.mark.parametrize("grid, message", [
    ("deeper: {model_config.transformer_config.num_layer: 4}",
     "unknown config key model_config.transformer_config.num_layer (from {grid}, variant deeper); did you mean"),
    ("wider: {model_config.transformer_config.embedding_dimension: 0}",
     "embedding_dimension is 0 (from {grid}, variant wider)"),
    ("- base", "{grid}: expected a mapping of variant names to overrides"),
    ("", "{grid}: expected a mapping of variant names to overrides"),
    ("base: [1]", "{grid}: variant base must map config keys to values"),
    ("base: {a: [1}", r"{grid}, line 1: not valid YAML"),
])
def test_a_bad_grid_fails_before_any_run_naming_the_file_and_variant(grid, message, workdir, capsys):
    path = workdir / "grid.yaml"
    path.write_text(grid + "\n")
    assert message.format(grid=path) in one_line_error(capsys, experiments.main, ["--grid", str(path)])
    assert not (workdir / "experiments").exists()


def test_a_missing_grid_is_named_as_one(workdir, capsys):
    assert "cannot read the grid nowhere.yaml" in one_line_error(capsys, experiments.main, ["--grid", "nowhere.yaml"])


def test_a_failing_run_stops_the_sweep_after_its_own_message(workdir, capfd):
    capfd.readouterr()
    code = run_script(experiments.main, ["--set", f"trainer_config.data_dir={workdir / 'nowhere'}"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and "holds no MovieLens files" in err[-2]
    assert err[-1] == "error: training base-seed1 failed (exit status 2; the lines above say why)"


def test_a_context_beyond_every_history_fails_before_training(ml1m_dir):
    config = load_config(overrides=[f"trainer_config.data_dir={ml1m_dir}",
                                    "model_config.transformer_config.context_window_size=10000"])
    with pytest.raises(ConfigError, match=r"context_window_size is 10000 \(from --set\), longer than every history"):
        make_datasets(config)


# ----------------------------------------------------------------------------- command lines

def test_errors_are_one_line_without_traceback_unless_debug(workdir, ml1m_dir):
    command = [sys.executable, str(ROOT / "model_train.py"), "--set", "trainer_config.batch_size=-5"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: trainer_config.batch_size is -5 (from --set); "
                                                  "it must be at least 1"]
    debug = subprocess.run(command + ["--debug"], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_bad_data_line_is_one_line(workdir, tmp_path, capsys):
    folder = write_ml1m(tmp_path / "bad" / "ml-1m", num_users=3, num_movies=3)
    (folder / "ratings.dat").write_text("1::7::3::10\n1::x::3::11\n")
    err = one_line_error(capsys, model_train.main, sets(f"trainer_config.data_dir={folder}"))
    assert f"{folder / 'ratings.dat'}, line 2" in err


def test_missing_and_corrupt_checkpoints_are_one_line(workdir, capsys):
    assert "no checkpoint at nowhere.pt" in one_line_error(capsys, evaluation.main, ["--checkpoint", "nowhere.pt"])
    Path("garbage.pt").write_bytes(b"not a checkpoint at all")
    err = one_line_error(capsys, recommend.main, ["--checkpoint", "garbage.pt", "--user", "1"])
    assert "garbage.pt is not a checkpoint of this repo" in err and "weights_only" not in err
    torch.save({"x": 1}, "other.pt")
    assert "it lacks config, metadata, model" in one_line_error(capsys, evaluation.main, ["--checkpoint", "other.pt"])


def test_unwritable_model_folder_is_one_line_and_leaves_nothing(workdir, ml1m_dir, capsys):
    Path("file").write_text("a file, not a folder")
    err = one_line_error(capsys, model_train.main, sets(f"trainer_config.data_dir={ml1m_dir}",
                                                        "trainer_config.model_dir=file/models"))
    assert err.startswith("error: cannot write file/models") and not Path("runs").exists()


def test_a_full_disk_keeps_the_last_checkpoint_and_says_how_to_go_on(workdir, ml1m_dir, capsys, monkeypatch):
    saves = []
    real_save = torch.save

    def fill_disk_on_the_third_save(obj, f):
        if not hasattr(f, "write"):  # the data cache, saved to a path
            return real_save(obj, f)
        saves.append(f)  # a checkpoint, saved to its open temporary file
        if len(saves) == 3:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)
    monkeypatch.setattr(torch, "save", fill_disk_on_the_third_save)
    err = one_line_error(capsys, model_train.main, sets(f"trainer_config.data_dir={ml1m_dir}",
                                                        "trainer_config.num_epochs=3", "trainer_config.run_name=full"))
    assert "the disk is full" in err
    assert sorted(p.name for p in Path("models/full").iterdir()) == [".written", "best.pt", "config.yaml", "last.pt"]
    assert torch.load("models/full/last.pt", weights_only=True)["state"]["epoch"] == 1


def test_a_file_planted_at_a_temporarys_name_is_never_written_through(workdir, ml1m_dir, monkeypatch):
    """From epoch 2 the checkpoints' temporary names hold symlinks to a file of the user's: the
    run removes the links and writes its own temporaries (the disk filling for real is
    tests/test_mounts.py's)."""
    real_epoch = model_train.train_epoch
    Path("mine").write_text("kept")

    def planted_in_epoch_2(*args, **kwargs):
        if args[5] == 2:  # the epoch number
            for name in ("best.pt", "last.pt"):
                Path(f"models/r/.{name}.{os.getpid()}.tmp").symlink_to(Path("mine").resolve())
        return real_epoch(*args, **kwargs)
    monkeypatch.setattr(model_train, "train_epoch", planted_in_epoch_2)
    model_train.main(sets(f"trainer_config.data_dir={ml1m_dir}", "trainer_config.num_epochs=2",
                          "trainer_config.run_name=r"))
    assert Path("mine").read_text() == "kept"
    assert torch.load("models/r/last.pt", weights_only=True)["state"]["epoch"] == 2
    assert not list(Path("models/r").glob(".*.tmp"))


def test_a_run_that_fails_before_its_first_epoch_leaves_no_folder(workdir, ml1m_dir, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(model_train, "train_epoch", interrupted)
    code = run_script(model_train.main, sets(f"trainer_config.data_dir={ml1m_dir}", "trainer_config.run_name=r"))
    err = capsys.readouterr().err.split("\r")[-1].strip()
    assert code == 130 and err.startswith("interrupted: the run stopped during epoch 1") and len(err.splitlines()) == 1
    assert "no epoch was saved" in err and not Path("models/r").exists() and not Path("runs/r").exists()


def test_a_full_disk_under_tensorboard_dir_is_one_line_and_keeps_the_checkpoints(workdir, ml1m_dir, capsys,
                                                                                monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def full(*args, **kwargs):  # TensorBoard's writer thread hands its failed write to the next call
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(SummaryWriter, "add_hparams", full)
    err = one_line_error(capsys, model_train.main, sets(f"trainer_config.data_dir={ml1m_dir}",
                                                        "trainer_config.num_epochs=1", "trainer_config.run_name=tb"))
    assert err == "error: cannot write runs/tb: the disk is full; free space or choose a writable folder"
    assert torch.load("models/tb/last.pt", weights_only=True)["state"]["epoch"] == 1


def test_running_out_of_memory_is_one_line_naming_the_batch_sizes(workdir, ml1m_dir, capsys, monkeypatch):
    def too_big(*args, **kwargs):
        torch.empty(10**14)  # what the allocator says when a batch does not fit
    monkeypatch.setattr(model_train, "train_epoch", too_big)
    err = one_line_error(capsys, model_train.main, sets(f"trainer_config.data_dir={ml1m_dir}", "trainer_config.run_name=r"))
    assert err == ("error: out of memory on cpu (it asked for 400000000000000 bytes more); lower "
                   "trainer_config.batch_size (256) or eval_batch_size (1024), or the model's sizes")
    assert not Path("models/r").exists()


def test_eval_running_out_of_memory_is_one_line_naming_its_batch_size(checkpoint, monkeypatch, capsys):
    def too_big(*args, **kwargs):
        torch.empty(10**14)  # what the allocator says when the scores of a batch do not fit
    monkeypatch.setattr(evaluation, "rank_every_scorer", too_big)
    err = one_line_error(capsys, evaluation.main, ["--checkpoint", str(checkpoint), "--batch-size", "512"])
    assert err == "error: out of memory on cpu (it asked for 400000000000000 bytes more); lower --batch-size (512)"


def test_two_runs_of_one_name_never_share_a_tensorboard_folder(workdir, ml1m_dir, capsys):
    model_train.main(sets(f"trainer_config.data_dir={ml1m_dir}", "trainer_config.num_epochs=1",
                          "trainer_config.run_name=same", "trainer_config.model_dir=a"))
    err = one_line_error(capsys, model_train.main, sets(f"trainer_config.data_dir={ml1m_dir}",
                                                        "trainer_config.run_name=same", "trainer_config.model_dir=b"))
    assert "runs/same already exists" in err and not Path("b/same").exists()


def test_eval_checks_k_before_it_writes(checkpoint, workdir, capsys):
    report = checkpoint.parent / "eval_test_history_k10.json"
    evaluation.main(["--checkpoint", str(checkpoint), "--k", "10"])
    before = report.read_text()
    for k in ("-1", "0"):
        with pytest.raises(SystemExit):
            evaluation.main(["--checkpoint", str(checkpoint), "--k", k])
    assert "more than the 200 movies" in one_line_error(capsys, evaluation.main,
                                                         ["--checkpoint", str(checkpoint), "--k", "1500"])
    assert report.read_text() == before


def test_eval_refuses_resamples_that_would_run_for_hours(checkpoint, capsys):
    with pytest.raises(SystemExit):
        evaluation.main(["--checkpoint", str(checkpoint), "--resamples", "100000000"])
    assert "--resamples from 10 to 100,000" in capsys.readouterr().err


def test_predictions_beyond_the_unrated_movies_hold_no_rated_movie(checkpoint, workdir, ml1m_dir):
    """With K beyond what a user has left unrated, the user's list is every unrated movie."""
    evaluation.main(["--checkpoint", str(checkpoint), "--k", "195", "--save-predictions", "pred.csv"])
    rows = pd.read_csv("pred.csv")
    movielens = data.load_movielens(ml1m_dir)
    meta = movielens.metadata
    for user in range(0, meta.num_users, 7):
        before_test = movielens.history(user)[0][:-1].tolist()
        seen = {meta.movie_ids[t] for t in before_test}
        listed = rows[rows.user_id == meta.user_ids[user]].item_id.tolist()
        assert not seen & set(listed) and len(listed) == min(195, meta.num_movies - len(seen))


def test_recommend_checks_k(checkpoint, capsys):
    err = one_line_error(capsys, recommend.main, ["--checkpoint", str(checkpoint), "--user", "5", "-k", "199"])
    assert "-k 199 asks for more movies than the" in err
    with pytest.raises(SystemExit):
        recommend.main(["--checkpoint", str(checkpoint), "--user", "5", "-k", "0"])


# ----------------------------------------------------------------------------- nothing silent

def test_a_diverged_run_stops_with_one_line_and_saves_nothing(workdir, ml1m_dir, capsys):
    err = one_line_error(capsys, model_train.main, sets(f"trainer_config.data_dir={ml1m_dir}",
                                                        "trainer_config.learning_rate=1.0e+30",
                                                        "trainer_config.log_every=2", "trainer_config.run_name=nan"))
    assert "training diverged in epoch 1: the loss is not finite, first at step" in err
    assert "trainer_config.learning_rate (1e+30)" in err and not Path("models/nan").exists()


@pytest.mark.parametrize("assignment", ["trainer_config.learning_rate=.inf", "trainer_config.weight_decay=.inf",
                                        "trainer_config.learning_rate=.nan", "trainer_config.grad_clip=.inf"])
def test_non_finite_settings_are_refused(assignment):
    with pytest.raises(ConfigError, match=f"{assignment.split('=')[0]} is .* it must be a finite number"):
        load_config(DEFAULT_CONFIG, [assignment])


@pytest.mark.parametrize("assignment,message", [
    ("trainer_config.batch_size=true", "trainer_config.batch_size is True (from --set), which is not of type int"),
    ("model_config.interaction_mlp_hidden_sizes=[16, false]", "which is not of type list[int]"),
    ("trainer_config.learning_rate='1e-3'", "write '1e-3' with a dot and a signed exponent, e.g. 1.0e-3"),
])
def test_yaml_booleans_are_not_numbers_and_numbers_read_as_text_get_a_hint(assignment, message):
    with pytest.raises(ConfigError) as error:
        load_config(DEFAULT_CONFIG, [assignment])
    assert message in str(error.value)


@pytest.fixture()
def finished_run(workdir, ml1m_dir) -> Path:
    return model_train.main(sets(f"trainer_config.data_dir={ml1m_dir}", "trainer_config.num_epochs=1",
                                 "trainer_config.run_name=done"))


def test_a_run_is_named_by_its_folder_a_checkpoint_in_it_a_symlink_or_dot(finished_run, workdir, capsys,
                                                                          monkeypatch):
    """eval and recommend read a run folder's best.pt; --resume takes a checkpoint in the folder
    (it said "no checkpoint at .../last.pt/last.pt"), and a symlink or `.` meet the same lock (they
    walked around it and started a second trainer)."""
    from run import Run
    best, real = finished_run / "best.pt", finished_run.resolve()
    assert (evaluation.main(["--checkpoint", str(finished_run), "--resamples", "20"])
            == evaluation.main(["--checkpoint", str(best), "--resamples", "20"]))
    assert (recommend.main(["--checkpoint", str(finished_run), "--user", "5", "-k", "3"])
            == recommend.main(["--checkpoint", str(best), "--user", "5", "-k", "3"]))
    assert "runs in models: done" in one_line_error(capsys, evaluation.main, ["--checkpoint", "models/gone"])
    (workdir / "link").symlink_to(finished_run.resolve(), target_is_directory=True)
    release = Run(finished_run.resolve(), workdir / "runs" / "done").lock()  # a trainer holds the run
    try:
        for given in ("link", str(finished_run / "last.pt")):
            assert "is in use by process" in one_line_error(capsys, model_train.main, ["--resume", given])
        monkeypatch.chdir(finished_run)
        assert "is in use by process" in one_line_error(capsys, model_train.main, ["--resume", "."])
    finally:
        release()
    assert model_train.main(["--resume", "last.pt"]).resolve() == real  # finished: nothing to train


def test_a_resumed_run_trains_with_the_settings_it_may_change(finished_run, capsys):
    from loguru import logger as log
    lines = []
    sink = log.add(lines.append, format="{message}")
    try:
        model_train.main(["--resume", str(finished_run), "--set", "trainer_config.num_epochs=2",
                          "--set", "trainer_config.learning_rate=0.5", "--set", "trainer_config.weight_decay=0.25"])
    finally:
        log.remove(sink)
    last = torch.load(finished_run / "last.pt", weights_only=True)
    assert last["state"]["epoch"] == 2 and any("trainer_config.learning_rate 0.001 -> 0.5" in str(m) for m in lines)
    group = last["optimizer"]["param_groups"][0]
    assert float(group["lr"]) == 0.5 and group["weight_decay"] == 0.25 and last["config"]["trainer_config"][
        "learning_rate"] == 0.5


@pytest.mark.parametrize("argv,message", [
    (["--set", "model_config.transformer_config.num_layers=2"],
     "model_config.transformer_config.num_layers cannot change when a run is resumed (from --set: 1 -> 2)"),
    (["--set", "trainer_config.batch_size=64"], "trainer_config.batch_size cannot change when a run is resumed"),
    (["--config", str(DEFAULT_CONFIG)], "--config cannot change it"),
])
def test_a_resumed_run_refuses_what_it_cannot_change(finished_run, capsys, argv, message):
    before = (finished_run / "last.pt").read_bytes()
    assert message in one_line_error(capsys, model_train.main, ["--resume", str(finished_run), *argv])
    assert (finished_run / "last.pt").read_bytes() == before


def test_a_finished_or_early_stopped_run_resumed_says_so_and_stops(finished_run):
    before = (finished_run / "last.pt").read_bytes()
    assert model_train.main(["--resume", str(finished_run)]) == finished_run
    assert (finished_run / "last.pt").read_bytes() == before
    checkpoint = torch.load(finished_run / "last.pt", weights_only=True)
    checkpoint["config"]["trainer_config"]["num_epochs"] = 5
    checkpoint["state"]["stale"] = checkpoint["config"]["trainer_config"]["patience"]
    torch.save(checkpoint, finished_run / "last.pt")
    assert model_train.main(["--resume", str(finished_run)]) == finished_run
    assert torch.load(finished_run / "last.pt", weights_only=True)["state"]["epoch"] == 1


def test_a_run_resumed_on_other_data_names_both(finished_run, tmp_path, capsys):
    other = write_ml1m(tmp_path / "other" / "ml-1m", num_users=40, num_movies=50)
    err = one_line_error(capsys, model_train.main, ["--resume", str(finished_run), "--set", "trainer_config.num_epochs=2",
                                                    "--set", f"trainer_config.data_dir={other}"])
    assert "was trained on ml-1m (300 users, 200 movies)" in err and "holds ml-1m (40 users, 50 movies)" in err


@pytest.mark.parametrize("script,option", [(evaluation, "--save-predictions"), (evaluation, "--plot"),
                                           (recommend, "--png")])
@pytest.mark.parametrize("target", ["best.pt", "last.pt", "config.yaml", "data"])
def test_outputs_never_overwrite_the_checkpoint_the_run_or_the_data(checkpoint, ml1m_dir, capsys, script, option,
                                                                     target):
    output = ml1m_dir / "ratings.dat" if target == "data" else checkpoint.parent / target
    if not output.exists():
        pytest.skip(f"this run has no {target}")
    before = output.read_bytes()
    extra = ["--user", "1"] if script is recommend else []
    err = one_line_error(capsys, script.main, ["--checkpoint", str(checkpoint), option, str(output), *extra])
    assert f"{option} {output} would overwrite" in err and output.read_bytes() == before


def edited(checkpoint: dict, edit: str) -> dict:
    """A checkpoint edited as a damaged file or a wrong one would be."""
    if edit == "another architecture":
        checkpoint["config"]["model_config"]["transformer_config"]["embedding_dimension"] = 8
    elif edit == "a state of the wrong type":
        checkpoint["state"] = "epoch 1"
    elif edit == "metadata of the wrong fields":
        checkpoint["metadata"] = {"movies": []}
    else:  # NaN weights: a run that diverged
        checkpoint["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v
                               for k, v in checkpoint["model"].items()}
    return checkpoint


@pytest.mark.parametrize("edit,message", [
    ("another architecture", "its weights do not fit the model its config builds (size mismatch for "),
    ("a state of the wrong type", "is damaged or not of this repo: its state is a str"),
    ("metadata of the wrong fields", "is damaged or not of this repo: its metadata does not fit"),
    ("NaN weights", "of its weights hold NaN or infinity")])
def test_a_wrong_or_damaged_checkpoint_is_one_line_in_every_script(finished_run, capsys, edit, message):
    """eval, recommend and --resume each name the checkpoint and what is wrong with it (--resume
    ended in size-mismatch and AttributeError tracebacks; eval scored NaN weights 0.0000 and
    recommend printed 'p nan')."""
    last = finished_run / "last.pt"
    torch.save(edited(torch.load(last, weights_only=True), edit), last)
    for main, argv in ((evaluation.main, ["--checkpoint", str(last)]),
                       (recommend.main, ["--checkpoint", str(last), "--user", "1"]),
                       (model_train.main, ["--resume", str(finished_run), "--set", "trainer_config.num_epochs=2"])):
        err = one_line_error(capsys, main, argv)
        assert err.startswith(f"error: {last}") and message in err, err
