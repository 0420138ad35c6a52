"""``--dry-run`` memory estimates: activations measured on the meta device, optimizer state by ZeRO stage."""

from __future__ import annotations

import pytest
import torch

from medbench.backbones import get_backbone
from medbench.run.plan import plan_runs, validation_passes
from medbench.train.memory import activation_bytes, memory_estimate, parameter_count


def real_saved_bytes(backbone: str, batch: int, size: int, channels: int = 3) -> int:
    """The same count as ``activation_bytes``, on a real CPU forward (data pointers identify storages)."""
    from medbench.backbones.registry import get_backbone

    torch.manual_seed(0)
    model = get_backbone(backbone).build(num_classes=2, in_chans=channels)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(batch, channels, size, size))
    return sum(saved.values())


@pytest.mark.parametrize("backbone", ["cbr-tiny", "timm/test_resnet"])
def test_meta_measurement_equals_a_real_forward(backbone: str) -> None:
    assert activation_bytes(get_backbone(backbone), 2, 3, 64, 2) == real_saved_bytes(backbone, 2, 64)


def test_activations_scale_with_micro_batch_and_resolution() -> None:
    bb = get_backbone("resnet50")
    a4, a8 = activation_bytes(bb, 2, 3, 64, 4), activation_bytes(bb, 2, 3, 64, 8)  # meta: free
    assert 1.95 < a8 / a4 <= 2.0  # linear but for per-channel statistics
    assert 3.5 < activation_bytes(get_backbone("resnet50"), 2, 3, 128, 4) / a4 < 4.5  # ~ pixels


def test_zero_stages_partition_optimizer_state_and_gradients() -> None:
    from medbench.backbones import create_model

    n = parameter_count(get_backbone("cbr-small"), 5, 1)
    assert n == sum(p.numel() for p in create_model("cbr-small", num_outputs=5, in_chans=1).model.parameters())
    stage0 = memory_estimate(get_backbone("cbr-small"), 5, 1, 32, 8)
    assert (stage0["params"], stage0["grads"], stage0["optimizer"]) == (4 * n, 4 * n, 4 * n)
    stage1 = memory_estimate(get_backbone("cbr-small"), 5, 1, 32, 8, zero_stage=1, world_size=4)
    # momentum and the fp32 master copy, each split over 4 ranks; gradients whole
    assert stage1["optimizer"] == 4 * n // 4 + 4 * n // 4 and stage1["grads"] == 4 * n
    stage2 = memory_estimate(get_backbone("cbr-small"), 5, 1, 32, 8, zero_stage=2, world_size=4)
    assert stage2["grads"] == 4 * n // 4
    assert stage0["total"] == sum(stage0[k] for k in ("params", "grads", "optimizer", "activations"))
    assert memory_estimate(get_backbone("cbr-small"), 5, 1, 32, 8, precision="bf16")["activations_upper_bound"]


def test_dry_run_prints_memory_per_device(capsys: pytest.CaptureFixture) -> None:
    from medbench.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "--backbone", "bit-m-r50x1", "--task", "smoke-tb", "--dry-run", "--micro-batch", "8"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "GB/device" in out
    line = next(li for li in out.splitlines() if li.startswith("memory per device"))
    assert "micro-batch 8" in line and "activations" in line and "measured on the meta device" in line


# ------------------------------------------------------------------ OOD targets and evaluation FLOPs

TB_WITH_OOD = """
task: tb-with-ood
version: 1
family: tuberculosis
dataset: {name: smoke, adapter: synthetic, options: {family: tb, n_patients: 60, image_size: 24}}
type: binary
labels: [tuberculosis]
input: {resize: 24, crop: 20, channels: 1}
splits: {method: grouped, fractions: {train: 0.6, val: 0.2, test: 0.2}}
hyperrule: {batch_size: 8, schedule: [2, 10, 20, 30, 95]}
ood:
  - {task: smoke-tb-siteb, name: site-b}
  - {task: nih, label_map: {tuberculosis: Effusion}}
"""


def _no_data(monkeypatch: pytest.MonkeyPatch, tmp_path) -> "DataLocations":
    import os

    from medbench.data.locate import DataLocations

    for var in [v for v in os.environ if v.startswith("MEDBENCH_DATA")]:
        monkeypatch.delenv(var)
    return DataLocations.from_cli(tmp_path / "no-data", [])


