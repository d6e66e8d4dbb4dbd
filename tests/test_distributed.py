"""Scale-out with torch's own tools on CPU (gloo): a 2-process torchrun run (DDP, and FSDP2) follows the 1-process
run with the same global batch step for step, and every clip is seen once per epoch across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_train import REPO, run, step_losses, toy_config
from tympan.data import ShardDataset, fsdd_datafile, read_datafile, write_shards
from tympan.train.data import GlobalBatchOrder, rank_sampler
from tympan.train.distributed import Context

AUGMENT = {"augment.freqm": 24, "augment.timem": 8, "augment.noise_roll": True, "augment.mixup": 0.5,
           "augment.gain_db": "[-6, 6]", "augment.noise_snr_db": "[10, 30]"}
TRAIN_SCRIPT = "import sys; from tympan.train import train_main; sys.exit(train_main(None, sys.argv[1:], False))\n"


def test_global_batches_split_exactly_once_over_ranks():
    num_items, batch = 50, 8
    single = list(rank_sampler(num_items, batch, Context(), seed=3, drop_last=True))
    for world in (2, 4):
        pieces = [list(rank_sampler(num_items, batch, Context(world, rank), seed=3, drop_last=True))
                  for rank in range(world)]  # fmt: skip
        local = batch // world
        for step in range(num_items // batch):  # step k's global batch = the ranks' k-th local batches together
            together = [i for piece in pieces for i in piece[step * local : (step + 1) * local]]
            assert together == single[step * batch : (step + 1) * batch]
        seen = [i for piece in pieces for i in piece]
        assert sorted(seen) == sorted(single) and len(set(seen)) == len(seen) == 48  # 2 dropped: no full batch
    padded = GlobalBatchOrder(50, 10, 2, seed=3, drop_last=False)
    assert sorted(set(padded.indices().tolist())) == list(range(50))  # every clip once, nothing to pad


def test_shards_split_exactly_once_over_ranks(tmp_path, data_dir):
    files = fsdd_datafile(data_dir, tmp_path)
    subset = read_datafile(files.datafile).select(lambda r: r.extra["speaker"] == "theo" and r.extra["take"] < 17)
    write_shards(subset, tmp_path / "shards", max_samples_per_shard=9)  # 3 uneven shards
    for remainder in ("uneven", "drop"):
        keys = [item["key"] for rank in range(2)
                for item in ShardDataset(tmp_path / "shards", shuffle=True, seed=1, num_replicas=2, rank=rank,
                                         remainder=remainder)]  # fmt: skip
        assert len(keys) == len(set(keys)) == (len(subset) if remainder == "uneven" else len(subset) // 2 * 2)


def _torchrun(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})  # fmt: skip


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_match_one_process(tmp_path, data_dir, fsdp):
    # augmentation on: every clip's randomness is keyed by the sample, never by the rank
    sections = {"train.epochs": 1, "optim.weight_decay": 0.0, **AUGMENT}
    run(data_dir, tmp_path / "one", **sections)
    result = _torchrun(tmp_path, toy_config(data_dir, tmp_path / "two", **sections, **{"distributed.fsdp": fsdp}))
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    summary = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert summary["final"]["accuracy"] == pytest.approx(json.loads((tmp_path / "one" / "metrics.json").read_text())
                                                         ["final"]["accuracy"])  # fmt: skip
