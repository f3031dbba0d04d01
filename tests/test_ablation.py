"""ablation.py without training: aggregation and table on fabricated per-run results (checked against
hand-computed values), --dry-run's commands parse with train.py's own parser into the intended arms,
and the resume rule (existing result.json reused, one made by other commands refused)."""

import json
import math
import os
import shlex

import pytest

from smog_train import config
from tools import ablation


def test_aggregate_and_table():
    runs = {
        "smog": [
            dict(linear_top1=40.0, knn_top1=30.0),
            dict(linear_top1=44.0, knn_top1=34.0),
            dict(linear_top1=42.0, knn_top1=35.0),
        ],
        "lagging": [dict(linear_top1=35.5, knn_top1=28.0)],
    }
    agg = ablation.aggregate(runs)
    s = agg["smog"]["linear_top1"]
    assert (s["n"], s["mean"], s["min"], s["max"]) == (3, 42.0, 40.0, 44.0)
    assert math.isclose(s["std"], 2.0)  # sqrt(((-2)^2 + 2^2 + 0) / 2)
    k = agg["smog"]["knn_top1"]
    assert math.isclose(k["mean"], 33.0) and math.isclose(k["std"], math.sqrt((9 + 1 + 4) / 2))
    assert agg["lagging"]["linear_top1"] == dict(n=1, mean=35.5, std=0.0, min=35.5, max=35.5)
    rows = ablation.table(agg).splitlines()
    assert (
        len(rows) == 4 and rows[2].startswith("| `smog` |") and rows[3].startswith("| `lagging` |")
    )
    assert (
        "42.0 ± 2.0 (40.0-44.0)" in rows[2]
        and "33.0 ± 2.6" in rows[2]
        and rows[2].endswith("| 3 |")
    )


def test_dry_run_commands_parse_with_train_parser(capsys):
    assert (
        ablation.main(
            [
                "--dry-run",
                "--seeds",
                "3,4",
                "--epochs",
                "6",
                "--regroup-every",
                "3",
                "--out",
                "x",
                "--batch-size",
                "64",
                "--",
                "--lr",
                "0.5",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 2 * len(ablation.ARMS)
    trains = [shlex.split(ln)[2:] for ln in lines if shlex.split(ln)[1] == "train.py"]
    cfgs = {}
    for argv in trains:
        cfg = config.parse_config(argv)
        cfgs[(os.path.basename(cfg.out_dir).rsplit("-seed", 1)[0], cfg.seed)] = cfg
        assert (cfg.preset, cfg.data, cfg.epochs, cfg.batch_size, cfg.lr) == (
            "demo",
            "demo:4000",
            6,
            64,
            0.5,
        )
        assert (cfg.knn_every, cfg.final_eval) == (0, False)
    assert set(cfgs) == {(a, s) for a in ablation.ARMS for s in (3, 4)}
    want = {"smog": (0.99, 3), "lagging": (1.0, 3), "smog-noregroup": (0.99, 6), "frozen": (1.0, 6)}
    for (arm, _), cfg in cfgs.items():
        assert cfg.beta_start == 1.0 and (cfg.beta_end, cfg.regroup_every) == want[arm]
        # the demo preset's other values are untouched
        assert (cfg.n_groups, cfg.ema, cfg.arch) == (
            config.PRESETS["demo"]["n_groups"],
            config.PRESETS["demo"]["ema"],
            "smallcnn",
        )
    evals = [shlex.split(ln) for ln in lines if shlex.split(ln)[1] == "eval_linear.py"]
    import eval_linear

    for argv in evals:
        a = eval_linear.build_parser().parse_args(argv[2:])
        assert (
            a.cached_features
            and a.knn
            and tuple(a.knn_k) == (20,)
            and a.checkpoint.endswith("checkpoint.pth")
        )


def test_resume_reuses_result_and_refuses_other_commands(tmp_path):
    args = ablation.parse_args(["--out", str(tmp_path), "--epochs", "2"])
    d = ablation.run_dir(str(tmp_path), "smog", 0)
    os.makedirs(d)
    cmd = [shlex.join(["python", *c]) for c in ablation.commands("smog", 0, args)]
    rec = dict(arm="smog", seed=0, linear_top1=1.0, knn_top1=2.0, train_s=0, eval_s=0, commands=cmd)
    with open(os.path.join(d, "result.json"), "w") as fh:
        json.dump(rec, fh)
    assert ablation.run_one("smog", 0, args) == rec  # no subprocess: would take minutes
    other = ablation.parse_args(["--out", str(tmp_path), "--epochs", "3"])
    with pytest.raises(SystemExit, match="made by other commands"):
        ablation.run_one("smog", 0, other)
