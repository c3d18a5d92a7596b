"""The training loop: inputs checked -> model -> DeepSpeed engine -> steps -> checkpoints.

One optimizer step = grad_accum micro-batches on every data-parallel rank. Per step the trainer
sets the learning rate (a pure function of the step), runs the micro-batches (or, with pipeline
stages, DeepSpeed's pipeline schedule), all-reduces the step's metrics together with the
preemption flag, applies the NaN guard, logs, and checkpoints when due.

Exit status: 0 done, EXIT_PREEMPTED (99) after a signal-triggered checkpoint, EXIT_DIVERGED (3)
after max_bad_steps_in_row NaN/inf steps (with a checkpoint).

Test-only hooks (environment): PRETRAIN_TEST_PAUSE_AT_STEP=<n> makes rank 0 stop dead after logging
step n (a test then kills the job); see also guards.NAN_ENV and checkpoint.CRASH_ENV.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pretrain.config import Config, ConfigError, flatten, save_resolved
from pretrain.engine import checkpoint as ckpt
from pretrain.engine.distributed import DistEnv, detect, device_for, init_distributed
from pretrain.engine.guards import EXIT_DIVERGED, BadStepGuard, check_run_inputs, nan_test_steps
from pretrain.engine.metrics import MetricsLog, StepStats, Throughput, peak_memory_mb, summarize
from pretrain.engine.optim import build_optimizer, grad_norm, skip_single_replica_allreduce
from pretrain.engine.run_lock import RunDirLocked, RunLock
from pretrain.engine.schedule import lr_for_config, set_lr
from pretrain.engine.signals import EXIT_PREEMPTED, PreemptionFlag
from pretrain.engine.worker_guard import die_with_parent
from pretrain.model import batch_generator, build_model

log = logging.getLogger(__name__)

PAUSE_ENV = "PRETRAIN_TEST_PAUSE_AT_STEP"
# Keys that must not change between a checkpoint and the run resuming from it.
RESUME_FIXED_KEYS = (
    "model", "loss", "targets.dim", "targets.learned", "targets.learned_remedy", "data.seq_len", "data.seed",
    "data.shuffle_buffer", "train.micro_batch_size", "train.grad_accum", "train.zero_stage",
    "train.pipeline_stages", "train.precision", "train.seed", "train.sparse_embedding",
)


@dataclass
class RunInputs:
    """Everything read from disk before training; checked for consistency by guards.check_run_inputs."""

    manifest: dict
    vocab_size: int
    special_ids: dict
    table: torch.Tensor | None
    table_meta: dict | None
    hashes: dict


def load_run_inputs(cfg: Config, world_size: int) -> RunInputs:
    from pretrain.data.manifest import load_manifest, manifest_sha256
    from pretrain.data.tokenizer import file_sha256, load_tokenizer
    from pretrain.targets.table import load_target_table

    data_dir = cfg.data_dir
    manifest = load_manifest(data_dir)
    tokenizer_path = data_dir / manifest.get("tokenizer_file", "tokenizer.model")
    tokenizer_sha = file_sha256(tokenizer_path)
    pieces = load_tokenizer(tokenizer_path).get_piece_size()
    table = table_meta = None
    hashes = {"tokenizer_sha256": tokenizer_sha, "manifest_sha256": manifest_sha256(data_dir)}
    if cfg.reads_target_table:
        table, table_meta = load_target_table(cfg.targets_path)
        hashes.update(targets_sha256=file_sha256(cfg.targets_path), targets_path=str(cfg.targets_path))
    check_run_inputs(cfg, manifest, tokenizer_pieces=pieces, tokenizer_sha256=tokenizer_sha,
                     table_shape=tuple(table.shape) if table is not None else None, table_meta=table_meta,
                     world_size=world_size)
    return RunInputs(manifest, manifest["vocab_size"], manifest["special_ids"], table, table_meta, hashes)


def deepspeed_config(cfg: Config) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        # GuardedAdamW is torch's AdamW plus a finiteness check; DeepSpeed only knows the exact type.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # our own metrics replace DeepSpeed's progress prints
        "wall_clock_breakdown": False,
    }


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """Keys among RESUME_FIXED_KEYS whose values differ between two config dicts."""
    old, new = flatten(saved), flatten(current)
    keys = {k for k in old.keys() | new.keys() if any(k == f or k.startswith(f + ".") for f in RESUME_FIXED_KEYS)}
    return sorted(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def param_digest(module: torch.nn.Module, zero_stage: int) -> str:
    """sha256 of this rank's full parameters (gathered under ZeRO-3): equal on ranks in sync."""
    import deepspeed

    digest = hashlib.sha256()
    for _, p in sorted(module.named_parameters()):
        if zero_stage == 3:
            with deepspeed.zero.GatheredParameters([p]):
                digest.update(p.detach().float().cpu().numpy().tobytes())
        else:
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class Trainer:
    def __init__(self, cfg: Config, *, resume: str = "auto") -> None:
        if resume not in ("auto", "require"):
            raise ValueError(f"resume must be 'auto' or 'require', got {resume!r}")
        self.cfg = cfg
        self.resume_mode = resume
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / ckpt.CHECKPOINTS

    # Set-up ---------------------------------------------------------------------------------------
    def _setup_logging(self) -> None:
        """Rank 0 logs to train.log (and the console); other ranks only warn. DeepSpeed says less."""
        root = logging.getLogger()
        # DeepSpeed calls collectives torch has renamed; one warning per call and rank buries the output.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self._log_handler = None
        if self.env.rank != 0:
            root.setLevel(logging.WARNING)
            return
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        self._log_handler = logging.FileHandler(self.run_dir / "train.log")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name in ("", "DeepSpeed"):
            logging.getLogger(name).addHandler(self._log_handler)

    def _find_resume(self) -> str | None:
        """Tag of the checkpoint to resume from (None: start afresh), after checking it fits this run."""
        tag = ckpt.latest_tag(self.ckpt_dir)
        if tag is None:
            if self.resume_mode == "require":
                raise FileNotFoundError(f"--resume: no complete checkpoint in {self.ckpt_dir}")
            return None
        tag_dir = self.ckpt_dir / tag
        meta = ckpt.read_meta(tag_dir)  # its files' checksums: _verify_resume_files, shared among the ranks
        if meta.get("world_size") != self.env.world_size:
            raise ConfigError(f"checkpoint {tag_dir} was written by {meta.get('world_size')} processes; this job has "
                              f"{self.env.world_size}. Resume with the same number of processes (or use another run_name)")
        saved_hashes = {**meta, "targets_sha256": meta.get("source_targets_sha256", meta.get("targets_sha256"))}
        for key in ("tokenizer_sha256", "targets_sha256", "manifest_sha256"):
            if saved_hashes.get(key) != self.inputs.hashes.get(key):
                raise ConfigError(f"{key.split('_')[0]} changed since checkpoint {tag_dir} ({key} differs): resume needs "
                                  "the same data and targets; use another train.run_name to start a new run")
        from pretrain.config import load_config

        saved = load_config(tag_dir / ckpt.CONFIG).to_dict()
        conflicts = resume_conflicts(saved, self.cfg.to_dict())
        if conflicts:
            raise ConfigError(f"cannot resume {tag_dir} with a different setup: " + "; ".join(conflicts)
                              + ". Restore those values, or use another train.run_name to start a new run")
        return tag

    def _verify_resume_files(self, tag: str) -> None:
        """Collective: each rank sha256-checks its share of the checkpoint's files (a multi-GB
        checkpoint is read once per job, not once per rank); every rank raises if any share failed."""
        import torch.distributed as dist

        tag_dir = self.ckpt_dir / tag
        try:
            ckpt.verify_checksums(tag_dir, ckpt.read_meta(tag_dir), rank=self.env.rank, world_size=self.env.world_size)
            verdict = None
        except (OSError, ValueError) as exc:
            verdict = (isinstance(exc, FileNotFoundError), str(exc))
        verdicts = [None] * self.env.world_size
        dist.all_gather_object(verdicts, verdict)
        failed = next((v for v in verdicts if v is not None), None)
        if failed is not None:
            missing, message = failed
            raise (FileNotFoundError if missing else ValueError)(message)

    def _lock_run_dir(self) -> RunLock:
        """Rank 0 takes the run directory's lock; every rank raises the same refusal if it is held."""
        lock = RunLock(self.run_dir)
        refusal = [None]
        if self.env.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                lock.acquire()
            except RunDirLocked as exc:
                refusal = [str(exc)]
        torch.distributed.broadcast_object_list(refusal, src=0)
        if refusal[0]:
            raise RunDirLocked(refusal[0])
        return lock

    def _build_engine(self):
        import deepspeed

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = build_model(cfg, self.inputs.vocab_size, self.inputs.table, special_ids=self.inputs.special_ids)
        if cfg.train.zero_stage == 3:
            for module, param in self.model.external_parameters():
                deepspeed.zero.register_external_parameter(module, param)
        groups = self.model.param_groups(cfg.train.weight_decay, cfg.train.lr)
        self.pipeline_loss = None
        module = self.model
        if cfg.train.pipeline_stages > 1:
            from pretrain.engine.pipeline import build_pipeline

            module, self.pipeline_loss = build_pipeline(self.model, cfg.train.pipeline_stages)
            # PipelineModule keeps only this stage's layers: so does the optimizer.
            local = {id(p) for p in module.parameters()}
            groups = [{**g, "params": [p for p in g["params"] if id(p) in local]} for g in groups]
            groups = [g for g in groups if g["params"]]
        self.optimizer = build_optimizer(groups, cfg.train)
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=self.optimizer, config=deepspeed_config(cfg))
        if self.pipeline_loss is not None:
            self.dp_rank = engine.grid.get_data_parallel_rank()
            self.dp_world = engine.grid.get_data_parallel_world_size()
            self.first_stage, self.last_stage = engine.is_first_stage(), engine.is_last_stage()
        else:
            self.dp_rank, self.dp_world = self.env.rank, self.env.world_size
            self.first_stage = self.last_stage = True
            skip_single_replica_allreduce(engine, cfg.train.zero_stage, self.dp_world)
        self.norm_from_grads = cfg.train.zero_stage == 0 and cfg.train.precision == "fp32"
        self.grad_norm_at_boundary = None
        # Dropout differs per rank; a resumed run restores these states from the checkpoint.
        torch.manual_seed(cfg.train.seed * 1009 + self.env.rank)
        return engine

    def _build_loader(self):
        from pretrain.data.stream import build_loader

        d = self.cfg.data
        return build_loader(self.cfg.data_dir, "train", batch_size=self.cfg.train.micro_batch_size, rank=self.dp_rank,
                            world_size=self.dp_world, num_workers=d.loader_workers, seed=d.seed, epochs=None,
                            shuffle_buffer=d.shuffle_buffer, on_corrupt_shard=d.on_corrupt_shard, shards_url=d.shards_url)

    # Checkpoints ----------------------------------------------------------------------------------
    def _save(self, step: int, diverged: str | None = None) -> Path:
        meta = {
            **self.inputs.hashes,
            "world_size": self.env.world_size,
            "dp_world_size": self.dp_world,
            "zero_stage": self.cfg.train.zero_stage,
            "pipeline_stages": self.cfg.train.pipeline_stages,
            "precision": self.cfg.train.precision,
            "vocab_size": self.inputs.vocab_size,
            "samples_seen": step * self.samples_per_step,
            "tokens_seen": step * self.tokens_per_step,
            "guard": self.guard.state_dict(),
            "config_digest": self.cfg.digest(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        rank_state = {"rank": self.env.rank, "data": self.loader.state_dict(), "rng": ckpt.rng_state()}
        learned_table = self._learned_table()

        def write_extra(tag_dir: Path) -> dict:
            return self._write_checkpoint_extras(tag_dir, learned_table)

        path = ckpt.save(self.engine, self.ckpt_dir, step, rank=self.env.rank, rank_state=rank_state, meta=meta,
                         keep_last=self.cfg.train.keep_last, write_extra=write_extra, diverged=diverged)
        log.info("checkpoint %s", path)
        return path

    def _gathered_learned_table(self):
        """Context in which the learned table's weight is whole (collective under ZeRO-3)."""
        import contextlib

        if self.cfg.train.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters([self.model.learned_targets.weight])
        return contextlib.nullcontext()

    def _learned_table(self) -> torch.Tensor | None:
        """The learned target table in full, or None (every rank calls it)."""
        if self.model.learned_targets is None:
            return None
        with self._gathered_learned_table():
            return self.model.target_table.float().cpu()

    def _learned_diagnostics(self) -> dict:
        """Collapse diagnostics of the learned table (every rank calls it; cheap next to a step)."""
        if self.model.learned_targets is None:
            return {}
        with self._gathered_learned_table():
            return self.model.learned_targets.diagnostics()

    def _after_optimizer_step(self) -> None:
        if self.model.learned_targets is None:
            self.model.after_optimizer_step()  # counts steps (the κ schedule)
            return
        with self._gathered_learned_table():
            self.model.after_optimizer_step()

    def _write_checkpoint_extras(self, tag_dir: Path, learned_table: torch.Tensor | None) -> dict:
        """Rank 0, inside the not-yet-renamed checkpoint dir; returns additions to meta.json."""
        save_resolved(self.cfg, tag_dir, name=ckpt.CONFIG)
        if learned_table is None:
            return {}
        # Learned targets: eval/export decode with this step's table, saved next to the weights.
        from pretrain.data.tokenizer import file_sha256
        from pretrain.targets.table import save_target_table

        path = tag_dir / "targets.safetensors"
        save_target_table(path, learned_table, {**self.inputs.table_meta, "method": "learned"})
        final_path = self.ckpt_dir / tag_dir.name.removesuffix(ckpt.PARTIAL) / path.name
        return {"targets_path": str(final_path), "targets_sha256": file_sha256(path),
                "source_targets_sha256": self.inputs.hashes["targets_sha256"]}

    def _restore(self, tag: str) -> int:
        meta, rank_state = ckpt.load(self.engine, self.ckpt_dir, tag, self.env.rank)
        self.loader.load_state_dict(rank_state["data"])
        ckpt.set_rng_state(rank_state["rng"])
        self.guard.load_state_dict(meta["guard"])
        log.info("resumed from %s at step %d", self.ckpt_dir / tag, meta["step"])
        return int(meta["step"])

    # The loop -------------------------------------------------------------------------------------
    def _micro_batches(self, step: int, stats: StepStats):
        """This step's micro-batches from the loader, with the objective's inputs and labels."""
        for micro in range(self.cfg.train.grad_accum):
            raw = next(self.data_iter)
            if self.first_stage:
                stats.add_batch(raw["input_ids"])
            yield self.model.objective(raw, batch_generator(self.cfg.train.seed, step, micro, self.dp_rank))

    def _train_step(self, step: int, stats: StepStats) -> None:
        # Test hook: the loss of one rank (the first data-parallel replica's loss-computing rank) is NaN.
        poison = step in self.nan_steps and self.dp_rank == 0 and self.last_stage
        if self.pipeline_loss is not None:
            self.pipeline_loss.poison = poison
            batches = (((b["input_ids"], b["doc_ids"]), b["labels"]) for b in self._micro_batches(step, stats))
            self.engine.train_batch(data_iter=batches)
            for record in self.pipeline_loss.drain():
                stats.add_micro(record)
            return
        self.grad_norm_at_boundary = None
        for batch in self._micro_batches(step, stats):
            result = self.engine({k: v.to(self.device) for k, v in batch.items()})
            loss = result["loss"] * float("nan") if poison else result["loss"]
            self.engine.backward(loss)
            if self.norm_from_grads and self.engine.is_gradient_accumulation_boundary():
                # DeepSpeed records no norm for fp32 without ZeRO; the reduced gradients are here now.
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                self.grad_norm_at_boundary = float(grad_norm(grads))
            self.engine.step()
            stats.add_micro({**result, "loss": loss})

    def _log_skipped_shards(self, total: int) -> None:
        """Collective: rank 0 writes every rank's newly skipped corrupt shards to train.log."""
        import torch.distributed as dist

        entries = [None] * self.env.world_size
        dist.all_gather_object(entries, [{**e, "rank": self.dp_rank} for e in self.loader.skipped["entries"]] if self.first_stage else [])
        for entry in sorted((e for rank_entries in entries for e in rank_entries), key=lambda e: (e["epoch"], e["shard"])):
            key = (entry["rank"], entry["epoch"], entry["shard"])
            if key not in self._skipped_seen:
                self._skipped_seen.add(key)
                log.warning("skipped corrupt shard %s (rank %d, epoch %d, %d samples; data.on_corrupt_shard=skip): %s",
                            entry["shard"], entry["rank"], entry["epoch"], entry["samples"], entry["error"])
        log.warning("%d corrupt shard(s) skipped so far", total)
        self.skipped_shards_logged = total

    def _grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else self.grad_norm_at_boundary

    def run(self) -> int:
        cfg = self.cfg
        # Inputs and the checkpoint to resume are checked before any process group exists:
        # a config error is found at once, on every rank alike.
        self.env: DistEnv = detect()
        if os.environ.get("TORCHELASTIC_RUN_ID"):
            # A rank whose torchrun agent was killed trained on unsupervised: SIGTERM it then, as a
            # preemption (checkpoint, exit 99), so that no orphan keeps writing to the run directory.
            die_with_parent(os.getppid(), signal.SIGTERM)
        self.inputs = load_run_inputs(cfg, self.env.world_size)
        resume_tag = self._find_resume()
        init_distributed(self.env)
        if resume_tag:
            self._verify_resume_files(resume_tag)
        self.device = device_for(self.env)
        lock = self._lock_run_dir()
        try:
            if self.env.rank == 0:
                save_resolved(cfg, self.run_dir)
                if self.ckpt_dir.is_dir():
                    ckpt.remove_partials(self.ckpt_dir)
            torch.distributed.barrier()
            self._setup_logging()
            return self._train(resume_tag)
        finally:
            lock.release()
            if getattr(self, "_log_handler", None) is not None:
                for name in ("", "DeepSpeed"):
                    logging.getLogger(name).removeHandler(self._log_handler)
                self._log_handler.close()

    def _train(self, resume_tag: str | None) -> int:
        cfg = self.cfg
        self.engine = self._build_engine()
        self.loader = self._build_loader()
        self.guard = BadStepGuard(cfg.train.max_bad_steps_in_row)
        start = self._restore(resume_tag) if resume_tag else 0
        self.model.optimizer_steps = start  # the κ schedule continues where the checkpoint left it
        self.samples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * self.dp_world
        self.tokens_per_step = self.samples_per_step * self.inputs.manifest["seq_len"]
        self.nan_steps = nan_test_steps()
        self.skipped_shards_logged, self._skipped_seen = 0, set()
        if self.env.rank == 0:
            print(f"run directory: {self.run_dir}", flush=True)
        if start >= cfg.train.steps:
            log.info("run %s is already trained to step %d (train.steps=%d): nothing to do", self.run_dir, start, cfg.train.steps)
            return 0
        from pretrain.tracking import start_tracking

        tracker = start_tracking(cfg, self.run_dir, self.env.rank, world_size=self.env.world_size)
        try:
            with PreemptionFlag() as flag:
                status = self._loop(start, flag, tracker)
        except BaseException:
            tracker.close(status="FAILED")
            raise
        tracker.close(status="FINISHED" if status == 0 else "KILLED")
        return status

    def _loop(self, start: int, flag: PreemptionFlag, tracker) -> int:
        cfg = self.cfg
        rank0 = self.env.rank == 0
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", rank0, resume_step=start if start else None)
        self.data_iter = iter(self.loader)
        throughput, t_start = Throughput(), time.perf_counter()
        bar = tqdm(total=cfg.train.steps, initial=start, disable=not (rank0 and cfg.train.progress), unit="step",
                   dynamic_ncols=True)
        pause_at = int(os.environ.get(PAUSE_ENV, "0") or 0)
        last_saved = start
        for step in range(start + 1, cfg.train.steps + 1):
            t_step = time.perf_counter()
            lr = lr_for_config(step, cfg.train)
            set_lr(self.engine.optimizer, lr)
            self.optimizer.skipped_last_step = False
            stats = StepStats()
            self._train_step(step, stats)
            self._after_optimizer_step()
            stats.values["preempt"] = float(flag.requested)
            if self.first_stage:  # the stages of one pipeline replica read the same data: count it once
                corrupt = self.loader.skipped
                stats.values.update(skipped_shards=corrupt["shards"], skipped_samples=corrupt["samples"])
            totals = stats.reduce(self.device)
            row = summarize(totals)
            if row["skipped_shards"] > self.skipped_shards_logged:
                self._log_skipped_shards(row["skipped_shards"])
            skipped = self.optimizer.skipped_last_step or not self.engine.was_step_applied()
            bad = skipped or not math.isfinite(row["loss"])
            diverged = self.guard.update(bad)
            throughput.add(self.tokens_per_step)
            step_tps = self.tokens_per_step / max(time.perf_counter() - t_step, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{step_tps:,.0f}", refresh=False)
            if bad:
                log.warning("step %d: loss %s, gradients not finite: update skipped (%d in a row, %d in total)",
                            step, row["loss"], self.guard.in_row, self.guard.total)
            if step % cfg.train.log_every == 0 or bad or step == cfg.train.steps:
                row.update(step=step, lr=lr, grad_norm=self._grad_norm(), tokens_per_s=throughput.rate(),
                           samples_seen=step * self.samples_per_step, tokens_seen=step * self.tokens_per_step,
                           peak_mem_mb=peak_memory_mb(self.device), skipped=skipped, bad_steps=self.guard.total,
                           elapsed_s=time.perf_counter() - t_start, **self._learned_diagnostics())
                # MLflow first: a row in metrics.jsonl then means "sent" (or kept pending), and a
                # replayed step equal to it is not sent again; a crash in between costs a duplicate
                # point, never a missing one.
                if not metrics.already_sent(row):
                    tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step)
                metrics.write(row)
            if step == pause_at and rank0:
                log.warning("%s=%d: pausing forever (test hook)", PAUSE_ENV, step)
                while True:
                    time.sleep(60)
            if diverged:
                reason = (f"training stopped at step {step}: the loss or the gradients were NaN/inf for "
                          f"{self.guard.in_row} steps in a row (train.max_bad_steps_in_row)")
                path = self._save(step, diverged=reason)
                bar.close()
                healthy = ckpt.latest_tag(self.ckpt_dir)
                resume = (f"then rerun the same command: it resumes from the last healthy checkpoint {self.ckpt_dir / healthy}"
                          if healthy else "then rerun the same command: with no healthy checkpoint it starts from step 0")
                log.error("%s. Its checkpoint %s is kept for inspection only (marked %s: its weights may be ruined, it is "
                          "never resumed from and never counts toward train.keep_last). Lower train.lr, raise "
                          "train.warmup_steps or use train.precision=fp32, %s", reason, path, ckpt.DIVERGED, resume)
                return EXIT_DIVERGED
            if totals["preempt"] > 0:
                self._save(step)
                bar.close()
                log.warning("preempted: checkpoint of step %d saved; exiting with status %d (rerun the same command "
                            "to resume)", step, EXIT_PREEMPTED)
                return EXIT_PREEMPTED
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                self._save(step)
                last_saved = step
        bar.close()
        self._write_summary(last_saved, t_start, row)
        return 0

    def _write_summary(self, step: int, t_start: float, last_row: dict) -> None:
        """train_summary.json: final numbers plus every rank's parameter digest (ranks in sync?)."""
        import torch.distributed as dist

        digest = param_digest(self.engine.module, self.cfg.train.zero_stage)
        stage = self.engine.stage_id if self.pipeline_loss is not None else 0
        gathered = [None] * self.env.world_size
        dist.all_gather_object(gathered, {"rank": self.env.rank, "stage": stage, "param_digest": digest})
        if self.env.rank == 0:
            summary = {"step": step, "final_loss": last_row.get("loss"), "wall_s": time.perf_counter() - t_start,
                       "bad_steps": self.guard.total, "skipped_shards": last_row.get("skipped_shards", 0),
                       "skipped_samples": last_row.get("skipped_samples", 0), "ranks": gathered}
            (self.run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
