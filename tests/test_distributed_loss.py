"""Two gloo ranks give the same losses and gradients as one process with the whole batch.

Gradient convention. DDP and DeepSpeed average gradients over ranks: after backward each
rank holds ``g_r = ∂L_r/∂θ`` (where ``gather_with_grad``'s backward has already summed, into
rank r's features, the gradients that every rank's loss sent them), and the optimiser sees
``(1/W) Σ_r g_r``. Each objective's per-rank loss is a mean over that rank's rows, so with
equal rows per rank ``(1/W) Σ_r L_r`` is the mean over the whole batch, i.e. the loss of one
process holding it; its gradient ``∂[(1/W) Σ_r L_r]/∂θ`` is exactly the averaged one. The
test therefore compares the single-process gradient with the all-reduce MEAN of the ranks'
gradients, and the single-process loss with the mean of the ranks' losses.

The towers run in eval mode: BatchNorm batch statistics and dropout are per-rank by nature
(SyncBatchNorm would be needed for train-mode BN equivalence).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlp import distributed
from vlp.data.batch import batch_from_images
from vlp.models.heads import HeadConfig
from vlp.models.model import FeatureDims, ModelConfig
from vlp.objectives.base import ObjectiveSpec, build_objective
from vlp.training.module import build_pretraining_module

WORLD = 2
SENTENCES = [["a", "b"], ["c"], [], ["d", "e", "f"], ["g"], ["h", "i"], ["j", "k", "l"], []]
STUDIES = [10, 11, 12, 13, 14, 11, 16, 17]  # samples 1 and 5 share a study, across ranks
WORDS = [
    "effusion",
    "heart",
    "normal",
    "lungs",
    "clear",
    "opacity",
    "left",
    "right",
    "base",
    "stable",
    "tube",
    "line",
]


# ----------------------------------------------------------------------------- environment


def test_expand_nodelist():
    assert distributed.expand_nodelist("node[01-03],other") == [
        "node01",
        "node02",
        "node03",
        "other",
    ]
    assert distributed.expand_nodelist("gpu[1,4-5]-ib") == ["gpu1-ib", "gpu4-ib", "gpu5-ib"]
    assert distributed.expand_nodelist("r[1-2]n[7-8]") == ["r1n7", "r1n8", "r2n7", "r2n8"]
    assert distributed.expand_nodelist("single") == ["single"]
    with pytest.raises(ValueError, match="unbalanced"):
        distributed.expand_nodelist("node[1-2")


def test_detect_env_single_torchrun_slurm():
    assert distributed.detect_env({}) == distributed.DistEnv()
    env = distributed.detect_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "h",
            "MASTER_PORT": "1234",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (
        3,
        8,
        1,
        "h",
        1234,
    )
    assert env.launcher == "torchrun"
    slurm = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08],cpu1",
        "SLURM_JOB_ID": "123456",
    }
    env = distributed.detect_env(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 8, 1, "gpu07")
    assert env.launcher == "slurm"
    assert env.master_port == distributed.PORT_BASE + 123456 % distributed.PORT_SPAN
    assert distributed.detect_env(slurm).master_port == env.master_port  # every task agrees
    with pytest.raises(ValueError, match="RANK"):
        distributed.detect_env({"RANK": "x", "WORLD_SIZE": "2"})


@pytest.mark.parametrize(("procid", "nodeid", "localid"), [(0, 0, 0), (1, 0, 1), (3, 1, 1)])
def test_slurm_two_nodes_rank_is_procid_and_local_rank_is_localid(procid, nodeid, localid):
    # srun on 2 nodes x 2 tasks: task 3 runs on the second node as its second task. The
    # node id only says where a task runs; rank and local rank come from PROCID/LOCALID.
    env = distributed.detect_env(
        {
            "SLURM_PROCID": str(procid),
            "SLURM_NTASKS": "4",
            "SLURM_NODEID": str(nodeid),
            "SLURM_LOCALID": str(localid),
            "SLURM_JOB_NUM_NODES": "2",
            "SLURM_JOB_NODELIST": "cn[009-010]",
            "SLURM_JOB_ID": "77",
        }
    )
    assert (env.rank, env.world_size, env.local_rank) == (procid, 4, localid)
    assert env.master_addr == "cn009"  # the first host of the expanded list, on every node


def test_single_process_helpers():
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    t = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_with_grad(t) is t


# ----------------------------------------------------------------------------- two ranks


def _build():
    torch.manual_seed(0)
    text = {"name": "tiny", "params": {"hidden_size": 32, "intermediate_size": 64}}
    cfg = ModelConfig(
        encoders={"image": {"tower": {"name": "test_resnet"}}, "text": {"tower": text}},
        embed_dim=16,
        local_dim=12,
        sentence_dim=10,
        projection=HeadConfig(kind="mlp", hidden_dim=24),
    )
    specs = [
        ObjectiveSpec("clip"),
        ObjectiveSpec("global_mi", 0.5, {"critic": {"hidden_dims": [16, 8]}}),
        ObjectiveSpec("local_mi", 0.7, {"critic": {"hidden_dims": [16, 8]}, "chunk_size": 64}),
    ]
    return build_pretraining_module(cfg, specs, 64).eval()


def _full_batch(tokenizer):
    g = torch.Generator().manual_seed(1)
    reports = [" ".join(WORDS[i : i + 3 + i % 3]) for i in range(len(SENTENCES))]
    flat = [WORDS[ord(s) % len(WORDS)] + " " + s for group in SENTENCES for s in group]
    r = tokenizer(reports, padding=True, return_tensors="pt")
    s = tokenizer(flat, padding=True, return_tensors="pt")
    frontal = torch.randint(0, 256, (len(SENTENCES), 1, 64, 64), generator=g, dtype=torch.uint8)
    return batch_from_images(
        {"frontal": frontal},
        study_id=torch.tensor(STUDIES),
        report_input_ids=r["input_ids"],
        report_attention_mask=r["attention_mask"],
        sentence_input_ids=s["input_ids"],
        sentence_attention_mask=s["attention_mask"],
        sentence_index=torch.tensor([i for i, grp in enumerate(SENTENCES) for _ in grp]),
    )


def _shard(batch, rank, world):
    """Rows of one rank, with its sentences re-indexed to the rank's rows."""
    per = batch["study_id"].shape[0] // world
    lo, hi = rank * per, (rank + 1) * per
    keep = (batch["sentence_index"] >= lo) & (batch["sentence_index"] < hi)
    out = batch_from_images(
        {"frontal": batch["images"]["frontal"][lo:hi]}, study_id=batch["study_id"][lo:hi]
    )
    for k in ("report_input_ids", "report_attention_mask"):
        out[k] = batch[k][lo:hi]
    out["sentence_input_ids"] = batch["sentence_input_ids"][keep]
    out["sentence_attention_mask"] = batch["sentence_attention_mask"][keep]
    out["sentence_index"] = batch["sentence_index"][keep] - lo
    return out


