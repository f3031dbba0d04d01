"""bench.py: the structure of bench.json from a real `python tools/bench.py --smoke` run, and the
references bench.py times smog.py against (the naive group update, the ideal step's loss).

No timing is asserted: CI machines are shared and noisy. What must hold is that the figures exist, are
consistent with each other, and that the things compared measure the same computation.
"""

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import smog
from tools import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    r = subprocess.run(
        [sys.executable, "tools/bench.py", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, f"bench.py --smoke failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads(out.read_text()), r.stdout


def test_smoke_writes_every_figure(smoke):
    res, stdout = smoke
    assert (
        res["preset"] == "smoke"
        and res["command"] == "python tools/bench.py --smoke --out " + res["config"]["out"]
    )
    assert res["torch_version"] == torch.__version__ == res["machine"]["torch"]
    assert res["device_name"] and res["machine"]["cpu_model"] and res["machine"]["cpu_cores"] >= 1
    # 1-2: steps
    s = res["step"]
    for k in ("ideal_ms", "full_ms"):
        assert (
            s[k]["n"] == res["config"]["step_pairs"]
            and 0 < s[k]["q1"] <= s[k]["median"] <= s[k]["q3"]
        )
        assert len(s["samples_ms"][k[:-3]]) == s[k]["n"]
    assert isinstance(res["step_ratio"], float)
    pairs = sorted(f / i for f, i in zip(s["samples_ms"]["full"], s["samples_ms"]["ideal"]))
    assert res["step_ratio"] == s["ratio"] == pytest.approx(statistics.median(pairs))
    assert s["ratio_of_medians"] == pytest.approx(s["full_ms"]["median"] / s["ideal_ms"]["median"])
    assert s["full_images_per_s"] == pytest.approx(
        res["config"]["batch"] * 1e3 / s["full_ms"]["median"]
    )
    lo, hi = s["ratio_ci95"]
    assert pairs[0] - 1e-9 <= lo <= hi <= pairs[-1] + 1e-9
    assert s["beta1_check"]["rel_diff"] <= 1e-4
    assert s["grouping_overhead"]["implied_ratio"] == pytest.approx(
        1 + s["grouping_overhead"]["extra_ms"] / s["ideal_ms"]["median"]
    )
    # joint BN against one pass per crop size: the preset's backbone and resnet18
    assert [r["arch"] for r in res["joint_bn"]] == [res["config"]["arch"], "resnet18"]
    for r in res["joint_bn"]:
        assert r["joint_ms"]["n"] == r["separate_ms"]["n"] >= 1 and r["ratio"] > 0
        assert res["joint_bn_ratio"][r["arch"]] == r["ratio"]
        assert r["ratio_ci95"][0] <= r["ratio_ci95"][1]
    # 3: update, all four sizes, agreeing, speed-up = loop / vectorised
    want = {f"K={k},N={n}" for k in (300, 3000) for n in (512, 4096)}
    assert set(res["update_speedup"]) == want
    for r in res["update"]:
        key = f"K={r['K']},N={r['N']}"
        assert r["agree"] is True and r["max_abs_diff"] <= 2e-5
        assert res["update_speedup"][key] == pytest.approx(
            r["loop_ms"]["median"] / r["vectorised_ms"]["median"]
        )
        assert 0 < r["groups_hit"] <= min(r["K"], r["N"])
    # 4: k-means, including the preset's own regroup and its share of an epoch
    km = {(r["N"], r["K"]) for r in res["kmeans"]}
    assert (res["config"]["kmeans_n"][0], res["config"]["kmeans_k"]) in km
    assert (res["config"]["data_size"], res["config"]["n_groups"]) in km
    assert all(r["seconds"]["median"] > 0 for r in res["kmeans"])
    assert 0 < res["regroup_epoch_share"]["share"] < 1
    # 5: input pipeline against the step
    p = res["input_pipeline"]
    assert p["images_per_s"] > 0 and p["crops_per_image"] == 2 * (
        2 + res["config"]["n_local"]
    )  # both sets
    assert p["step_images_per_s"] == pytest.approx(s["full_images_per_s"])
    assert p["starved"] == (p["images_per_s"] < p["step_images_per_s"])
    # both input paths on the generated JPEG folder; the tensor path is train.py's default
    assert p["source"].startswith("jpeg-folder") and p["images_per_s"] == p["tensor_images_per_s"]
    assert len(p["samples"]["pil"]) == len(p["samples"]["tensor"]) == res["config"]["input_pairs"]
    assert p["tensor_over_pil"] == pytest.approx(
        statistics.median(t / q for q, t in zip(p["samples"]["pil"], p["samples"]["tensor"]))
    )
    assert p["pil_over_step"] == pytest.approx(p["pil_images_per_s"] / p["step_images_per_s"])
    assert "tensor/PIL" in stdout
    # targets are listed but not judged at smoke sizes
    assert {t["what"] for t in res["targets"]} >= {
        "full / ideal step",
        "update speed-up K=3000,N=4096",
    }
    assert all(t["met"] is None for t in res["targets"])
    assert "full / ideal" in stdout and "wrote " in stdout


# ---------------------------------------------------------------- the naive update that is timed


def _case(k, n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    groups = F.normalize(torch.randn(k, d, generator=g, dtype=dtype), dim=-1)
    z = torch.randn(n, d, generator=g, dtype=dtype) * 3
    return groups, z


def test_loop_reference_on_a_hand_worked_example():
    """The loop itself is right: group 0 gets the mean of two unit vectors, group 1 none, group 2 one."""
    groups = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    z = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-3.0, 0.0]])
    a = torch.tensor([0, 0, 2])
    new = bench.update_groups_loop(groups, z, a, 0.5)
    v0 = 0.5 * torch.tensor([1.0, 0.0]) + 0.5 * torch.tensor([0.5, 0.5])  # mean of (1,0), (0,1)
    torch.testing.assert_close(new[0], v0 / v0.norm())
    torch.testing.assert_close(new[1], groups[1])  # no member: unchanged
    torch.testing.assert_close(new[2], groups[2])  # -1,0 mixed with itself


