"""Real read-only folders and real small disks that fill, as a user meets them: each script goes on
where it can and otherwise says what it could not write in one line (exit 2), keeping every file
already written whole. The mounts are made in a private user and mount namespace (`unshare -rm`),
so no root is needed; the tests skip where the system forbids such namespaces."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

FAST = ["model_config.transformer_config.embedding_dimension=16", "model_config.transformer_config.num_layers=1",
        "trainer_config.batch_size=256", "trainer_config.compile=false", "trainer_config.run_name=r"]


def can_mount(folder: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    folder.mkdir(exist_ok=True)
    return subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.fixture
def namespace(tmp_path):
    """Runs a Python script in a mount namespace of its own, in tmp_path; the script mounts with
    `mount(...)` and calls the scripts' mains with `script(main, argv)`, which returns the exit
    code and the last line of stderr."""
    if not can_mount(tmp_path / "probe"):
        pytest.skip("this system allows no private mount namespace (unshare -rm)")

    def run(body: str) -> list[dict]:
        driver = HEADER + body
        result = subprocess.run(["unshare", "-rm", sys.executable, "-c", driver, str(ROOT)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return run


HEADER = """
import contextlib, io, json, re, subprocess, sys
sys.path.insert(0, sys.argv[1])
from errors import run_script
from loguru import logger
import eval, model_train, recommend
logger.remove()
logger.add(lambda message: sys.stderr.write(message), level="WARNING")  # the stderr of the moment

def mount(*args):
    subprocess.run(["mount", *args], check=True)

def script(main, argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = run_script(main, argv)
    lines = [l.split("\\r")[-1].strip() for l in err.getvalue().splitlines()]
    said = [l for l in lines if l and not re.search(r"\\d+%\\|", l)]  # less the progress bars
    return code, said, out.getvalue()

def sets(*pairs):
    return [a for p in pairs for a in ("--set", p)]
"""


def test_a_disk_that_fills_anywhere_is_one_line_and_keeps_whole_checkpoints(namespace, ml1m_dir):
    """Training on a real tmpfs of each size fills it at another write: TensorBoard's event file,
    config.yaml, the first last.pt half-way, best.pt after it, epoch 2's last.pt."""
    sizes = ["4k", "12k", "16k", "512k", "700k", "2m"]
    results = namespace(f"""
import os, torch
for size in {sizes!r}:
    os.makedirs(size)
    mount("-t", "tmpfs", "-o", "size=" + size, "tmpfs", size)
    code, lines, _ = script(model_train.main, sets(*{FAST!r}, "trainer_config.data_dir={ml1m_dir}",
        "trainer_config.num_epochs=2", "trainer_config.cache=false",
        f"trainer_config.model_dir={{size}}/models", f"trainer_config.tensorboard_dir={{size}}/runs"))
    files = sorted(str(p.relative_to(size)) for p in __import__("pathlib").Path(size).rglob("*") if p.is_file())
    epochs = [torch.load(f"{{size}}/{{f}}", weights_only=True)["state"]["epoch"] for f in files if f.endswith(".pt")]
    print(json.dumps({{"size": size, "code": code, "lines": lines, "files": files, "epochs": epochs}}))
""")
    failed_at = set()
    for r in results:
        if r["size"] == "2m":
            assert r["code"] == 0 and "models/r/curves.png" in r["files"], r
            continue
        assert r["code"] == 2 and len(r["lines"]) == 1, r
        assert r["lines"][0].startswith(f"error: cannot write {r['size']}/") and "the disk is full" in r["lines"][0], r
        assert not [f for f in r["files"] if f.endswith(".tmp")], r
        if "models/r/last.pt" not in r["files"]:  # nothing saved: nothing of the run is left
            assert r["files"] == [], r
        failed_at.add(r["lines"][0].split(": ")[1].removeprefix("cannot write ").split("/")[-1])
    assert failed_at >= {"r", "config.yaml", "last.pt", "best.pt"}, failed_at


def test_read_only_data_and_run_folders(namespace, ml1m_dir, tmp_path):
    """A read-only data folder: training, eval and recommend run without the cache (one warning).
    A read-only run folder: eval prints its tables and says the report is not saved."""
    shutil.copytree(ml1m_dir, tmp_path / "data", ignore=shutil.ignore_patterns(".movielens_cache*"))
    (r,) = namespace(f"""
mount("--bind", "data", "data"); mount("-o", "remount,bind,ro", "data")
train = script(model_train.main, sets(*{FAST!r}, "trainer_config.data_dir=data", "trainer_config.num_epochs=1"))
evaluated = script(eval.main, ["--checkpoint", "models/r", "--resamples", "10"])
recommended = script(recommend.main, ["--checkpoint", "models/r", "--user", "1"])
mount("--bind", "models/r", "models/r"); mount("-o", "remount,bind,ro", "models/r")
read_only_run = script(eval.main, ["--checkpoint", "models/r", "--subset", "validation", "--resamples", "10"])
print(json.dumps(dict(train=train, eval=evaluated, recommend=recommended, read_only_run=read_only_run)))
""")
    warning = ("cannot write data/.movielens_cache.pt: the file system is read-only; free space or choose a "
               "writable folder; going on without the cache (trainer_config.cache: false turns it off)")
    for name in ("train", "eval", "recommend"):
        code, lines, _ = r[name]
        assert code == 0 and len(lines) == 1 and lines[0].endswith(warning), (name, r[name])
    assert "| model |" in r["eval"][2] and "Movie" in r["recommend"][2]
    code, lines, out = r["read_only_run"]
    assert code == 2 and "| model |" in out and lines[-1] == (
        "error: cannot write models/r/eval_validation_history_k10.json: the file system is read-only; the tables "
        "above are complete, the report is not saved (copy the run folder somewhere writable to keep it)")
    assert not (tmp_path / "data" / ".movielens_cache.pt").exists()
