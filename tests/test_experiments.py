"""experiments.py: variants x seeds into one table, each run also in TensorBoard's HParams view."""
import csv
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import experiments
from conftest import ROOT

FAST = {"trainer_config.num_epochs": 1, "trainer_config.batch_size": 256, "trainer_config.compile": False,
        "model_config.transformer_config.num_layers": 1, "model_config.transformer_config.embedding_dimension": 16}


def sweep_args(data_dir, out, *extra: str) -> list[str]:
    """A small, fast sweep's arguments on data_dir into out; later --set pairs in extra win."""
    pairs = [f"trainer_config.data_dir={data_dir}", *(f"{k}={v}" for k, v in FAST.items()), *extra]
    return ["--out", str(out), *(a for pair in pairs for a in ("--set", pair))]


def test_seeds_and_variants_make_one_table(ml1m_dir, tmp_path, capfd):
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: {}\nno-user-embedding: {model_config.user_embedding_dimension: 0}\n")
    argv = ["--seeds", "1", "--grid", str(grid), *sweep_args(ml1m_dir, tmp_path / "out")]
    with pytest.raises(SystemExit):
        experiments.main([*argv, "--against", "bsae"])  # not a variant: said before any run
    assert not (tmp_path / "out").exists()
    rows = experiments.main([*argv, "--against", "base"])
    assert "epoch 1: " in capfd.readouterr().err  # each run's log shows as it trains
    assert [(r["variant"], r["seed"]) for r in rows] == [("base", 1), ("no-user-embedding", 1)]
    assert rows[0]["test_ndcg@10"] != rows[1]["test_ndcg@10"]
    from checkpoint import load_checkpoint
    assert load_checkpoint(tmp_path / "out" / "models" / "base-seed1" / "best.pt")["config"]["trainer_config"]["seed"] == 1
    table = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert len(table) == 2 and all(float(r["test_ndcg@10_low"]) <= float(r["test_ndcg@10"]) for r in table)
    summary = (tmp_path / "out" / "results.md").read_text()
    assert "| base | none | 1 |" in summary and "| no-user-embedding | none | 1 |" in summary and " ± " in summary
    assert summary.splitlines()[0] == ("| variant | time | runs | validation NDCG@10 | test NDCG@10 | test HR@10 | "
                                       "test MRR |")
    yardstick = [line for line in summary.splitlines() if line.startswith("| most-rated (training counts) | none |")]
    assert len(yardstick) == 1 and f"{rows[0]['most_rated_test_ndcg@10']:.4f}" in yardstick[0]

    from tbparse import SummaryReader
    hparams = SummaryReader(str(tmp_path / "out" / "runs" / "base-seed1")).hparams
    assert "model_config.user_embedding_dimension" in set(hparams.tag)

    paired = (tmp_path / "out" / "paired.md").read_text().splitlines()
    assert paired[0] == "| variant | seed | validation NDCG@10 - base | test NDCG@10 - base |" and len(paired) == 3
    test_difference = float(paired[2].split(" | ")[3].split()[0])
    assert test_difference == pytest.approx(rows[1]["test_ndcg@10"] - rows[0]["test_ndcg@10"], abs=1e-4)

    again = experiments.main(argv)  # finished runs are read back, not trained again
    assert [r["test_ndcg@10"] for r in again] == [r["test_ndcg@10"] for r in rows]

    grid.write_text("base: {}\nno-user-embedding: {model_config.user_embedding_dimension: 8}\n")
    before = (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(experiments.ConfigError, match="no-user-embedding-seed1 was trained with "
                       "model_config.user_embedding_dimension=0, this sweep asks for 8"):
        experiments.main(argv)  # a changed grid does not read back the old variant's numbers
    assert (tmp_path / "out" / "results.md").read_text() == before


def test_commands_print_the_runs_left_of_the_variants_asked_for(ml1m_dir, tmp_path, capsys):
    """--commands trains nothing and prints each unfinished run's command; a printed command run
    by hand trains the run the sweep would have, so the next --commands leaves it out."""
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: {}\nsmall: {model_config.user_embedding_dimension: 4}\nunused: {trainer_config.seed: 9}\n")
    argv = ["--seeds", "1", "--grid", str(grid), "--variants", "base", "small", "--commands",
            *sweep_args(ml1m_dir, tmp_path / "out")]
    with pytest.raises(SystemExit):
        experiments.main([*argv, "--variants", "bsae"])  # not a variant: said before anything is written
    assert "--variants bsae: not a variant of" in capsys.readouterr().err
    experiments.main(argv)
    commands = capsys.readouterr().out.splitlines()
    assert [c.split("run_name=")[1].split()[0] for c in commands] == ["base-seed1", "small-seed1"]
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written
    subprocess.run(shlex.split(commands[1]), check=True, capture_output=True)
    from checkpoint import load_checkpoint
    saved = load_checkpoint(tmp_path / "out" / "models" / "small-seed1" / "best.pt")["config"]
    assert saved["model_config"]["user_embedding_dimension"] == 4 and saved["trainer_config"]["seed"] == 1
    experiments.main(argv)
    assert capsys.readouterr().out.splitlines() == commands[:1]


def test_every_shipped_config_and_grid_loads():
    """A typo in configs/ fails here, not minutes into someone's sweep."""
    from config import DEFAULT_CONFIG, load_config
    configs = DEFAULT_CONFIG.parent / "configs"
    grids = {"ablations.yaml": "ml100k_best.yaml", "ml1m_sweep.yaml": "ml1m_best.yaml",  # grid -> its config
             "feature_ablations.yaml": "ml100k_best.yaml",
             "time_ablations.yaml": "ml100k_best.yaml", "text_ablations.yaml": "ml100k_best.yaml"}
    for path in sorted(configs.glob("*.yaml")):
        if path.name in grids:
            variants = experiments.read_grid(path)
            assert "base" in variants
            for overrides in variants.values():
                load_config(configs / grids[path.name], overrides)
        else:
            load_config(path, [])


def run_processes_of(folder) -> list[str]:
    """The command lines of the processes that still work in folder."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(folder) in line and "model_train.py" in line:
            lines.append(line)
    return lines


@pytest.mark.parametrize("how", ["ctrl-c", "kill -TERM in the background"])
def test_a_signal_stops_the_sweep_and_its_run_and_the_same_command_goes_on(how, ml1m_dir, tmp_path):
    """Ctrl-C (the terminal signals the sweep's process group), or a signal to the sweep alone;
    in the background (`nohup ... &` from a script) the sweep and its runs ignore SIGINT. The run
    has 4 epochs of about 1 s (batches of 32), so that the signal, sent once its first epoch is
    saved, finds it training even on a loaded machine, and the run resumed ends soon."""
    ignored = signal.SIG_IGN if how.endswith("background") else signal.SIG_DFL
    argv = [sys.executable, str(ROOT / "experiments.py"), "--seeds", "1",
            *sweep_args(ml1m_dir, tmp_path / "out", "trainer_config.num_epochs=4", "trainer_config.batch_size=32",
                        "trainer_config.patience=null")]
    sweep = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: (os.setsid(), signal.signal(signal.SIGINT, ignored)))
    last = tmp_path / "out" / "models" / "base-seed1" / "last.pt"
    while not last.exists() and sweep.poll() is None:
        time.sleep(0.1)
    if how == "ctrl-c":
        os.killpg(sweep.pid, signal.SIGINT)
    else:
        os.kill(sweep.pid, signal.SIGTERM)
    _, err = sweep.communicate(timeout=120)
    lines = [line.split("\r")[-1].strip() for line in err.splitlines()]
    assert sweep.returncode == 130 and any(line.startswith("interrupted: the run stopped during epoch") for line in lines), err
    assert lines[-1] == "interrupted: the sweep stopped during training base-seed1; the same command goes on from there"
    assert not run_processes_of(tmp_path / "out")
    if how != "ctrl-c":  # going on after a stop is the same whatever stopped it
        return
    again = subprocess.run(argv, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "base | none | 1 |" in (tmp_path / "out" / "results.md").read_text()
