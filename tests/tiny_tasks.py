"""Tiny synthetic tasks for tests of the run store: a suite of 2 tasks x 2 seeds, 12 steps each."""

from __future__ import annotations

from pathlib import Path

TINY_BASE = """
version: 1
family: tiny
dataset:
  name: tiny
  adapter: synthetic
  options: {n_patients: 48, image_size: 16, seed: 0}
splits: {method: grouped, fractions: {train: 0.6, val: 0.15, test: 0.25}, seed: 0}
input: {resize: 16, crop: 12, channels: 1}
hyperrule: {batch_size: 8, base_lr: 0.3, schedule: [2, 6, 9, 11, 12], mixup_alpha: 0.2}
default_seeds: 2
"""
TASKS = {
    "_tiny-base.yaml": TINY_BASE,
    "tiny-tb.yaml": "task: tiny-tb\ninclude: _tiny-base.yaml\ntype: binary\nlabels: [tuberculosis]\n"
                    "dataset: {options: {family: tb}}\nmetrics: [auc, accuracy]\n",
    "tiny-covidx.yaml": "task: tiny-covidx\ninclude: _tiny-base.yaml\ntype: multiclass\n"
                        "labels: [normal, pneumonia, COVID-19]\ndataset: {options: {family: covidx}}\n"
                        "metrics: [auc, accuracy]\nood: [{task: tiny-covidx-b, name: site-b}]\n",
    "tiny-covidx-b.yaml": "task: tiny-covidx-b\ninclude: tiny-covidx.yaml\ndataset: {options: {site: B}}\nood: []\n",
    "tiny.yaml": "suite: tiny\ntasks: [tiny-tb, tiny-covidx]\n",
}
STEPS_PER_RUN = 12
RUNS = 4  # 2 tasks x 2 seeds


def write_tiny_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in TASKS.items():
        (folder / name).write_text(text)
    return folder
