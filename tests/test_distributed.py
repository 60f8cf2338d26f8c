"""torchrun with two CPU processes (gloo, 127.0.0.1): the numbers must be those of one process."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from visiontune import checkpoint, training
from visiontune.backbones import build_classifier
from visiontune.cli import main
from visiontune.evaluation import evaluate_run
from visiontune.recipes import lr_multiplier
from visiontune.runfolder import RunFolder

from .conftest import approx_loss, make_folder, read_metrics

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, **popen) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]


def run_torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(torchrun(args, nproc), capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun's workers are not in its process group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    doomed, queue = [], [pid]
    while queue:
        current = queue.pop()
        doomed.append(current)
        queue.extend(children.get(current, []))
    for victim in doomed:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for victim in doomed:  # wait until no worker can write to the run folder any more
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                state = Path(f"/proc/{victim}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                break
            if state in ("Z", "X"):
                break
            time.sleep(0.01)


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory) -> Path:
    # 25 training images and 9 val images: neither divides by 2.
    return make_folder(tmp_path_factory.mktemp("ddp") / "data", {"a": 9, "b": 8, "c": 8}, val_per_class=3)


@pytest.fixture(scope="module")
def ddp_settings(tiny_weights, tmp_path_factory) -> list[str]:
    cache = tmp_path_factory.mktemp("ddp-cache")
    return ["--model", "test_efficientnet", "--weights", str(tiny_weights), "--image-size", "48",
            "--train-size", "48", "--batch-size", "4", "--cache-dir", str(cache), "--no-channels-last",
            "--head-init", "random", "--lr", "0.05", "--optimizer", "sgd", "--bn", "train"]


@pytest.fixture(scope="module")
def two_process_run(odd_data, ddp_settings, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("ddp-run") / "run"
    done = run_torchrun(["-m", "visiontune", "train", str(odd_data), "--out", str(out), "--epochs", "3",
                         *ddp_settings])
    return out, done


UNIT_SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path

    import timm, torch

    from visiontune import runtime
    from visiontune.backbones import data_config
    from visiontune.engine import evaluate
    from visiontune.features import extract_features
    from visiontune.images import decode_array
    from visiontune.preprocess import EvalTransform, Preprocessing, normalize_batch

    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    rt = runtime.start("cpu", "fp32")
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    pre = Preprocessing.from_data_config(data_config(model), 48)
    paths = sorted(folder.rglob("*.png"))
    labels = torch.tensor([sorted({p.parent.name for p in paths}).index(p.parent.name) for p in paths])
    images = torch.stack([EvalTransform(pre)(decode_array(p, pre.resize)) for p in paths])

    def batches(indices):
        return [(images[indices[i:i + 2]], labels[indices[i:i + 2]]) for i in range(0, len(indices), 2)]

    everything = list(range(len(paths)))
    single = evaluate(model, batches(everything), lambda x: normalize_batch(x, pre))
    shared = evaluate(model, batches(rt.shard(everything)), lambda x: normalize_batch(x, pre), reduce=rt.all_reduce_sum)

    # Count the images each rank decodes (and so pushes through the backbone) while extracting features.
    decoded = []
    def counting_decode(path):
        decoded.append(path)
        return decode_array(path, pre.resize)
    features, _ = extract_features(model, paths, counting_decode, pre, 1, 0, None, batch_size=2,
                                   channels_last=False, runtime=rt)
    counted = len(decoded)
    reference, _ = extract_features(model, paths, lambda p: decode_array(p, pre.resize), pre, 1, 0, None,
                                    batch_size=2, channels_last=False)
    result = {"rank": rt.rank, "world": rt.world_size, "n": len(paths),
              "single": [single.loss, single.accuracy, single.n], "shared": [shared.loss, shared.accuracy, shared.n],
              "extracted_here": counted, "features_equal_max_diff": float((features - reference).abs().max())}
    (out / f"rank{rt.rank}.json").write_text(json.dumps(result))
''')


def test_val_metrics_of_two_processes_equal_one_process(tmp_path):
    # 7 val images over 2 ranks in batches of 2: shards of 4 and 3 with short last batches; a padded
    # sampler would count one image twice.
    folder = make_folder(tmp_path / "val", {"a": 3, "b": 2, "c": 2}, layout="flat")
    script = tmp_path / "unit.py"
    script.write_text(UNIT_SCRIPT)
    run_torchrun([str(script), str(folder), str(tmp_path)])
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in results:
        assert result["world"] == 2 and result["n"] == 7
        single_loss, single_acc, single_n = result["single"]
        shared_loss, shared_acc, shared_n = result["shared"]
        assert shared_n == single_n == 7
        assert round(shared_acc * 7) == round(single_acc * 7)
        assert shared_loss == approx_loss(single_loss)
    # Feature extraction is sharded: 4 images on rank 0, 3 on rank 1, and both ranks get all 7.
    assert [r["extracted_here"] for r in results] == [4, 3]
    assert all(r["features_equal_max_diff"] < 1e-5 for r in results)


def test_two_process_training_writes_the_run_once(two_process_run):
    out, done = two_process_run
    assert done.stdout.count("best epoch") == 1  # rank 0 alone reports
    assert "rank 1" not in done.stderr
    assert json.loads((out / "config.json").read_text())["processes"] == 2
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])  # training loss falls
    assert not list(out.glob("*.tmp*"))


def test_two_process_val_metrics_match_one_process_on_the_same_weights(two_process_run):
    out, _ = two_process_run
    model_json = json.loads((out / "model.json").read_text())
    result = evaluate_run(out)  # one process, unfolded BatchNorm, the run's own val split
    assert result["n"] == 9
    assert result["accuracy"] == model_json["val_acc"]
    assert result["loss"] == approx_loss(model_json["val_loss"])


def test_torchrun_eval_prints_what_one_process_prints(two_process_run, capsys):
    out, _ = two_process_run
    assert main(["eval", str(out), "--format", "json"]) == 0
    one = capsys.readouterr().out
    two = run_torchrun(["-m", "visiontune", "eval", str(out), "--format", "json"])
    a, b = json.loads(one), json.loads(two.stdout)  # one JSON document: rank 1 printed nothing
    assert (a["n"], a["correct"], a["accuracy"]) == (b["n"], b["correct"], b["accuracy"])
    assert a["loss"] == approx_loss(b["loss"])
    assert a["confusion_matrix"] == b["confusion_matrix"]


def _epoch_end_lrs(rows: list[dict], lr: float, epochs: int, steps_per_epoch: int) -> list[tuple[float, float]]:
    return [(float(r["lr"]), lr * lr_multiplier("cosine", int(r["epoch"]) * steps_per_epoch - 1, steps_per_epoch,
                                                epochs, 0.0)) for r in rows]


def test_a_two_process_run_resumes_with_one(odd_data, ddp_settings, tmp_path):
    out, epochs = tmp_path / "run", 8
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(torchrun(["-m", "visiontune", "train", str(odd_data), "--out", str(out), "--epochs",
                                         str(epochs), *ddp_settings]),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 240
    while not ((out / "metrics.csv").is_file() and len(read_metrics(out)) >= 2):
        assert process.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "training did not reach epoch 2"
        time.sleep(0.02)
    kill_tree(process.pid)  # torchrun and every worker, as a lost node would
    process.wait()
    state = RunFolder(out).load_last()
    killed_at, kept = state["epoch"], read_metrics(out)[: state["epoch"]]
    assert 1 <= killed_at < epochs
    resumed = training.resume(out, quiet=True)
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert rows[:killed_at] == kept
    # Resumed epochs follow the one-process schedule: 25 images in batches of 4, the last batch of one
    # dropped = 6 steps per epoch (two processes had 3), so a schedule restored by step count would be off.
    for got, want in _epoch_end_lrs(rows[killed_at:], 0.05, epochs, 6):
        assert got == pytest.approx(want, rel=1e-4)
    assert resumed.best_val_acc == max(float(r["val_acc"]) for r in rows)


def test_a_one_process_run_resumes_with_two(odd_data, ddp_settings, tmp_path, monkeypatch):
    out, epochs = tmp_path / "run", 4
    save = checkpoint.save_training_state

    class Stop(Exception):
        pass

    def save_then_stop(path, state):
        save(path, state)
        if state["epoch"] == 2:
            raise Stop

    monkeypatch.setattr(checkpoint, "save_training_state", save_then_stop)
    args = ["train", str(odd_data), "--out", str(out), "--epochs", str(epochs), "--quiet", *ddp_settings]
    from visiontune.cli import build_parser

    parsed = vars(build_parser().parse_args(args))
    settings = {k: v for k, v in parsed.items() if k not in ("command", "data", "resume", "config")}
    with pytest.raises(Stop):
        training.train(str(odd_data), **settings)
    monkeypatch.undo()
    kept = read_metrics(out)
    assert len(kept) == 2
    run_torchrun(["-m", "visiontune", "train", "--resume", str(out)])
    rows = read_metrics(out)
    assert rows[:2] == kept and [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    # Two processes: 13 images each (one padded), batches of 4, the last of one dropped = 3 steps per epoch.
    for got, want in _epoch_end_lrs(rows[2:], 0.05, epochs, 3):
        assert got == pytest.approx(want, rel=1e-4)
    assert RunFolder(out).load_last()["finished"]


def test_bad_input_under_torchrun_is_said_once(tmp_path):
    missing = tmp_path / "no-such-folder"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(torchrun(["-m", "visiontune", "train", str(missing)]), capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode != 0
    assert done.stderr.count("visiontune: error:") == 1 and str(missing) in done.stderr
    assert "Traceback" not in done.stdout


SAME_MODEL_SCRIPT = textwrap.dedent('''
    import hashlib, json, os, sys
    from pathlib import Path

    import visiontune

    data, out, settings = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    run = visiontune.train(data, out=str(out / "run"), **settings)
    state = run.model.state_dict()
    digest = hashlib.sha256(b"".join(state[k].cpu().numpy().tobytes() for k in sorted(state))).hexdigest()
    (out / f"rank{os.environ.get('RANK', '0')}.txt").write_text(digest)
''')


def test_fixed_mode_with_two_processes_equals_one_process(odd_data, tiny_weights, tmp_path):
    # The head trains on gathered features, identically on every rank: the metrics equal one process's.
    # It trains on every rank without DDP, so it must start from the same initialisation everywhere;
    # the returned model must be rank 0's on every rank. The two processes read WebDataset shards of
    # the folder (each rank its share of the samples), the one process the folder itself.
    from visiontune.shards import write_shards

    write_shards(odd_data, tmp_path / "shards", shard_size=7)
    script = tmp_path / "same.py"
    script.write_text(SAME_MODEL_SCRIPT)
    settings = {"mode": "fixed", "epochs": 5, "model": "test_efficientnet", "weights": str(tiny_weights),
                "image_size": 48, "batch_size": 4, "quiet": True, "channels_last": False, "head_init": "random",
                "lr": 0.05, "optimizer": "sgd"}
    for folder in ("two", "one"):  # each its own feature cache: one process computes every feature itself
        (tmp_path / folder).mkdir()
        settings_here = json.dumps({**settings, "cache_dir": str(tmp_path / folder / "cache")})
        if folder == "two":
            run_torchrun([str(script), str(tmp_path / "shards"), str(tmp_path / folder), settings_here])
        else:
            one = subprocess.run([sys.executable, str(script), str(odd_data), str(tmp_path / folder), settings_here],
                                 capture_output=True, text=True)
            assert one.returncode == 0, one.stderr
    written = json.loads((tmp_path / "two" / "run" / "config.json").read_text())
    assert (written["data"]["layout"], written["processes"]) == ("shards", 2)
    assert (tmp_path / "two" / "rank0.txt").read_text() == (tmp_path / "two" / "rank1.txt").read_text()
    two_rows, one_rows = read_metrics(tmp_path / "two" / "run"), read_metrics(tmp_path / "one" / "run")
    assert len(two_rows) == len(one_rows) == 5
    for a, b in zip(two_rows, one_rows):
        assert float(a["val_loss"]) == approx_loss(float(b["val_loss"]))
        assert a["val_acc"] == b["val_acc"]
    assert math.isfinite(float(two_rows[-1]["train_loss"]))


def test_auto_mode_under_torchrun_plans_once_and_fine_tunes_with_ddp(odd_data, ddp_settings, tiny_weights, tmp_path):
    # auto = staged's two stages plus a plan: head on sharded features, rank 0's plan sent to every rank,
    # then fine-tuning under DDP. The one mode whose torchrun path no other test walks through.
    out = tmp_path / "auto"
    done = run_torchrun(["-m", "visiontune", "train", str(odd_data), "--out", str(out), "--mode", "auto",
                         "--budget", "1h", "--head-epochs", "2", "--epochs", "2", *ddp_settings])
    assert done.stdout.count("best epoch") == 1
    plan = json.loads((out / "auto.json").read_text())
    assert plan["full_epochs"] == 2 and done.stdout.count(plan["decision"]) == 1
    assert [r["stage"] for r in read_metrics(out)] == ["head", "head", "full", "full"]
    # The full stage trained the backbone (DDP), and the saved best weights give the logged val numbers.
    last = RunFolder(out).load_last()["model"]
    pretrained, _ = build_classifier("test_efficientnet", 3, str(tiny_weights))
    assert not torch.equal(last["blocks.2.0.conv_exp.weight"], pretrained.state_dict()["blocks.2.0.conv_exp.weight"])
    model_json = json.loads((out / "model.json").read_text())
    result = evaluate_run(out)
    assert result["accuracy"] == model_json["val_acc"]
    assert result["loss"] == approx_loss(model_json["val_loss"])


def test_the_default_recipe_under_torchrun_decides_as_one_process(odd_data, tiny_weights, tmp_path):
    # The default's measurements before fine-tuning (the image size of small images, then --bn auto) read
    # the features of every training image: a collective pass under torchrun. Each rank must take part,
    # and the decisions must be one process's, said once.
    settings = ["--model", "test_efficientnet", "--weights", str(tiny_weights), "--batch-size", "4",
                "--no-channels-last", "--epochs", "1"]
    two, one = tmp_path / "two", tmp_path / "one"
    done = run_torchrun(["-m", "visiontune", "train", str(odd_data), "--out", str(two), "--cache-dir",
                         str(tmp_path / "cache-two"), *settings])
    assert main(["train", str(odd_data), "--out", str(one), "--cache-dir", str(tmp_path / "cache-one"), "--quiet",
                 *settings]) == 0
    record_two, record_one = (json.loads((run / "config.json").read_text()) for run in (two, one))
    assert record_two["processes"] == 2
    for decision in ("image_size_decision", "bn_decision"):
        assert done.stdout.count(record_two[decision]["why"]) == 1
    # The features are computed in other batches on two ranks: losses agree to a relative tolerance,
    # counts and choices exactly.
    sizes_two, sizes_one = record_two["image_size_decision"], record_one["image_size_decision"]
    assert {k: v for k, v in sizes_two.items() if k != "probe"} == {k: v for k, v in sizes_one.items() if k != "probe"}
    scores_two, scores_one = ([(e["size"], e["val_acc"]) for e in d["probe"]] for d in (sizes_two, sizes_one))
    assert scores_two == scores_one
    assert [e["val_loss"] for e in sizes_two["probe"]] == [approx_loss(e["val_loss"]) for e in sizes_one["probe"]]
    assert sizes_two["probe"][0]["size"] == 112
    assert record_two["bn_decision"] == record_one["bn_decision"]  # an agreement is a count over 25 images
    probe_two, probe_one = read_metrics(two)[0], read_metrics(one)[0]
    assert probe_two["val_acc"] == probe_one["val_acc"]
    assert float(probe_two["val_loss"]) == approx_loss(float(probe_one["val_loss"]))


NAN_SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path

    import torch
    from torch.nn.parallel import DistributedDataParallel

    from visiontune import runtime
    from visiontune.engine import NonFiniteLoss, train_one_epoch

    out = Path(sys.argv[1])
    rt = runtime.start("cpu", "fp32")
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(4, 3))
    batches = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(4)]
    if rt.rank == 1:
        batches[2][0][0, 0] = float("nan")  # only rank 1 sees a bad sample, in its third batch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        train_one_epoch(model, batches, optimizer, reduce=rt.all_reduce_sum)
        result = {"stopped_at": None}
    except NonFiniteLoss as exc:
        result = {"stopped_at": exc.step}
    (out / f"rank{rt.rank}.json").write_text(json.dumps(result))
    # The step stopped between DDP's forward and its backward: free the DDP wrapper before the exit
    # hook destroys the process group under it (else gloo may abort the process as it exits).
    del model, optimizer
    import gc
    gc.collect()
''')


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    # Without the shared check rank 0 would go on into the gradient exchange of step 3 and wait there
    # for rank 1 until the timeout.
    script = tmp_path / "nan.py"
    script.write_text(NAN_SCRIPT)
    run_torchrun([str(script), str(tmp_path)], timeout=120)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["stopped_at"] for r in (0, 1)] == [3, 3]
