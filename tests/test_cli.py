import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as evaluation
import model_train
from conftest import ROOT

FAST = ["model_config.transformer_config.embedding_dimension=16",
        "model_config.transformer_config.num_layers=1", "trainer_config.batch_size=256",
        "trainer_config.log_every=5"]


def sets(*pairs: str) -> list[str]:
    return [arg for pair in (*FAST, *pairs) for arg in ("--set", pair)]


@pytest.fixture()
def workdir(tmp_path, monkeypatch, ml1m_dir) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_eval_resume_end_to_end(workdir, ml1m_dir, capsys):
    run = model_train.main(sets(f"trainer_config.data_dir={ml1m_dir}", "trainer_config.num_epochs=2",
                                "trainer_config.run_name=e2e", "trainer_config.patience=null"))
    assert run == Path("models/e2e")
    assert {p.name for p in run.iterdir()} >= {"best.pt", "last.pt", "config.yaml"}
    assert list(Path("runs/e2e").glob("events.out.tfevents.*"))
    last = model_train.load_checkpoint(run / "last.pt")
    assert last["state"]["epoch"] == 2 and last["metadata"]["name"] == "ml-1m"

    out = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--checkpoint", str(run / "best.pt"),
                          "--save-predictions", "pred.csv"], capture_output=True, text=True, check=True).stdout
    assert "| model |" in out and "| most-rated |" in out and "| top-rated-popular |" in out
    assert "ndcg@10" in out and (run / "eval_test_history.json").exists()
    rows = list(csv.DictReader(open("pred.csv")))
    assert len(rows) == 300 * 10 and rows[0]["rank"] == "1"
    assert {int(r["item_id"]) for r in rows} <= {7 + 3 * m for m in range(200)}  # MovieLens ids

    model_train.main(["--resume", str(run), "--set", "trainer_config.num_epochs=3"])
    resumed = model_train.load_checkpoint(run / "last.pt")
    assert resumed["state"]["epoch"] == 3
    from tbparse import SummaryReader
    scalars = SummaryReader("runs/e2e").scalars
    assert sorted(scalars[scalars.tag == "loss/train"].step.tolist()) == [1, 2, 3]
    assert set(scalars.tag) >= {"loss/validation", "metrics/validation/ndcg@10", "lr",
                                "throughput/samples_per_s"}


def test_same_config_gives_same_losses(workdir, ml1m_dir):
    losses = []
    for name in ("a", "b"):
        run = model_train.main(sets(f"trainer_config.data_dir={ml1m_dir}", "trainer_config.num_epochs=1",
                                    f"trainer_config.run_name={name}"))
        state = model_train.load_checkpoint(run / "last.pt")["model"]
        losses.append(state)
    assert all(torch.equal(losses[0][k], losses[1][k]) for k in losses[0])


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="learning_rat"):
        model_train.load_config(model_train.DEFAULT_CONFIG, ["trainer_config.learning_rat=0.1"])
    with pytest.raises(ValueError, match="trainer_config.batch_size"):
        model_train.load_config(model_train.DEFAULT_CONFIG, ["trainer_config.batch_size=many"])
    with pytest.raises(ValueError, match="section.key=value"):
        model_train.load_config(model_train.DEFAULT_CONFIG, ["batch_size"])


def test_default_config_is_the_posts_model():
    config = model_train.load_config()
    mc, tc = config.model_config, config.trainer_config
    assert (mc.transformer_config.context_window_size, mc.transformer_config.embedding_dimension,
            mc.transformer_config.num_layers, mc.transformer_config.num_heads) == (5, 32, 4, 4)
    assert (mc.user_embedding_dimension, mc.interaction_mlp_hidden_sizes) == (32, [16])
    assert (tc.batch_size, tc.learning_rate, tc.split) == (512, 1e-3, "leave_one_out")


def test_missing_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        model_train.pick_device("cuda")
    assert model_train.pick_device("auto").type in ("cpu", "mps")


def test_checkpoint_is_written_atomically(tmp_path):
    path = tmp_path / "last.pt"
    model_train.save_atomic({"x": torch.ones(2)}, path)
    assert torch.equal(model_train.load_checkpoint(path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
