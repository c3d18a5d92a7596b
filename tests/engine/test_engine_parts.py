"""Engine components on their own: schedule, launcher environments, guards, checkpoint bookkeeping."""
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.config import ConfigError, config_from_dict
from pretrain.engine import checkpoint as ckpt
from pretrain.engine.distributed import detect, first_slurm_host
from pretrain.engine.guards import BadStepGuard, GuardedAdamW, check_run_inputs
from pretrain.engine.metrics import MetricsLog, StepStats, summarize
from pretrain.engine.schedule import lr_at, set_lr
from pretrain.engine.trainer import resume_conflicts

# Schedule -------------------------------------------------------------------------------------------

def test_warmup_then_cosine_to_the_floor():
    kw = dict(base_lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(1, **kw) == pytest.approx(0.1)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    decay = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_at(1, **{**kw, "warmup_steps": 0}) == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(ValueError):
        lr_at(0, **kw)


def test_set_lr_honours_each_group_scale():
    p, q = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.AdamW([{"params": [p], "lr_scale": 1.0}, {"params": [q], "lr_scale": 0.25}], lr=1.0)
    set_lr(opt, 0.4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 0.1])


# Launcher environments ------------------------------------------------------------------------------

def test_torchrun_and_deepspeed_launcher_environment():
    env = detect({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port, env.launcher) == (3, 1, 4, "n1", 1234, "env")


def test_slurm_environment_takes_the_first_host_and_a_port_from_the_job_id():
    env = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                  "SLURM_JOB_NODELIST": "gpu[07-09,12],cpu3", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (5, 1, 8, "slurm")
    assert env.master_addr == "gpu07" and env.master_port == 20000 + 123456 % 20000
    given = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "a1", "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "999"})
    assert (given.master_addr, given.master_port) == ("10.0.0.2", 999)
    # torchrun started by srun: torchrun's variables win.
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "RANK": "1", "WORLD_SIZE": "2"}).launcher == "env"


