"""experiments.py: variants x seeds into one table, each run also in TensorBoard's HParams view."""
import csv

import experiments

FAST = {"trainer_config.num_epochs": 2, "trainer_config.batch_size": 256, "trainer_config.compile": False,
        "model_config.transformer_config.num_layers": 1, "model_config.transformer_config.embedding_dimension": 16}


def test_seeds_and_variants_make_one_table(ml1m_dir, tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: {}\nno-user-embedding: {model_config.user_embedding_dimension: 0}\n")
    argv = ["--seeds", "2", "--grid", str(grid), "--out", str(tmp_path / "out"),
            "--set", f"trainer_config.data_dir={ml1m_dir}", *(a for k, v in FAST.items() for a in ("--set", f"{k}={v}"))]
    rows = experiments.main(argv)
    assert "epoch 2: " in capsys.readouterr().err  # each run's log shows as it trains
    assert [(r["variant"], r["seed"]) for r in rows] == [("base", 1), ("base", 2), ("no-user-embedding", 1),
                                                           ("no-user-embedding", 2)]
    assert len({r["test_ndcg@10"] for r in rows}) == 4  # seeds and variants differ
    table = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert len(table) == 4 and all(float(r["test_ndcg@10_low"]) <= float(r["test_ndcg@10"]) for r in table)
    summary = (tmp_path / "out" / "results.md").read_text()
    assert "| base | 2 |" in summary and "| no-user-embedding | 2 |" in summary and " ± " in summary

    from tbparse import SummaryReader
    hparams = SummaryReader(str(tmp_path / "out" / "runs" / "base-seed1")).hparams
    assert "model_config.user_embedding_dimension" in set(hparams.tag)

    again = experiments.main(argv)  # finished runs are read back, not trained again
    assert [r["test_ndcg@10"] for r in again] == [r["test_ndcg@10"] for r in rows]


def test_every_shipped_config_and_grid_loads():
    """A typo in configs/ fails here, not minutes into someone's sweep."""
    from config import DEFAULT_CONFIG, load_config
    configs = DEFAULT_CONFIG.parent / "configs"
    grids = {"ablations.yaml": "ml100k_best.yaml", "ml1m_sweep.yaml": "ml1m_best.yaml"}  # grid -> its config
    for path in sorted(configs.glob("*.yaml")):
        if path.name in grids:
            variants = experiments.read_grid(path)
            assert "base" in variants
            for overrides in variants.values():
                load_config(configs / grids[path.name], overrides)
        else:
            load_config(path, [])
