"""Fine-tuning across machines (issue 30, item 3): ranks started by ``torchrun`` with a c10d rendezvous, as on a
cluster, here two "nodes" on 127.0.0.1 (two torchrun invocations, ``--nnodes 2``, node_rank 0 and 1, one process
each, gloo on CPU).

* one training step of a tiny network, gradients averaged over the two nodes, equals one process's step on the
  combined batch (both nodes' samples, mean loss) within float tolerance;
* the train task's plan (``python -m lib.configs.train_plan``, built as ``POST /train/ensam`` would) runs
  unchanged under torchrun: rank 0 publishes the artefact and writes the statistics.
"""

import copy
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
APP = os.path.join(ROOT, "apps", "ensam")
sys.path.insert(0, HERE)

import torchrun_step_worker as W  # noqa: E402
from lib.local_server import free_port  # noqa: E402

TIMEOUT_S = 300


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=APP + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MONAI_LABEL_TRACKING_ENABLED="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _two_nodes(args, cwd=ROOT, run_id="ensam-test"):
    """Two torchrun invocations joined by one c10d rendezvous on 127.0.0.1: (return codes, outputs)."""
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
               "--nproc-per-node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", run_id, "--max-restarts", "0", *args]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
        if node_rank == 0:
            time.sleep(1.0)  # the first agent hosts the rendezvous store
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], outs


def _combined_batch_step():
    """One process, one step on both ranks' samples: the gradient of the mean of the two losses (a parameter that
    neither sample touched keeps no gradient), then the same clipping and optimiser step as ``train_step``."""
    net = W.make_net(100)  # rank 0's initial weights (the ones broadcast)
    init = copy.deepcopy(net.state_dict())
    other = copy.deepcopy(net)
    case1, rng1 = W.rank_sample(1)
    grads1 = {}

    class _Captured(Exception):
        pass

    def capture(n):
        grads1.update({k: p.grad.detach().clone() for k, p in n.named_parameters() if p.grad is not None})
        raise _Captured  # the gradient only: no step on the copy

    with pytest.raises(_Captured):
        W.train_step(other, W.build_optimizer(other, W.OPTIMIZER, lr=W.LR), case1, rng1, W.loop_config(), "cpu",
                     False, grad_hook=capture)

    def mean_with_sample1(n):
        for k, p in n.named_parameters():
            g0, g1 = p.grad, grads1.get(k)
            if g0 is None and g1 is None:
                continue
            p.grad = ((g0 if g0 is not None else 0.0) + (g1 if g1 is not None else 0.0)) / 2

    case0, rng0 = W.rank_sample(0)
    W.train_step(net, W.build_optimizer(net, W.OPTIMIZER, lr=W.LR), case0, rng0, W.loop_config(), "cpu", False,
                 grad_hook=mean_with_sample1)
    return init, net.state_dict()


def _single_sample_step(rank: int):
    net = W.make_net(100)
    case, rng = W.rank_sample(rank)
    W.train_step(net, W.build_optimizer(net, W.OPTIMIZER, lr=W.LR), case, rng, W.loop_config(), "cpu", False)
    return net.state_dict()


def test_two_torchrun_nodes_step_equals_one_process_on_the_combined_batch(tmp_path):
    torch.set_num_threads(1)
    rcs, outs = _two_nodes([os.path.join(HERE, "torchrun_step_worker.py"), str(tmp_path)])
    assert rcs == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    r = [torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in (0, 1)]
    assert [x["world_size"] for x in r] == [2, 2] and [x["local_rank"] for x in r] == [0, 0]
    assert {x["backend"] for x in r} == {"gloo"}

    init, expected = _combined_batch_step()
    for k, v in init.items():  # rank 1 started from other weights; the broadcast gave it rank 0's
        assert torch.equal(r[1]["init"][k], v) and torch.equal(r[0]["init"][k], v), k
    for k, v in expected.items():
        for x in r:
            assert torch.allclose(x["state"][k], v, rtol=1e-5, atol=1e-6), \
                f"rank {x['rank']}: {k} differs by {(x['state'][k] - v).abs().max().item():.3g}"
    changed = [k for k, v in expected.items() if not torch.equal(v, init[k])]
    assert len(changed) > len(expected) // 2, "the step did not update the weights"
    # the step really used both samples: a step on either sample alone lands elsewhere
    for rank in (0, 1):
        alone = _single_sample_step(rank)
        assert max((alone[k].float() - expected[k].float()).abs().max().item() for k in expected) > 1e-4


