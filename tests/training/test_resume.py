"""Exact resume: a train.py run SIGKILLed at a random step (or while writing a checkpoint) and
started again with ckpt_path=last ends with bitwise the weights of an uninterrupted run; bad
checkpoints are refused before anything is written."""

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from segformer import SegFormer, cli
from segformer.training import resume
from segformer.errors import CheckpointError
from segformer.training.module import SegFormerModule

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 8  # 8 train scenes in batches of 2: 4 steps per epoch, so the run crosses an epoch

# train.py with a callback that SIGKILLs the process at optimizer step KILL_STEP, in the hook
# KILL_PHASE, or that makes torch.save die half-way through the KILL_SAVE-th checkpoint.
WRAPPER = textwrap.dedent(
    """
    import os, signal, sys
    import lightning as L
    import torch
    sys.path.insert(0, os.environ["REPO"])
    import train
    from segformer import cli

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    class Kill(L.Callback):
        def _at(self, trainer, phase):
            if os.environ.get("KILL_PHASE") == phase and trainer.global_step == int(os.environ["KILL_STEP"]):
                die()
        def on_train_batch_start(self, trainer, *args):
            self._at(trainer, "batch_start")
        def on_before_optimizer_step(self, trainer, *args):
            self._at(trainer, "before_optimizer_step")
        def on_train_batch_end(self, trainer, *args):
            self._at(trainer, "batch_end")

    saves, save = [0], torch.save
    def partial_save(obj, handle, *args, **kwargs):
        saves[0] += 1
        if saves[0] == int(os.environ.get("KILL_SAVE", 0)):
            handle.write(b"PK\\x03\\x04 half a checkpoint")
            handle.flush()
            die()
        save(obj, handle, *args, **kwargs)
    torch.save = partial_save

    instantiate = cli.instantiate_callbacks
    cli.instantiate_callbacks = lambda *args, **kwargs: instantiate(*args, **kwargs) + [Kill()]
    sys.argv = ["train.py", *sys.argv[1:]]
    cli.run(train.train, train.CONFIG_DIR, "train")
    """
)


def _overrides(data: Path, *extra: str) -> list[str]:
    return [
        f"data.root={data}",
        "data.dataset.num_train=8",
        "data.dataset.num_val=2",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.crop_size=[64,64]",
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.val_check_interval=8",
        "+trainer.limit_val_batches=0",
        "trainer.deterministic=true",
        "trainer.accelerator=cpu",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.best_checkpoint=null",
        "callbacks.rich_progress_bar=null",
        "callbacks.rich_model_summary=null",
        "~logger",
        *extra,
    ]