def _run(model, batch):
    loss, logs = model(batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    losses = {k: v for k, v in logs.items() if k.startswith("loss/")}
    return losses, grads


def _mi_objectives():
    """The MI objectives alone, on random leaf features with a strong signal."""
    torch.manual_seed(2)
    dims = FeatureDims(embed_dim=6, local_dim=5, sentence_dim=7)
    objectives = {
        name: build_objective(
            ObjectiveSpec(name, params={"critic": {"hidden_dims": [16, 8]}, **extra}), dims
        )
        for name, extra in (("global_mi", {}), ("local_mi", {"chunk_size": 16}))
    }
    g = torch.Generator().manual_seed(3)
    index = torch.tensor([i for i, grp in enumerate(SENTENCES) for _ in grp])
    features = {
        "image_global": torch.randn(len(SENTENCES), 6, generator=g),
        "report": torch.randn(len(SENTENCES), 6, generator=g),
        "image_local": torch.randn(len(SENTENCES), 4, 5, generator=g),
        "sentence": torch.randn(len(index), 7, generator=g),
        "sentence_index": index,
        "study_id": torch.tensor(STUDIES),
    }
    return objectives, features


def _run_objectives(objectives, features, rank=0, world=1):
    """Loss and gradients of the MI objectives on this rank's share of ``features``.

    Feature gradients are returned for the whole batch: each rank's rows, gathered, divided
    by the world size (the optimiser's mean over ranks; see the module docstring).
    """
    per = features["image_global"].shape[0] // world
    lo, hi = rank * per, (rank + 1) * per
    keep = (features["sentence_index"] >= lo) & (features["sentence_index"] < hi)
    mine = {
        k: features[k][lo:hi].clone().requires_grad_()
        for k in ("image_global", "report", "image_local")
    }
    mine["sentence"] = features["sentence"][keep].clone().requires_grad_()
    mine["sentence_index"] = features["sentence_index"][keep] - lo
    mine["study_id"] = features["study_id"][lo:hi]
    loss = sum(obj(mine, {}).losses["mi"] for obj in objectives.values())
    loss.backward()
    out = {"loss": loss.detach()}
    for key in ("image_global", "report", "image_local", "sentence"):
        out[f"feature/{key}"] = distributed.gather_no_grad(mine[key].grad) / world
    for name, obj in objectives.items():
        for pname, param in obj.named_parameters():
            out[f"{name}.{pname}"] = param.grad.detach().clone()
    return out


def _worker(rank, world, port, out_path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _build()
        losses, grads = _run(model, _shard(_full_batch(model.model.tokenizer), rank, world))
        mi = _run_objectives(*_mi_objectives(), rank, world)
        for tensor in [*losses.values(), *grads.values(), *mi.values()]:  # mean over ranks
            dist.all_reduce(tensor)
            tensor /= world
        if rank == 0:
            torch.save({"losses": losses, "grads": grads, "mi": mi}, out_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    # equal sentences per rank, so the per-rank sentence means average to the global mean
    per = len(SENTENCES) // WORLD
    assert len({sum(len(s) for s in SENTENCES[r * per : (r + 1) * per]) for r in range(WORLD)}) == 1
    out_path = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(WORLD, _free_port(), out_path), nprocs=WORLD, join=True)
    ranks = torch.load(out_path)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _build()
        losses, grads = _run(model, _full_batch(model.model.tokenizer))
        mi = _run_objectives(*_mi_objectives())
    finally:
        torch.set_num_threads(threads)

    assert set(ranks["losses"]) == set(losses) and len(losses) == 4
    for key, value in losses.items():
        torch.testing.assert_close(ranks["losses"][key], value, atol=1e-5, rtol=1e-5, msg=key)
    assert set(ranks["grads"]) == set(grads)
    image, text = "model.encoders.image.", "model.encoders.text."
    assert any(n.startswith(image) for n in grads) and any(n.startswith(text) for n in grads)
    for part in (image, text, "objectives.global_mi"):
        assert sum(float(g.abs().sum()) for n, g in grads.items() if n.startswith(part)) > 1e-3
    for name, grad in grads.items():
        torch.testing.assert_close(ranks["grads"][name], grad, atol=1e-5, rtol=1e-5, msg=name)

    # MI objectives alone. A rank's feature gradient is the sum over all ranks' losses of their
    # gradients for its rows (gather_with_grad's backward); divided by W it is the gradient of
    # the mean loss, as the parameters' all-reduce mean is.
    assert float(mi["loss"]) < -1e-3 or float(mi["loss"]) > 1e-3
    assert float(mi["feature/image_local"].abs().sum()) > 1e-2
    assert set(ranks["mi"]) == set(mi)
    for key, value in mi.items():
        torch.testing.assert_close(ranks["mi"][key], value, atol=1e-5, rtol=1e-5, msg=key)