@pytest.mark.parametrize("nodelist, first", [("node1", "node1"), ("node[01-04]", "node01"), ("a[3,5-6]-ib,b1", "a3-ib"),
                                             ("x1,x2", "x1"), ("rack[2]n[1-3]", "rack2n1")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_no_launcher_is_one_process_and_bad_values_are_named():
    env = detect({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "none") and env.master_port > 0
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        detect({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"})
    with pytest.raises(ValueError, match="outside world size"):
        detect({"RANK": "2", "WORLD_SIZE": "2"})


# Guards ---------------------------------------------------------------------------------------------

def test_guarded_adamw_skips_non_finite_gradients_entirely():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    guarded, plain = GuardedAdamW(params, lr=0.1), torch.optim.AdamW(reference, lr=0.1)
    for p, r in zip(params, reference):
        p.grad = r.grad = torch.ones_like(p)
    guarded.step(), plain.step()
    assert not guarded.skipped_last_step
    before = [p.detach().clone() for p in params]
    moments = guarded.state[params[0]]["exp_avg"].clone()
    params[0].grad = torch.ones_like(params[0])
    params[1].grad = torch.tensor([1.0, float("nan"), 1.0])
    guarded.step()
    assert guarded.skipped_last_step
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert torch.equal(guarded.state[params[0]]["exp_avg"], moments) and guarded.state[params[0]]["step"].item() == 1
    for p, r in zip(params, reference):
        p.grad = r.grad = torch.full_like(p, 0.5)
    guarded.step(), plain.step()  # after the skip it matches plain AdamW that never saw the bad step
    assert all(torch.equal(p, r) for p, r in zip(params, reference))


def test_bad_step_guard_counts_runs_in_a_row():
    guard = BadStepGuard(max_in_row=2)
    assert [guard.update(b) for b in (True, False, True, True)] == [False, False, False, True]
    assert guard.state_dict() == {"in_row": 2, "total": 3}
    fresh = BadStepGuard(2)
    fresh.load_state_dict(guard.state_dict())
    assert fresh.update(False) is False and fresh.total == 3


# Inputs checked before training ---------------------------------------------------------------------

MANIFEST = {"vocab_size": 100, "seq_len": 32, "tokenizer_sha256": "abc", "special_ids": {}}


def _check(cfg_over=None, **kw):
    cfg = config_from_dict({"model": {"max_seq_len": 32}, "data": {"seq_len": 32}, "targets": {"dim": 8}, **(cfg_over or {})})
    args = dict(tokenizer_pieces=100, tokenizer_sha256="abc", table_shape=(100, 8), table_meta={"tokenizer_sha256": "abc"}, world_size=2)
    check_run_inputs(cfg, MANIFEST, **{**args, **kw})


def test_consistent_inputs_pass():
    _check()


@pytest.mark.parametrize("change, message", [
    (dict(tokenizer_pieces=99), "manifest.json says vocab_size=100"),
    (dict(tokenizer_sha256="zzz"), "not the tokenizer the shards were made with"),
    (dict(table_shape=(120, 8)), "has 120 rows but the tokenizer has 100"),
    (dict(table_meta={"tokenizer_sha256": "other"}), "built for another tokenizer"),
    (dict(table_shape=(100, 16)), "has dim 16 but targets.dim=8"),
    (dict(cfg_over={"model": {"max_seq_len": 16}}), "sequences of 32 tokens but model.max_seq_len=16"),
    (dict(cfg_over={"data": {"seq_len": 64}, "model": {"max_seq_len": 64}}), "data.seq_len=64 but the shards"),
    (dict(cfg_over={"train": {"pipeline_stages": 2}}, world_size=3), "does not divide the 3 processes"),
])
def test_inconsistent_inputs_name_the_problem(change, message):
    with pytest.raises(ConfigError, match=message):
        _check(**change)


@pytest.mark.parametrize("train, model, loss, message", [
    ({"pipeline_stages": 2, "zero_stage": 3}, {}, {}, "needs train.zero_stage 0 or 1"),
    ({"pipeline_stages": 2, "zero_stage": 1}, {"head": "softmax", "tie_softmax": True}, {}, "model.tie_softmax"),
    ({"pipeline_stages": 2, "zero_stage": 1}, {}, {"fused_head": True}, "loss.fused_head"),
    ({"pipeline_stages": 3, "zero_stage": 1}, {"n_layers": 2}, {}, "every stage needs at least one"),
])
def test_config_cross_checks(train, model, loss, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"train": train, "model": model, "loss": loss})


def test_resume_conflicts_list_only_the_fixed_keys():
    old = config_from_dict({}).to_dict()
    new = config_from_dict({"train": {"steps": 999, "lr": 0.1, "zero_stage": 3}, "model": {"d_model": 64}}).to_dict()
    assert resume_conflicts(old, new) == ["model.d_model: 128 -> 64", "train.zero_stage: 1 -> 3"]


# Checkpoint bookkeeping -----------------------------------------------------------------------------

def _fake_checkpoint(ckpt_dir, step, complete=True):
    tag_dir = ckpt_dir / ckpt.tag_for_step(step)
    tag_dir.mkdir(parents=True)
    if complete:
        (tag_dir / ckpt.META).write_text(json.dumps({"step": step}))
    return tag_dir


def test_latest_pointer_and_its_fallbacks(tmp_path):
    ckpt_dir = tmp_path / "run" / ckpt.CHECKPOINTS
    for step in (10, 20):
        _fake_checkpoint(ckpt_dir, step)
    _fake_checkpoint(ckpt_dir, 30, complete=False)
    assert ckpt.latest_tag(ckpt_dir) == "step-00000020"  # no pointer: newest complete one
    (ckpt_dir / ckpt.LATEST).write_text("step-00000010")
    assert ckpt.latest_tag(ckpt_dir) == "step-00000010"
    (ckpt_dir / ckpt.LATEST).write_text("step-00000030")  # points to an incomplete one
    assert ckpt.latest_tag(ckpt_dir) == "step-00000020"
    assert ckpt.resolve(tmp_path / "run") == (ckpt_dir, "step-00000020")
    assert ckpt.resolve(ckpt_dir / "step-00000010") == (ckpt_dir, "step-00000010")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ckpt.resolve(tmp_path / "run", tag="step-00000030")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.resolve((tmp_path / "empty").mkdir() or tmp_path / "empty")


def test_prune_keeps_the_last_k_and_the_pointer_and_partials_are_removed(tmp_path):
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / (ckpt.tag_for_step(5) + ckpt.PARTIAL)).mkdir()
    (tmp_path / ckpt.LATEST).write_text(ckpt.tag_for_step(1))
    ckpt.prune(tmp_path, keep_last=2)
    assert ckpt.complete_tags(tmp_path) == ["step-00000001", "step-00000003", "step-00000004"]
    ckpt.remove_partials(tmp_path)
    assert not list(tmp_path.glob("*" + ckpt.PARTIAL))


def test_rng_states_round_trip_through_json():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = json.loads(json.dumps(ckpt.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# Metrics --------------------------------------------------------------------------------------------

def test_metrics_log_drops_rows_after_the_resumed_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, enabled=True, resume_step=None)
    for step in range(1, 6):
        log.write({"step": step, "loss": float("nan") if step == 2 else 1.0})
    assert json.loads(path.read_text().splitlines()[1])["loss"] is None  # strict JSON
    MetricsLog(path, enabled=True, resume_step=3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_step_stats_average_micro_batches():
    stats = StepStats()
    for loss, cos in ((1.0, 0.2), (3.0, 0.4)):
        stats.add_micro({"loss": torch.tensor(loss), "mean_cos": torch.tensor(cos), "mean_pred_norm": torch.tensor(2.0)})
    stats.add_batch(torch.arange(6).view(2, 3))
    row = summarize(stats.reduce(torch.device("cpu")))
    assert row["loss"] == pytest.approx(2.0) and row["mean_cos"] == pytest.approx(0.3) and row["mean_pred_norm"] == 2.0
    assert row["data_fingerprint"] > 0 and "accuracy" not in row
    assert math.isnan(summarize({**stats.reduce(torch.device("cpu")), "loss_sum": float("nan")})["loss"])


# Damaged or unsafe checkpoints ----------------------------------------------------------------------

class _RunsCode:
    """Unpickling it would run a command: what a hostile checkpoint file carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_files_that_would_run_code_are_refused_before_unpickling(tmp_path):
    tag_dir = _fake_checkpoint(tmp_path, 5)
    torch.save({"module": {"w": torch.ones(2)}}, tag_dir / "mp_rank_00_model_states.pt")
    ckpt.verify_deepspeed_files(tag_dir)  # tensors and dicts only: accepted
    marker = tmp_path / "code-ran"
    torch.save({"module": {}, "extra": _RunsCode(marker)}, tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError, match=r"zero_pp_rank_0_mp_rank_00_optim_states.pt holds Python objects .*GLOBAL posix.system"):
        ckpt.verify_deepspeed_files(tag_dir)
    assert not marker.exists()


def test_damaged_checkpoint_files_are_named_with_the_way_back(tmp_path):
    tag_dir = _fake_checkpoint(tmp_path, 5)
    with pytest.raises(FileNotFoundError, match=r"holds no DeepSpeed files \(\*\.pt\)"):
        ckpt.verify_deepspeed_files(tag_dir)
    path = tag_dir / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(64)}}, path)
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.raises(ValueError, match=rf"{path} is damaged .*delete {tag_dir} to resume training from the previous checkpoint"):
        ckpt.verify_deepspeed_files(tag_dir)
    (tag_dir / ckpt.rank_file(0)).write_text("{trunc")
    with pytest.raises(ValueError, match=r"rank_00000.json is unreadable .*--tag \(complete ones: \['step-00000005'\]\)"):
        ckpt.read_rank_state(tag_dir, 0)
    (tag_dir / ckpt.META).write_text("{trunc")
    with pytest.raises(ValueError, match=r"meta.json is unreadable .*delete"):
        ckpt.read_meta(tag_dir)


def test_a_deepspeed_load_failure_names_the_checkpoint(tmp_path):
    """A file DeepSpeed expects is missing: its bare AssertionError becomes one clear ValueError."""
    tag_dir = _fake_checkpoint(tmp_path, 5)
    torch.save({"module": {}}, tag_dir / "mp_rank_00_model_states.pt")
    (tag_dir / ckpt.rank_file(0)).write_text(json.dumps({"rank": 0}))

    class Engine:
        def load_checkpoint(self, *args, **kwargs):
            raise AssertionError("no optimizer files")

    with pytest.raises(ValueError, match=rf"DeepSpeed could not load checkpoint {tag_dir} \(AssertionError: no optimizer files\); delete"):
        ckpt.load(Engine(), tmp_path, tag_dir.name, rank=0)


def _flip_tensor_bytes(path, pattern: bytes, count: int) -> None:
    """Flip the sign bit of `count` stored values (the tensor data, not the file's structure)."""
    data = bytearray(path.read_bytes())
    start = data.index(pattern * count)
    for i in range(count):
        data[start + i * len(pattern) + len(pattern) - 1] ^= 0x80
    path.write_bytes(bytes(data))


def test_checksums_catch_flipped_tensor_bytes_and_an_edited_data_position(tmp_path):
    tag_dir = _fake_checkpoint(tmp_path, 5)
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(256)}}, model_file)
    (tag_dir / ckpt.rank_file(0)).write_text(json.dumps({"rank": 0, "data": {"cursor": 3}}))
    meta = {"step": 5, "format": ckpt.FORMAT, ckpt.CHECKSUMS: ckpt.checksums(tag_dir)}
    assert sorted(meta[ckpt.CHECKSUMS]) == ["mp_rank_00_model_states.pt", "rank_00000.json"]
    ckpt.verify_checksums(tag_dir, meta)  # intact: accepted

    original = model_file.read_bytes()
    _flip_tensor_bytes(model_file, np.float32(1.0).tobytes(), 100)
    flipped = torch.load(model_file, weights_only=True)["module"]["w"]
    assert (flipped == -1).sum() == 100  # still a valid file: only the checksum can tell
    with pytest.raises(ValueError, match=rf"{model_file} does not match the sha256 recorded .*delete {tag_dir}"):
        ckpt.verify_checksums(tag_dir, meta)
    model_file.write_bytes(original)

    (tag_dir / ckpt.rank_file(0)).write_text(json.dumps({"rank": 0, "data": {"cursor": 4}}))  # valid JSON, edited
    with pytest.raises(ValueError, match=r"rank_00000.json does not match the sha256"):
        ckpt.verify_checksums(tag_dir, meta)
    with pytest.raises(ValueError, match="lists no file checksums"):
        ckpt.verify_checksums(tag_dir, {"step": 5, "format": ckpt.FORMAT})


def test_ranks_share_the_checksum_work_and_together_cover_every_file(tmp_path):
    tag_dir = _fake_checkpoint(tmp_path, 5)
    for name in ("a.pt", "b.pt", "c.pt"):
        (tag_dir / name).write_bytes(name.encode() * 100)
    meta = {"step": 5, "format": ckpt.FORMAT, ckpt.CHECKSUMS: ckpt.checksums(tag_dir)}
    (tag_dir / "b.pt").write_bytes(b"edited")  # sorted names: a.pt (rank 0), b.pt (rank 1), c.pt (rank 0)
    ckpt.verify_checksums(tag_dir, meta, rank=0, world_size=2)  # not rank 0's share
    with pytest.raises(ValueError, match=r"b.pt does not match the sha256"):
        ckpt.verify_checksums(tag_dir, meta, rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"b.pt does not match the sha256"):
        ckpt.verify_checksums(tag_dir, meta)  # one process checks everything


@pytest.fixture
def one_process_group(tmp_path):
    """A world of one (gloo) for ckpt.save's barriers; torn down after the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg-store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class _FakeEngine:
    """What ckpt.save needs of a DeepSpeed engine: one weights file per checkpoint."""

    def __init__(self, value: float) -> None:
        self.value = value

    def save_checkpoint(self, save_dir, tag, save_latest):  # noqa: ARG002
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.full((4,), self.value)}}, Path(save_dir) / tag / "mp_rank_00_model_states.pt")


def _save(ckpt_dir, step, *, diverged=None):
    return ckpt.save(_FakeEngine(float(step)), ckpt_dir, step, rank=0, rank_state={"rank": 0}, meta={},
                     keep_last=2, diverged=diverged)


def test_the_guards_checkpoint_never_pushes_out_the_last_healthy_one(tmp_path, one_process_group):
    """Healthy 10 and 20; the guard stops at 26; resumed from 20 it stops again at 27; then healthy 30."""
    ckpt_dir = tmp_path / ckpt.CHECKPOINTS
    _save(ckpt_dir, 10), _save(ckpt_dir, 20)
    diverged = _save(ckpt_dir, 26, diverged="training stopped at step 26")
    _save(ckpt_dir, 27, diverged="training stopped at step 27")
    assert ckpt.complete_tags(ckpt_dir) == ["step-00000010", "step-00000020", "step-00000026", "step-00000027"]
    assert ckpt.is_diverged(diverged) and "step 26" in (diverged / ckpt.DIVERGED).read_text()
    assert (ckpt_dir / ckpt.LATEST).read_text() == "step-00000020"  # a rerun resumes from the healthy one
    (ckpt_dir / ckpt.LATEST).unlink()
    assert ckpt.latest_tag(ckpt_dir) == "step-00000020"  # also without the pointer
    assert ckpt.healthy_tags(ckpt_dir) == ["step-00000010", "step-00000020"]
    ckpt.verify_checksums(diverged, ckpt.read_meta(diverged))  # the marker is covered by the checksums
    _save(ckpt_dir, 30)  # healthy again: the abandoned diverged branch goes, keep_last counts healthy ones
    assert ckpt.complete_tags(ckpt_dir) == ["step-00000020", "step-00000030"]


def test_a_torn_last_metrics_line_is_dropped_on_resume_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, enabled=True, resume_step=None)
    for step in range(1, 5):
        log.write({"step": step, "loss": 1.0, "grad_norm": 0.5, "tokens_per_s": 1000.0})
    whole = path.read_text()
    path.write_text(whole[: len(whole) - 20])  # the disk filled in the middle of the last append
    with caplog.at_level("WARNING"):
        MetricsLog(path, enabled=True, resume_step=3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert f"{path}: dropping its torn last line 4" in caplog.text
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')  # damage in the middle is not a torn tail
    with pytest.raises(ValueError, match=rf"{path} line 2 is not a metrics row"):
        MetricsLog(path, enabled=True, resume_step=3)


def test_steps_replayed_after_a_crash_are_known_as_already_sent(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, enabled=True, resume_step=None)
    rows = [{"step": s, "loss": 1.0 / s, "lr": 0.1, "data_fingerprint": 7 * s, "tokens_per_s": 5.0} for s in range(1, 6)]
    for row in rows:
        log.write(row)
    resumed = MetricsLog(path, enabled=True, resume_step=3)
    assert resumed.already_sent({**rows[3], "tokens_per_s": 9.0})  # step 4 replayed exactly
    assert not resumed.already_sent({**rows[3], "loss": 0.3})  # step 4 trained differently (e.g. another lr)
    assert not resumed.already_sent(rows[2])  # kept, not replayed
    assert not resumed.already_sent({**rows[4], "step": 6})  # new


def test_a_full_disk_during_a_save_is_one_clear_message_with_the_way_back(tmp_path, one_process_group, monkeypatch):
    import collections
    import shutil

    ckpt_dir = tmp_path / ckpt.CHECKPOINTS
    _save(ckpt_dir, 10)

    class FullDisk(_FakeEngine):
        def save_checkpoint(self, save_dir, tag, save_latest):  # noqa: ARG002
            (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
            torch.save({"w": torch.ones(10_000)}, "/dev/full")  # torch's own words for it: "unexpected pos ..."

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30, 0))
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        ckpt.save(FullDisk(0.0), ckpt_dir, 20, rank=0, rank_state={}, meta={}, keep_last=2)
    assert str(info.value) == (f"disk full at {ckpt_dir}: the checkpoint of step 20 was not written; free some space, "
                               f"then rerun the same command: it resumes from the last complete checkpoint "
                               f"{ckpt_dir / 'step-00000010'} (step 10)")
    assert ckpt.complete_tags(ckpt_dir) == ["step-00000010"] and not list(ckpt_dir.glob("*" + ckpt.PARTIAL))


def test_a_single_process_listens_on_loopback_only():
    """Without a launcher no rendezvous is needed: no unauthenticated TCP store on every interface."""
    import os
    import subprocess
    import sys

    from engine_launch import LAUNCHER_VARS

    script = ("import psutil; from pretrain.engine.distributed import detect, init_distributed; "
              "init_distributed(detect()); import torch, torch.distributed as dist; t = torch.ones(1); dist.all_reduce(t); "
              "print('LISTEN', *sorted({c.laddr.ip for c in psutil.Process().net_connections('tcp') if c.status == 'LISTEN'}))")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    addresses = next(line.split()[1:] for line in result.stdout.splitlines() if line.startswith("LISTEN"))
    assert all(ip in ("127.0.0.1", "::1") for ip in addresses), addresses