def _train(run: Path, data: Path, *extra: str, **kill: str) -> subprocess.CompletedProcess:
    """train.py in a subprocess (what a user runs), with the kill switches of WRAPPER."""
    overrides = [f"hydra.run.dir={run}", *_overrides(data, *extra)]
    # One thread here and in the reference: the same arithmetic (and no OpenMP spinning on a busy machine).
    env = {**os.environ, "REPO": str(ROOT), "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    env.update(kill)
    return subprocess.run(
        [sys.executable, "-c", WRAPPER, *overrides], capture_output=True, text=True, cwd=run.parent, env=env
    )


def _load(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _assert_same_training_state(resumed: dict, reference: dict) -> None:
    assert resumed["global_step"] == reference["global_step"] == MAX_STEPS
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    different = [k for k, v in reference["state_dict"].items() if not torch.equal(resumed["state_dict"][k], v)]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    ours, theirs = (c["optimizer_states"][0]["state"] for c in (resumed, reference))
    assert all(torch.equal(ours[k]["exp_avg_sq"], theirs[k]["exp_avg_sq"]) for k in theirs)


def _reference_run(base: Path, data: Path, *extra: str) -> dict:
    """An uninterrupted run (in this process: the same computation, without a start-up)."""
    cfg = cli.compose(ROOT / "configs", "train", _overrides(data, *extra), run_dir=base / "run")
    sys.path.insert(0, str(ROOT))
    import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.train(cfg)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)  # trainer.deterministic=true set it for the process
    return {"checkpoint": _load(base / "run"), "data": data, "run": base / "run"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("reference")
    return _reference_run(base, base / "sample")


# Weight averaging, with a decay that makes the average far from the training weights.
EMA = ("callbacks=[default,ema]", "callbacks.ema.decay=0.5")


@pytest.fixture(scope="module")
def ema_reference(tmp_path_factory, reference):
    return _reference_run(tmp_path_factory.mktemp("ema_reference"), reference["data"], *EMA)


@pytest.mark.slow
def test_killed_while_saving_then_at_a_random_step_the_run_ends_bitwise_identical(reference, tmp_path):
    run = tmp_path / "run"
    # Killed half-way through the second save (last.ckpt at step 4): the one of step 2 survives.
    killed = _train(run, reference["data"], KILL_SAVE="2")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert _load(run)["global_step"] == 2
    assert [p.name for p in (run / "checkpoints").glob("last.ckpt.tmp-*")]  # the half-written file

    # The same command again resumes from the run folder's checkpoint, and is killed again at a
    # random step after it (resuming at step 4 starts a new epoch, at 2 or 6 the middle of one).
    step = random.randint(2, MAX_STEPS - 1)
    phase = random.choice(["batch_start", "before_optimizer_step", "batch_end"])
    where = f"second kill at step {step}, {phase}"
    killed = _train(run, reference["data"], KILL_STEP=str(step), KILL_PHASE=phase)
    assert killed.returncode == -9, (where, killed.stderr[-3000:])
    assert "Resuming from" in killed.stdout + killed.stderr, where

    resumed = _train(run, reference["data"], "ckpt_path=last")
    assert resumed.returncode == 0, (where, resumed.stderr[-3000:])
    assert "Restored all states" in resumed.stdout + resumed.stderr, where
    _assert_same_training_state(_load(run), reference["checkpoint"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_with_ema_a_run_killed_at_a_random_step_resumes_bitwise(ema_reference, tmp_path):
    run = tmp_path / "run"
    step = random.randint(3, MAX_STEPS - 1)  # after the checkpoint of step 2
    phase = random.choice(["batch_start", "before_optimizer_step", "batch_end"])
    where = f"kill at step {step}, {phase}"
    killed = _train(run, ema_reference["data"], *EMA, KILL_STEP=str(step), KILL_PHASE=phase)
    assert killed.returncode == -9, (where, killed.stderr[-3000:])
    resumed = _train(run, ema_reference["data"], *EMA, "ckpt_path=last")
    assert resumed.returncode == 0, (where, resumed.stderr[-3000:])
    assert "Restored all states" in resumed.stdout + resumed.stderr, where

    ours, theirs = _load(run), ema_reference["checkpoint"]
    _assert_same_training_state(ours, theirs)  # state_dict: the averaged weights
    for key in ("current_model_state", "averaging_state"):
        assert ours[key].keys() == theirs[key].keys(), key
        assert all(torch.equal(ours[key][k], v) for k, v in theirs[key].items()), (where, key)
    assert theirs["averaging_state"]["n_averaged"].item() == MAX_STEPS
    averaged, current = theirs["state_dict"], theirs["current_model_state"]
    assert sum(not torch.equal(averaged[k], current[k]) for k in averaged) > len(averaged) // 2
    # eval.py, predict.py and export (SegFormer.from_pretrained) read the averaged weights.
    model = SegFormer.from_pretrained(run / "checkpoints" / "last.ckpt")
    assert all(torch.equal(v, averaged[f"model.{k}"]) for k, v in model.state_dict().items())


def _module(variant: str = "b0", num_classes: int = 7) -> SegFormerModule:
    model = SegFormer(variant, num_classes=num_classes)
    model.id2label = {k: str(k) for k in range(num_classes)}
    return SegFormerModule(model)


@pytest.mark.slow
def test_resume_paths(reference, tmp_path):
    run = reference["run"]
    last = str(run / "checkpoints" / "last.ckpt")
    assert resume.resume_path(str(run), None, [], str(tmp_path)) == last
    assert resume.resume_path(last, None, [], str(tmp_path)) == last
    with pytest.raises(CheckpointError, match="folder without checkpoints"):
        resume.resume_path(str(tmp_path), None, [], str(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        resume.resume_path(str(tmp_path / "nope.ckpt"), None, [], str(tmp_path))
    resume.check_resumable(last, _module())


@pytest.mark.slow
def test_bad_checkpoints_are_refused_with_one_message(reference, tmp_path):
    last = reference["run"] / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match=r"holds SegFormer-b0 with 7 classes, not .*SegFormer-b0 with 19"):
        resume.check_resumable(str(last), _module(num_classes=19))
    with pytest.raises(CheckpointError, match=r"not .*SegFormer-b1"):
        resume.check_resumable(str(last), _module("b1"))

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"Cannot read checkpoint .*truncated.ckpt"):
        resume.check_resumable(str(truncated), _module())

    weights = tmp_path / "weights.ckpt"
    torch.save({"state_dict": _module().state_dict()}, weights)
    with pytest.raises(CheckpointError, match="not a train.py checkpoint.*model.pretrained"):
        resume.check_resumable(str(weights), _module())


@pytest.mark.slow
def test_train_py_refuses_a_checkpoint_of_another_model_and_writes_nothing(reference, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes((reference["run"] / "checkpoints" / "last.ckpt").read_bytes())
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # Re-running in the folder (no ckpt_path) resumes its checkpoint: with another model, refused.
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    data = [f"data.root={reference['data']}", "data.dataset.num_train=8", "data.dataset.num_val=2"]
    monkeypatch.setattr(sys, "argv", ["train.py", f"hydra.run.dir={run}", "model=b1", *data])
    import train

    with pytest.raises(SystemExit) as exit_info:
        cli.run(train.train, train.CONFIG_DIR, "train")
    err = capsys.readouterr().err
    assert exit_info.value.code == cli.USER_ERROR_EXIT
    assert err.startswith("error: Checkpoint ") and "SegFormer-b1" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in before} == before


def test_the_sampler_resumes_mid_epoch_and_splits_ranks(monkeypatch):
    from segformer.data.sampler import ResumableSampler

    sampler = ResumableSampler(range(10), seed=3)
    sampler.set_epoch(1)
    epoch_1 = list(sampler)
    assert sorted(i for i, _ in epoch_1) == list(range(10)) and epoch_1 == list(sampler)
    sampler.set_epoch(2)
    assert [i for i, _ in sampler] != [i for i, _ in epoch_1]
    # Augmentation seeds depend on (seed, epoch, index) only: index 4 differs between epochs.
    assert dict(epoch_1)[4] != dict(list(sampler))[4]

    resumed = ResumableSampler(range(10), seed=99)
    resumed.load_state_dict(ResumableSampler(range(10), seed=3).state_dict() | {"epoch": 1, "consumed": 6})
    assert list(resumed) == epoch_1[6:]
    resumed.load_state_dict({"seed": 3, "epoch": 1, "consumed": 6})
    resumed.set_epoch(1)  # Lightning announces the epoch it resumes: the position stays
    assert list(resumed) == epoch_1[6:]
    assert list(resumed) == epoch_1  # ... for one iteration only
    resumed.load_state_dict({"seed": 3, "epoch": 1, "consumed": 6})
    resumed.set_epoch(2)  # another epoch starts at its beginning
    assert [i for i, _ in resumed] == [i for i, _ in sampler]

    # Two ranks: disjoint halves of the epoch's order, padded to equal length.
    monkeypatch.setattr(ResumableSampler, "num_replicas", 2)
    ranks = []
    for rank in (0, 1):
        monkeypatch.setattr(ResumableSampler, "rank", rank)
        part = ResumableSampler(range(5), seed=3)
        ranks.append([i for i, _ in part])
    assert len(ranks[0]) == len(ranks[1]) == 3 and set(ranks[0]) | set(ranks[1]) == set(range(5))