def _labelled_datastore(root):
    """A datastore folder with one real CT and its saved ``final`` label (one named structure)."""
    import nibabel as nib

    from lib.monailabel_patches.atomic_datastore import AtomicLocalDatastore

    src = os.path.join(ROOT, "sample-datasets", "train")
    studies = os.path.join(root, "studies")
    ds = AtomicLocalDatastore(studies, extensions=("*.nii.gz", "*.nii"))
    ds.add_image("ct_small", os.path.join(src, "imagesTr", "ct_small.nii.gz"), {})
    lab = nib.load(os.path.join(src, "labelsTr", "ct_small.nii.gz"))
    values, counts = np.unique(np.asarray(lab.dataobj), return_counts=True)
    value = int(values[1:][np.argmax(counts[1:])])  # its largest structure
    one = nib.Nifti1Image((np.asarray(lab.dataobj) == value).astype(np.uint8), lab.affine)
    path = os.path.join(root, "label.nii.gz")
    nib.save(one, path)
    ds.save_label("ct_small", path, "final", {"label_info": [{"name": "liver", "idx": 1}]})
    return studies


def test_the_train_tasks_plan_runs_unchanged_under_torchrun_on_two_nodes(tmp_path):
    sys.path.insert(0, APP)
    from lib.weights import load_artefact

    studies = _labelled_datastore(str(tmp_path))
    app = tmp_path / "app"
    (app / "model").mkdir(parents=True)
    net_json = tmp_path / "tiny.json"
    net_json.write_text(json.dumps(dict(W.TINY, num_labels=128)))
    request = {"max_steps": 2, "max_seconds": 0, "pretrained": False, "concept": False, "labels": "liver",
               "val_split": 0, "optimizer": "adamw", "device": "cpu", "rehearsal": 0}
    plan_file = tmp_path / "plan.json"
    out = subprocess.run([sys.executable, "-m", "lib.configs.train_plan", "--studies", studies,
                          "--app", str(app), "--conf", "network", str(net_json), "--request", json.dumps(request),
                          "--out", str(plan_file)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    plan = json.loads(plan_file.read_text())
    assert plan["format"] == "ensam-train-plan/1"
    assert [it["id"] for it in plan["plan"]["train_items"]] == ["ct_small"]
    assert plan["job"]["publish_path"] == str(app / "model" / "ensam.pt")

    rcs, outs = _two_nodes(["-m", "lib.training.finetune_job", "run", "--plan", str(plan_file)], run_id="ensam-plan")
    assert rcs == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    stats = json.loads((app / "model" / "train_stats.json").read_text())
    assert stats["status"] == "DONE", stats
    assert stats["world_size"] == 2 and stats["launcher"] == "torchrun" and stats["nodes"] == 2
    assert stats["steps"] == 2 and stats["weights"] == "ensam.pt"
    art = load_artefact(str(app / "model" / "ensam.pt"))
    assert art.meta["steps"] == 2 and art.meta["labels_trained"] == ["liver"]
    assert art.network["filters"] == W.TINY["filters"]


def test_the_launcher_environment_is_read_whole_or_refused():
    sys.path.insert(0, APP)
    from lib.training.distributed import LaunchEnv, launch_env, rank_device

    assert launch_env({}) is None  # not launched: the one-machine spawn path
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert launch_env(env) == LaunchEnv(3, 4, 1, 2)
    with pytest.raises(RuntimeError, match="LOCAL_RANK"):
        launch_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(RuntimeError, match="inconsistent"):
        launch_env(dict(env, RANK="4"))
    with pytest.raises(RuntimeError, match="not numeric"):
        launch_env(dict(env, RANK="x"))
    assert rank_device("cpu", 1) == "cpu"
    if not torch.cuda.is_available():
        assert rank_device("cuda", 0) == "cpu"  # no GPU: gloo on CPU
