import subprocess
import sys

import pytest
import torch

import eval as evaluation
import model_train
import recommend
from checkpoint import load_checkpoint, model_from_checkpoint
from build import make_datasets
from config import load_config
from conftest import ROOT, SMALL_MODEL


@pytest.fixture(scope="module")
def checkpoint(ml1m_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    config = load_config(overrides=[
        f"trainer_config.data_dir={ml1m_dir}", "trainer_config.num_epochs=1",
        f"trainer_config.model_dir={folder / 'models'}", f"trainer_config.tensorboard_dir={folder / 'runs'}",
        "trainer_config.run_name=rec", *SMALL_MODEL])
    run = model_train.train(config)
    assert (run / "curves.png").stat().st_size > 1000  # the training curves, read back with tbparse
    return run / "best.pt"


def test_recommend_prints_unseen_movies_and_draws_cards(checkpoint, tmp_path, capsys):
    png = tmp_path / "cards.png"
    top = recommend.main(["--checkpoint", str(checkpoint), "--user", "5", "-k", "7", "--png", str(png)])
    out = capsys.readouterr().out
    assert "user 5:" in out and "top 7 next movies" in out and png.stat().st_size > 1000
    _, config, metadata = model_from_checkpoint(load_checkpoint(checkpoint))
    data = make_datasets(config)["test"].data
    seen = {metadata.movie_ids[t] for t in data.history(metadata.user_ids.index(5))[0].tolist()}
    assert len(top) == 7 and not seen & {movie_id for movie_id, *_ in top}
    assert [score for *_, score in top] == sorted((score for *_, score in top), reverse=True)
    assert 0 < sum(p for *_, p in top) <= 1 and "p: the model's probability" in out and f"wrote {png}" in out
    assert "  1 star  " in out and "1 stars" not in out  # the synthetic history holds 1-star ratings


def test_unknown_user_is_a_clear_error(checkpoint):
    result = subprocess.run([sys.executable, str(ROOT / "recommend.py"), "--checkpoint", str(checkpoint),
                             "--user", "100000"], capture_output=True, text=True)
    assert result.returncode != 0 and "user 100000 is not in ml-1m" in result.stderr


def test_eval_plot_writes_png(checkpoint, tmp_path):
    png = tmp_path / "bars.png"
    results = evaluation.main(["--checkpoint", str(checkpoint), "--plot", str(png), "--k", "5", "10"])
    assert png.stat().st_size > 1000 and set(results) == {"model", "most-rated", "top-rated-popular"}


def test_eval_prints_a_readable_table_names_its_files_and_keeps_other_calls_reports(checkpoint, tmp_path, capsys):
    import json
    evaluation.main(["--checkpoint", str(checkpoint), "--k", "5", "10", "--resamples", "20"])
    wide = checkpoint.parent / "eval_test_history_k5-10.json"
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert table[0] == "| scorer | hr@5 | ndcg@5 | mrr@5 | hr@10 | ndcg@10 | mrr@10 |"
    assert max(map(len, table)) < 200
    csv_path = tmp_path / "top.csv"
    evaluation.main(["--checkpoint", str(checkpoint), "--resamples", "20", "--all-metrics",
                     "--save-predictions", str(csv_path)])
    out = capsys.readouterr().out
    assert "| recall@10 |" in out.replace(" | ", " |\n| ") and "| map@10 " in out
    assert f"wrote {csv_path} (the model's top 10 per user)" in out
    assert f"wrote {checkpoint.parent / 'eval_test_history_k10.json'}" in out
    assert set(json.loads(wide.read_text())["results"]["model"]) >= {"hr@5", "map@10", "recall@10", "mrr"}


def test_eval_reports_intervals_and_a_paired_difference(checkpoint, tmp_path, capsys):
    import json
    evaluation.main(["--checkpoint", str(checkpoint), "--k", "10", "--against", "most-rated", "--resamples", "200"])
    out = capsys.readouterr().out
    assert "model - most-rated, paired over the same 300 targets" in out and "| ndcg@10 |" in out
    report = json.loads((checkpoint.parent / "eval_test_history_k10.json").read_text())
    low, high = report["intervals"]["model"]["ndcg@10"]
    assert low <= report["results"]["model"]["ndcg@10"] <= high
    assert report["paired_difference"]["ndcg@10"]["difference"] == pytest.approx(
        report["results"]["model"]["ndcg@10"] - report["results"]["most-rated"]["ndcg@10"])
    evaluation.main(["--checkpoint", str(checkpoint), "--k", "10", "--against", str(checkpoint), "--resamples", "50"])
    assert json.loads((checkpoint.parent / "eval_test_history_k10.json").read_text())[
        "paired_difference"]["ndcg@10"]["difference"] == 0


def test_eval_subset_picks_the_targets_and_the_old_spelling_still_works(checkpoint, capsys):
    import json
    new = evaluation.main(["--checkpoint", str(checkpoint), "--subset", "validation", "--k", "10", "--resamples", "20"])
    assert "(validation, 300 targets)" in capsys.readouterr().out
    old = evaluation.main(["--checkpoint", str(checkpoint), "--split", "validation", "--k", "10", "--resamples", "20"])
    assert "note: --split is now called --subset" in capsys.readouterr().err and old == new
    assert json.loads((checkpoint.parent / "eval_validation_history_k10.json").read_text())["subset"] == "validation"


def test_eval_pairs_with_an_earlier_report_when_its_checkpoint_is_gone(checkpoint, tmp_path, capsys):
    """--against an eval_*.json: the paired difference from the ranks it holds, on the same targets only."""
    import json

    import ranking
    evaluation.main(["--checkpoint", str(checkpoint), "--resamples", "20"])
    report = json.loads((checkpoint.parent / "eval_test_history_k10.json").read_text())
    ranks = torch.tensor(report["model_ranks"])
    worse = dict(report, model_ranks=(ranks + 1).tolist())  # another model, every target one place lower
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    evaluation.main(["--checkpoint", str(checkpoint), "--against", str(tmp_path / "worse.json"), "--resamples", "50"])
    difference = json.loads((checkpoint.parent / "eval_test_history_k10.json").read_text())["paired_difference"]
    ours, theirs = (ranking.per_user_metrics(r, (10,))["ndcg@10"].mean().item() for r in (ranks, ranks + 1))
    assert difference["ndcg@10"]["difference"] == pytest.approx(ours - theirs) and ours > theirs
    with pytest.raises(evaluation.UserError, match="ranks other targets .* --subset validation"):
        evaluation.main(["--checkpoint", str(checkpoint), "--subset", "validation", "--against",
                         str(tmp_path / "worse.json")])
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(evaluation.UserError, match="is not an eval.py report with the model's ranks"):
        evaluation.main(["--checkpoint", str(checkpoint), "--against", str(tmp_path / "other.json")])
