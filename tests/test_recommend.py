import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import eval as evaluation
import model_train
import recommend
from checkpoint import load_checkpoint, model_from_checkpoint
from build import make_datasets
from config import load_config
from conftest import ROOT, SMALL_MODEL
from run import Run, validation_tag


@pytest.fixture(scope="module")
def checkpoint(ml1m_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    config = load_config(overrides=[
        f"trainer_config.data_dir={ml1m_dir}", "trainer_config.num_epochs=1",
        f"trainer_config.model_dir={folder / 'models'}", f"trainer_config.tensorboard_dir={folder / 'runs'}",
        "trainer_config.run_name=rec", "trainer_config.compile=false", *SMALL_MODEL])
    run = model_train.train(config)
    assert (run / "curves.png").stat().st_size > 1000  # the training curves, read back with tbparse
    coverage = Run(run, folder / "runs" / "rec").scalars().query(f"tag == '{validation_tag('coverage@10')}'")
    assert len(coverage) == 1 and 0 < coverage.value.iloc[0] <= 1  # validation logs the lists' coverage
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


def test_a_poster_that_cannot_be_read_is_skipped_with_a_warning(checkpoint, tmp_path, monkeypatch):
    from loguru import logger
    monkeypatch.chdir(tmp_path)
    _, _, metadata = model_from_checkpoint(load_checkpoint(checkpoint))
    Path("data/posters").mkdir(parents=True)
    for movie_id in metadata.movie_ids:
        Path(f"data/posters/{movie_id}.jpg").write_bytes(b"<html>not found</html>")  # what a failed download saves
    warnings = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    try:
        recommend.main(["--checkpoint", str(checkpoint), "--user", "5", "-k", "3", "--png", "cards.png"])
    finally:
        logger.remove(sink)
    assert Path("cards.png").stat().st_size > 1000 and warnings
    assert all(w.startswith("cannot read the poster data/posters/") and w.endswith("drawn without it")
               for w in warnings)


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
    assert report["paired_difference"]["most-rated"]["ndcg@10"]["difference"] == pytest.approx(
        report["results"]["model"]["ndcg@10"] - report["results"]["most-rated"]["ndcg@10"])
    evaluation.main(["--checkpoint", str(checkpoint), "--k", "10", "--against", str(checkpoint), "--resamples", "200"])
    pairs = json.loads((checkpoint.parent / "eval_test_history_k10.json").read_text())["paired_difference"]
    assert pairs[str(checkpoint)]["ndcg@10"]["difference"] == 0 and pairs[str(checkpoint)]["novelty@10"]["difference"] == 0
    assert pairs["most-rated"] == report["paired_difference"]["most-rated"]  # the earlier call's pair is kept


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
    assert difference[str(tmp_path / "worse.json")]["ndcg@10"]["difference"] == pytest.approx(ours - theirs)
    assert ours > theirs
    with pytest.raises(evaluation.UserError, match="ranks other targets .* --subset validation"):
        evaluation.main(["--checkpoint", str(checkpoint), "--subset", "validation", "--against",
                         str(tmp_path / "worse.json")])
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(evaluation.UserError, match="is not an eval.py report with the model's ranks"):
        evaluation.main(["--checkpoint", str(checkpoint), "--against", str(tmp_path / "other.json")])


def test_a_predictions_file_scores_as_the_checkpoint_that_wrote_it(checkpoint, ml1m_dir, tmp_path, capsys):
    """eval.py --predictions: another system's lists on the same targets, here the model's own."""
    import json
    lists = tmp_path / "top.csv"
    ours = evaluation.main(["--checkpoint", str(checkpoint), "--save-predictions", str(lists), "--resamples", "20"])
    theirs = evaluation.main(["--predictions", str(lists), "--data-dir", str(ml1m_dir), "--resamples", "20",
                              "--against", str(checkpoint)])
    out = capsys.readouterr().out
    assert "| predictions |" in out and "| coverage@10 | gini@10 | popularity@10 |" in out
    assert "mrr" not in theirs["predictions"]  # a list's end hides the ranks beyond it
    for metric in ("hr@10", "ndcg@10", "mrr@10", "coverage@10", "gini@10", "popularity@10", "long-tail@10",
                   "novelty@10", "diversity@10", "serendipity@10"):
        assert theirs["predictions"][metric] == pytest.approx(ours["model"][metric]), metric
    assert theirs["most-rated"] == {m: v for m, v in ours["most-rated"].items() if m != "mrr"}
    report = json.loads((tmp_path / "top_eval_test_history_k10.json").read_text())
    assert report["paired_difference"][str(checkpoint)]["ndcg@10"]["difference"] == 0


@pytest.mark.parametrize("rows, message", [
    ("user,rank,item\n", "the header is user,rank,item; give the columns user_id,rank,item_id"),
    ("user_id,rank,item_id\n5,1,{a}\n5,2,999999\n", "line 3: item_id 999999 is not one of the"),
    ("user_id,rank,item_id\n5,1,{a}\n5,1,{b}\n", r"line 3: two items at one rank \(user 5\)"),
    ("user_id,rank,item_id\n5,1,{a}\n5,x,{b}\n", "line 3: rank 'x' is not a positive integer"),
    ("user_id,rank,item_id\n5,1,{a}\n", "--k 10 is longer than the lists of .* \\(at most 1 items a user\\)"),
])
def test_a_bad_predictions_file_is_one_line_naming_it(checkpoint, ml1m_dir, tmp_path, rows, message):
    lists = tmp_path / "theirs.csv"
    movie_ids = model_from_checkpoint(load_checkpoint(checkpoint))[2].movie_ids
    lists.write_text(rows.format(a=movie_ids[0], b=movie_ids[1]))
    with pytest.raises(evaluation.UserError, match=message):
        evaluation.main(["--predictions", str(lists), "--data-dir", str(ml1m_dir)])


def test_a_popularity_penalty_trades_accuracy_for_the_long_tail_and_reports_add_up(checkpoint, tmp_path):
    """--penalty-sweep: penalty 0 is the model; a strong one reaches further into the tail. Its own
    report per penalty; a sweep keeps the buckets of an earlier call in the same report."""
    import json
    evaluation.main(["--checkpoint", str(checkpoint), "--buckets", "--resamples", "20"])
    png = tmp_path / "sweep.png"
    results = evaluation.main(["--checkpoint", str(checkpoint), "--penalty-sweep", "0", "3", "1",
                               "--sweep-plot", str(png), "--resamples", "20"])
    report = json.loads((checkpoint.parent / "eval_test_history_k10.json").read_text())
    sweep = report["penalty_sweep"]
    assert [row["penalty"] for row in sweep] == [0, 1, 3] and report["buckets"] and png.stat().st_size > 1000
    assert sweep[0]["ndcg"] == pytest.approx(results["model"]["ndcg@10"])
    assert sweep[0]["coverage"] == results["model"]["coverage@10"]
    assert sweep[-1]["long-tail"] > sweep[0]["long-tail"] and sweep[-1]["novelty"] > sweep[0]["novelty"]
    penalized = evaluation.main(["--checkpoint", str(checkpoint), "--popularity-penalty", "3", "--resamples", "20"])
    assert penalized["model"]["ndcg@10"] == pytest.approx(sweep[-1]["ndcg"])
    assert (checkpoint.parent / "eval_test_history_k10_penalty3.json").exists()


def test_recommend_all_users_writes_each_users_next_movies(checkpoint, tmp_path, capsys):
    out = tmp_path / "all.csv"
    recommend.main(["--checkpoint", str(checkpoint), "--all-users", "--out", str(out), "-k", "5"])
    table = pd.read_csv(out)
    _, _, metadata = model_from_checkpoint(load_checkpoint(checkpoint))
    assert list(table.columns) == ["user_id", "rank", "item_id"] and len(table) == metadata.num_users * 5
    one = recommend.main(["--checkpoint", str(checkpoint), "--user", "5", "-k", "5"])
    assert table[table.user_id == 5].sort_values("rank").item_id.tolist() == [movie for movie, *_ in one]
    penalized = recommend.main(["--checkpoint", str(checkpoint), "--user", "5", "-k", "5", "--popularity-penalty", "3"])
    assert "ranked with popularity penalty 3" in capsys.readouterr().out and penalized != one