def test_validation_passes_follow_the_training_loop() -> None:
    """As many evaluations as Finetuner.fit makes: every plan.eval_every steps before the end, then once
    after the last step."""
    import torch

    from medbench.spec import HyperRuleSpec
    from medbench.train.distributed import prepare_environment
    from medbench.train.finetune import EngineConfig, Finetuner
    from medbench.train.hyperrule import make_plan

    dist = prepare_environment()
    for total, points in ((1, 10), (2, 10), (5, 10), (9, 10), (10, 10), (11, 10), (80, 10), (95, 10), (50, 5),
                          (7, 3), (12, 1)):
        plan = make_plan(100, HyperRuleSpec(batch_size=2, validation_points=points), max_steps=total)
        assert plan.total_steps == total
        tuner = Finetuner(torch.nn.Linear(3, 1), plan, "binary", EngineConfig(engine="torch"), dist, seed=0)
        calls = []
        batches = ((s, torch.zeros(2, 3), torch.ones(2, 1)) for s in range(total))
        tuner.fit(batches, evaluate=lambda: calls.append(1) or 0.5, eval_every=plan.eval_every)
        assert validation_passes(plan) == len(calls), total


def test_dry_run_counts_evaluation_and_lists_ood_targets(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from medbench.data.task_data import load_task_data
    from medbench.spec.catalog import Catalog

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tb-with-ood.yaml").write_text(TB_WITH_OOD)
    catalog = Catalog([tmp_path / "tasks"])
    locations = _no_data(monkeypatch, tmp_path)
    (plan,) = plan_runs(catalog, ["tb-with-ood"], get_backbone("cbr-tiny"), 1, locations)

    def sizes(name: str) -> dict:
        split = load_task_data(catalog.task(name), locations).index.table["split"]
        return {s: int((split == s).sum()) for s in ("train", "val", "test")}

    own, site_b = sizes("tb-with-ood"), sizes("smoke-tb-siteb")
    assert (plan.n_train, plan.n_val, plan.n_test, plan.steps) == (own["train"], own["val"], own["test"], 95)
    assert [(o["name"], o["task"], o["data_status"]) for o in plan.ood] == [
        ("site-b", "smoke-tb-siteb", "embedded"), ("nih", "nih", "missing")]
    assert plan.ood[0]["n_test"] == site_b["test"] and plan.ood[0]["how_to_get"] is None
    assert plan.ood[1]["n_test"] is None and "nihcc.app.box.com" in plan.ood[1]["how_to_get"]
    # val at 11 points (every 9 steps before 95, and after step 95: also the saved val predictions), the test
    # predictions, the test split of site-b; nih has no data: skipped at run time, nothing evaluated
    assert plan.val_evaluations == 11
    assert plan.eval_images == own["val"] * 11 + own["test"] + site_b["test"]
    assert plan.eval_pflops_per_run == pytest.approx(plan.eval_images * plan.gflops_per_image / 1e6)
    assert plan.train_pflops_per_run == pytest.approx(95 * 8 * 3 * plan.gflops_per_image / 1e6)
    assert plan.pflops_per_run == pytest.approx(plan.train_pflops_per_run + plan.eval_pflops_per_run)
    assert plan.hours_per_run == pytest.approx(plan.pflops_per_run * 1e15 / 100e12 / 3600)


def test_dry_run_without_data_names_missing_ood_datasets(monkeypatch: pytest.MonkeyPatch, tmp_path,
                                                           capsys: pytest.CaptureFixture) -> None:
    from medbench.cli import main
    from medbench.spec.catalog import Catalog

    locations = _no_data(monkeypatch, tmp_path)
    (plan,) = plan_runs(Catalog(), ["chexpert"], get_backbone("cbr-tiny"), 1, locations)
    assert [(o["task"], o["data_status"]) for o in plan.ood] == [("nih", "missing"), ("mimic-cxr", "missing"),
                                                                 ("padchest", "missing")]
    assert plan.eval_pflops_per_run is None and plan.eval_images is None  # split sizes unknown without data
    assert plan.pflops_per_run == plan.train_pflops_per_run

    monkeypatch.setenv("MEDBENCH_DATA", str(tmp_path / "no-data"))
    with pytest.raises(SystemExit) as exc:
        main(["run", "--backbone", "cbr-tiny", "--task", "chexpert", "--task", "nih", "--dry-run"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("missing dataset") == 2  # the planned tasks' own datasets, as before
    for target, hint in (("nih", "how to get it: see above"), ("mimic-cxr", "physionet.org/content/mimic-cxr-jpg"),
                         ("padchest", "bimcv.cipf.es")):
        line = out.split(f"OOD target '{target}' of chexpert has no data")[1].split("OOD target")[0]
        assert f"dataset '{target}'" in line and "skipped and recorded, not an error" in line and hint in line
    assert f"{plan.pflops_per_run:.3g}+?" in out and "evaluation of 2 task(s) without counted splits" in out