@pytest.mark.parametrize(
    "k,n,beta", [(300, 512, 0.5), (3000, 512, 0.99), (50, 4096, 0.0), (7, 3, 1.0), (1, 20, 0.3)]
)
def test_loop_and_vectorised_update_agree(k, n, beta):
    groups, z = _case(k, n, 16, seed=k + n)
    z[n // 2 :] = z[0]  # duplicate rows
    a = smog.assign_groups(z, groups)
    vec, loop = smog.update_groups(groups, z, a, beta), bench.update_groups_loop(groups, z, a, beta)
    assert bench.check_update_agreement(vec, loop) <= 2e-5
    hit = torch.zeros(k, dtype=torch.bool)
    hit[a] = True
    assert torch.equal(loop[~hit], groups[~hit])  # N < K: many empty groups


def test_loop_and_vectorised_agree_on_arbitrary_assignments_in_float64():
    groups, z = _case(40, 300, 8, seed=3, dtype=torch.float64)
    a = (
        torch.randint(0, 40, (300,), generator=torch.Generator().manual_seed(4)) // 3
    )  # groups 0..13 only
    torch.testing.assert_close(
        bench.update_groups_loop(groups, z, a, 0.7),
        smog.update_groups(groups, z, a, 0.7),
        rtol=0,
        atol=1e-12,
    )


def test_agreement_check_fails_on_a_wrong_update():
    """The check bench.py runs before timing rejects a plausible bug: raw (un-normalised) features added
    into the groups, which changes the effective momentum (METHOD.md)."""
    groups, z = _case(300, 512, 128, seed=5)
    a = smog.assign_groups(z, groups)
    loop = bench.update_groups_loop(groups, z, a, 0.5)
    stats = torch.zeros(300, 129).index_add(0, a, torch.cat([z, torch.ones(512, 1)], 1))
    raw = F.normalize(0.5 * groups + 0.5 * stats[:, :128] / stats[:, 128:].clamp_min(1), dim=-1)
    wrong = torch.where(stats[:, 128:] > 0, raw, groups)
    with pytest.raises(AssertionError, match="disagree"):
        bench.check_update_agreement(wrong, loop)
    with pytest.raises(AssertionError, match="shapes"):
        bench.check_update_agreement(loop[:-1], loop)


# ---------------------------------------------------------------- the ideal step is the full step minus grouping


def _small():
    cfg = bench.parse_args(["--smoke"])
    return cfg, *bench.build_step(cfg, torch.device("cpu"))


def test_ideal_loss_equals_forward_at_beta_one_and_differs_otherwise():
    cfg, model, steps, online, momentum, autocast = _small()
    assert (
        bench.check_ideal_matches_full(model, online, momentum, autocast, 1e-5)["rel_diff"] <= 1e-5
    )
    with torch.no_grad():
        li = float(bench.ideal_loss(model, online, momentum))
        lf = float(model(online, momentum, 0.0)[0])  # beta = 0: groups jump to the batch means
    assert abs(lf - li) > 1e-3


def test_ideal_check_fires_when_the_losses_differ(monkeypatch):
    cfg, model, steps, online, momentum, autocast = _small()
    real = bench.ideal_loss
    monkeypatch.setattr(bench, "ideal_loss", lambda m, on, mo: real(m, on, mo) * 1.001)
    with pytest.raises(AssertionError, match="at beta=1"):
        bench.check_ideal_matches_full(model, online, momentum, autocast, 1e-4)


def test_both_steps_train_the_same_parameters_and_only_the_full_step_moves_the_groups():
    cfg, model, steps, online, momentum, autocast = _small()

    def changed_by(step):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        g0 = model.groups.clone()
        step()
        return {
            n for n, p in model.named_parameters() if not torch.equal(p, before[n])
        }, not torch.equal(model.groups, g0)

    steps["full"]()  # the EMA moves nothing while momentum == online (just after reset)
    moved_ideal, groups_ideal = changed_by(steps["ideal"])
    moved_full, groups_full = changed_by(steps["full"])
    assert not groups_ideal and groups_full
    assert (
        moved_ideal == moved_full == {n for n, _ in model.named_parameters()}
    )  # optimiser + EMA in both


# ---------------------------------------------------------------- the jointbn section's backbones, batch and budget


def test_default_preset_times_only_its_own_backbone_in_jointbn():
    """cpu-small leaves the ResNet-18 leg out (at batch 128 on one thread it would take the default run far
    past its 2 minutes); the GPU preset and the smoke run keep it."""
    assert bench.parse_args([]).jointbn_archs == "arch"
    assert bench.parse_args(["--preset", "r50-224"]).jointbn_archs == "arch,resnet18"
    assert bench.parse_args(["--smoke"]).jointbn_archs == "arch,resnet18"


def test_jointbn_honours_archs_batch_and_budget():
    cfg = bench.parse_args(
        [
            "--smoke",
            "--jointbn-archs",
            "arch",
            "--jointbn-batch",
            "4",
            "--step-pairs",
            "50",
            "--jointbn-budget-s",
            "0",
        ]
    )
    out = bench.bench_joint_bn(cfg, torch.device("cpu"), bench.Clock(torch.device("cpu")))
    assert [r["arch"] for r in out] == [cfg.arch] and out[0]["batch"] == 4
    assert (
        out[0]["joint_ms"]["n"] == out[0]["separate_ms"]["n"] == 4
    )  # budget 0 s: the minimum of 4 pairs
