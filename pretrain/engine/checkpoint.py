"""Checkpoints: DeepSpeed's files plus ours, written atomically, the last K kept.

Layout of <run_dir>/checkpoints/:
    step-00000100/                DeepSpeed's files (model, ZeRO optimizer partitions, ...) and ours:
        meta.json                 step, samples seen, hashes of tokenizer and targets, world size...
        rank_00000.json ...       per rank: data stream state and RNG states
        config.resolved.yaml      the run's resolved config
        DIVERGED.txt              only in a checkpoint the NaN guard wrote when it stopped the run
    latest                        DeepSpeed's pointer file (the tag), moved last
    zero_to_fp32.py               DeepSpeed's consolidation tool (ZeRO stages >= 1)

Diverged checkpoints: the one the NaN guard writes when it stops a run holds weights that may be
ruined already. It is kept for inspection but marked (DIVERGED.txt), `latest` stays on the last
healthy checkpoint (so rerunning resumes from there), it does not count toward keep_last, and it is
deleted once a newer healthy checkpoint exists. The last healthy checkpoint is never deleted.

Checksums: meta.json records the sha256 of every other file of the checkpoint (``files``), taken by
rank 0 after the bytes are on disk (fsync); resume and export/eval verify them first, so flipped
bytes in the tensor data or an edited per-rank data position are refused with the file's name.
Checkpoints of format 1 (before checksums) load with a warning.

Atomicity: every rank writes into `<tag>.partial/`; once all are done, rank 0 writes meta.json,
renames the directory to `<tag>` and only then rewrites `latest` (write a temp file, os.replace).
A crash at any point leaves `latest` on the previous complete checkpoint; stale `.partial`
directories are removed by the next run.

Loading: DeepSpeed's loaders (resume, zero_to_fp32) unpickle its .pt files without weights_only, so
every file is first checked to load with weights_only=True (verify_deepspeed_files): a damaged file
or one holding arbitrary Python objects is refused with the file's name before DeepSpeed reads it.

Test-only hook: PRETRAIN_TEST_CRASH_IN_SAVE=<step> kills the process (SIGKILL) in the middle of
saving that step's checkpoint, after DeepSpeed's files are written and before the rename.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
CONFIG = "config.resolved.yaml"
PARTIAL = ".partial"
FORMAT = 2
CHECKSUMS = "files"  # meta.json key: {path relative to the tag dir: sha256} of every other file
CRASH_ENV = "PRETRAIN_TEST_CRASH_IN_SAVE"
DIVERGED = "DIVERGED.txt"
DISK_FULL_BYTES = 16 * 2**20  # a failed write with less free space than this is reported as a full disk


def tag_for_step(step: int) -> str:
    return f"step-{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.json"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# RNG states as JSON (no pickle) --------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *[float(x) if isinstance(x, float) else int(x) for x in np_state[2:]]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# Finding checkpoints ---------------------------------------------------------------------------------

def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / META).is_file() and not tag_dir.name.endswith(PARTIAL)


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step-") and is_complete(p))


def is_diverged(tag_dir: Path) -> bool:
    return (tag_dir / DIVERGED).is_file()


def healthy_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoints not written by the NaN guard, oldest first."""
    return [t for t in complete_tags(ckpt_dir) if not is_diverged(ckpt_dir / t)]


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` points to; if the pointer is missing or stale, the newest healthy checkpoint."""
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if is_complete(ckpt_dir / tag):
            return tag
        log.warning("%s points to %r, which is not a complete checkpoint; using the newest healthy one", pointer, tag)
    tags = healthy_tags(ckpt_dir)
    return tags[-1] if tags else None


def resolve(path: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """(checkpoints dir, tag) from a run dir, a checkpoints dir or a tag dir."""
    path = Path(path)
    if (path / CHECKPOINTS).is_dir():
        ckpt_dir = path / CHECKPOINTS
    elif is_complete(path):
        ckpt_dir, tag = path.parent, tag or path.name
    elif path.is_dir():
        ckpt_dir = path
    else:
        raise FileNotFoundError(f"{path}: no such run or checkpoint directory")
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir} holds no complete checkpoint (train longer than train.checkpoint_every, or pass another run)")
    if not is_complete(ckpt_dir / tag):
        raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} not found or incomplete (no {META}); available: {complete_tags(ckpt_dir)}")
    return ckpt_dir, tag


def damaged_fix(tag_dir: Path) -> str:
    """What to do about a damaged checkpoint: fall back to an earlier one."""
    return (f"delete {tag_dir} to resume training from the previous checkpoint, or pass another one to "
            f"`pretrain eval` / `pretrain export` with --tag (complete ones: {complete_tags(tag_dir.parent)})")


def read_meta(tag_dir: Path) -> dict:
    try:
        return json.loads((tag_dir / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{tag_dir / META} is unreadable ({exc}); {damaged_fix(tag_dir)}") from None


def read_rank_state(tag_dir: Path, rank: int) -> dict:
    path = tag_dir / rank_file(rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: the checkpoint was written by fewer ranks than this run has")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}); {damaged_fix(tag_dir)}") from None


def _deepspeed_record_classes() -> list[type]:
    """The only non-tensor classes DeepSpeed pickles into its checkpoint files (plain records)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def verify_deepspeed_files(tag_dir: Path) -> None:
    """Refuse a checkpoint whose .pt files are damaged or hold arbitrary Python objects.

    DeepSpeed's own loaders (resume, zero_to_fp32) unpickle with weights_only=False, which can run
    code: every file must first load with weights_only=True, allowing tensors, containers and
    DeepSpeed's record classes only. mmap: the pickled structure is read, tensor data stays on disk.
    """
    files = sorted(tag_dir.glob("*.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed files (*.pt): the checkpoint is incomplete; {damaged_fix(tag_dir)}")
    with torch.serialization.safe_globals(_deepspeed_record_classes()):
        for path in files:
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as exc:
                found = next((line for line in str(exc).splitlines() if "GLOBAL" in line), "unsupported content")
                raise ValueError(f"{path} holds Python objects other than tensors and DeepSpeed's records ({found.strip()}); "
                                 "refusing to unpickle it, since that could run code. Load only checkpoints written by "
                                 "`pretrain train`") from None
            except (RuntimeError, OSError, EOFError) as exc:
                first_sentence = str(exc).split(". ")[0]
                raise ValueError(f"{path} is damaged ({first_sentence}); {damaged_fix(tag_dir)}") from None


def _synced_sha256(path: Path) -> str:
    """sha256 of a file, after flushing it to disk (DeepSpeed's torch.save does not fsync)."""
    from pretrain.data.tokenizer import file_sha256

    _fsync(path)
    return file_sha256(path)


def checksums(tag_dir: Path) -> dict[str, str]:
    """{relative path: sha256} of every file of a checkpoint directory except meta.json."""
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != META)
    return {str(p.relative_to(tag_dir)): _synced_sha256(p) for p in files}


def verify_checksums(tag_dir: Path, meta: dict, *, rank: int = 0, world_size: int = 1) -> None:
    """Refuse a checkpoint whose files differ from the sha256 meta.json recorded at save time.

    With world_size > 1 this rank hashes only every world_size-th file (from its rank on): the ranks
    of a job share the reading instead of each hashing the whole checkpoint (Trainer gathers the verdicts)."""
    from pretrain.data.tokenizer import file_sha256

    if meta.get("format", 1) < 2:
        log.warning("%s was written before checkpoints carried checksums: its files cannot be verified", tag_dir)
        return
    recorded = meta.get(CHECKSUMS)
    if not isinstance(recorded, dict) or not recorded:
        raise ValueError(f"{tag_dir / META} lists no file checksums ('{CHECKSUMS}'): it was edited or damaged; {damaged_fix(tag_dir)}")
    for name, expected in sorted(recorded.items())[rank::world_size]:
        path = tag_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: the checkpoint is incomplete; {damaged_fix(tag_dir)}")
        if file_sha256(path) != expected:
            raise ValueError(f"{path} does not match the sha256 recorded in {tag_dir / META} when it was saved: the file "
                             f"was damaged or edited since; {damaged_fix(tag_dir)}")


# Saving ----------------------------------------------------------------------------------------------

def remove_partials(ckpt_dir: Path) -> None:
    for stale in ckpt_dir.glob(f"*{PARTIAL}"):
        log.warning("removing incomplete checkpoint %s (a save was interrupted)", stale)
        shutil.rmtree(stale, ignore_errors=True)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest keep_last healthy checkpoints, the one `latest` names, and diverged ones newer
    than the newest healthy checkpoint (the evidence of the last divergence); delete the rest."""
    healthy = healthy_tags(ckpt_dir)
    keep = set(healthy[-keep_last:]) | {latest_tag(ckpt_dir)}
    newest_healthy = healthy[-1] if healthy else ""
    for tag in complete_tags(ckpt_dir):
        if tag in keep or (is_diverged(ckpt_dir / tag) and tag > newest_healthy):
            continue
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (on any rank); the previous complete one is intact.

    A ValueError so that the command line prints it as one line, without a traceback.
    """


def _any_rank(failed: bool) -> bool:
    """Collective in place of a barrier: True on every rank if any rank failed (none waits alone)."""
    import torch.distributed as dist

    flag = torch.tensor([float(failed)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _write_failure(exc: BaseException | None, ckpt_dir: Path, step: int, rank: int) -> CheckpointWriteError:
    """One clear message for rank 0 (disk full or not, and the way back); a pointer to it elsewhere."""
    if rank != 0:
        return CheckpointWriteError(f"rank {rank}: the checkpoint of step {step} was not written (see rank 0's message)"
                                    + (f": {str(exc).splitlines()[0]}" if exc else ""))
    # torch.save on a full disk says only "unexpected pos ..." or "basic_ios::clear": look at the disk.
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(ckpt_dir).free < DISK_FULL_BYTES
    last = latest_tag(ckpt_dir)
    resume = (f"rerun the same command: it resumes from the last complete checkpoint {ckpt_dir / last} "
              f"(step {int(last.split('-')[1])})" if last else "rerun the same command: with no complete checkpoint it starts from step 0")
    if full:
        return CheckpointWriteError(f"disk full at {ckpt_dir}: the checkpoint of step {step} was not written; "
                                    f"free some space, then {resume}")
    cause = str(exc).splitlines()[0] if exc else "on another rank"
    return CheckpointWriteError(f"could not write the checkpoint of step {step} to {ckpt_dir} ({cause}); {resume}")


def save(engine, ckpt_dir: Path, step: int, *, rank: int, rank_state: dict, meta: dict,
         keep_last: int, write_extra=None, diverged: str | None = None) -> Path:
    """Collective: every rank calls it. Returns the final tag directory.

    write_extra(partial_dir) -> dict runs on rank 0 before the rename (resolved config, learned target
    table); what it returns is added to meta.json. diverged: why the NaN guard stopped the run; the
    checkpoint is then marked and `latest` stays on the last healthy one. A write that fails on any
    rank (e.g. a full disk) raises CheckpointWriteError on every rank, the partial directory removed.
    """
    import torch.distributed as dist

    tag = tag_for_step(step)
    partial = ckpt_dir / (tag + PARTIAL)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    error = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=partial.name, save_latest=False)
        _write_atomic(partial / rank_file(rank), json.dumps(rank_state))
    except (OSError, RuntimeError) as exc:  # RuntimeError: torch.save's failed writes
        error = exc
    if os.environ.get(CRASH_ENV) == str(step):
        log.error("%s=%s: simulating a crash in the middle of saving %s", CRASH_ENV, step, partial)
        os.kill(os.getpid(), signal.SIGKILL)
    final = ckpt_dir / tag
    if not _any_rank(error is not None) and rank == 0:
        try:
            extra_meta = write_extra(partial) if write_extra is not None else {}
            if diverged:
                _write_atomic(partial / DIVERGED, diverged + "\n")
            meta = {**meta, **extra_meta, "format": FORMAT, "tag": tag, "step": step, CHECKSUMS: checksums(partial)}
            _write_atomic(partial / META, json.dumps(meta, indent=2))
            _fsync(partial)
            if final.exists():  # saving the same step again (e.g. a signal right after a periodic save)
                shutil.rmtree(final)
            os.rename(partial, final)
            _fsync(ckpt_dir)
            if not diverged:
                _write_atomic(ckpt_dir / LATEST, tag)
            prune(ckpt_dir, keep_last)
        except (OSError, RuntimeError) as exc:
            error = exc
    if _any_rank(error is not None):
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # frees what the failed save took
        raise _write_failure(error, ckpt_dir, step, rank)
    return final


def load(engine, ckpt_dir: Path, tag: str, rank: int) -> tuple[dict, dict]:
    """Collective: restore DeepSpeed's state; returns (meta, this rank's state).

    The caller has verified the checksums (Trainer._find_resume, before any process group exists).
    """
    tag_dir = ckpt_dir / tag
    meta = read_meta(tag_dir)
    rank_state = read_rank_state(tag_dir, rank)
    verify_deepspeed_files(tag_dir)  # every rank checks every file: all ranks agree, none waits alone
    try:
        load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    except (AssertionError, RuntimeError, OSError, ValueError, KeyError) as exc:  # e.g. a file missing
        raise ValueError(f"DeepSpeed could not load checkpoint {tag_dir} ({type(exc).__name__}: {exc}); {damaged_fix(tag_dir)}") from exc
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {tag_dir}; {damaged_fix(tag_dir)}")
    return meta, rank_state


# Consolidated fp32 weights for evaluation / export -------------------------------------------------

def load_model_state(run_dir_or_checkpoint: str | Path, tag: str | None = None):
    """(fp32 state_dict keyed like build_model's module, Config, meta) from any ZeRO stage or pipeline run.

    ZeRO 1-3: DeepSpeed's get_fp32_state_dict_from_zero_checkpoint (the fp32 master weights).
    ZeRO-0: the module file (its fp32 master weights for bf16 runs). Pipeline runs: the per-layer
    module files, upcast from bf16 for bf16 runs.
    """
    from pretrain.config import load_config

    ckpt_dir, tag = resolve(run_dir_or_checkpoint, tag)
    tag_dir = ckpt_dir / tag
    meta = read_meta(tag_dir)
    verify_checksums(tag_dir, meta)
    cfg = load_config(tag_dir / CONFIG)
    verify_deepspeed_files(tag_dir)
    if cfg.train.pipeline_stages > 1:
        from pretrain.engine.pipeline import load_pipeline_state

        state = load_pipeline_state(tag_dir, cfg.model.n_layers)
    elif cfg.train.zero_stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        except (AssertionError, RuntimeError, OSError, ValueError, KeyError) as exc:  # e.g. a rank's file missing
            raise ValueError(f"cannot consolidate checkpoint {tag_dir} ({type(exc).__name__}: {exc}); {damaged_fix(tag_dir)}") from exc
    else:
        saved = load_weights_file(tag_dir / "mp_rank_00_model_states.pt")
        state = _with_fp32_master_weights(saved, cfg, meta["vocab_size"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return state, cfg, meta


def _with_fp32_master_weights(saved: dict, cfg, vocab_size: int) -> dict:
    """ZeRO-0: the module weights, replaced by the fp32 master copies when training kept them (bf16).

    DeepSpeed stores those in optimizer["fp32_groups"], one list per param group in the order of
    PretrainModel.param_groups; a model on the meta device (no memory) gives the names in that order.
    """
    from pretrain.model import build_model

    state = dict(saved["module"])
    optimizer = saved.get("optimizer")
    groups = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    if not groups:
        return state
    layout = cfg.model_copy(deep=True)
    layout.model.init_embeddings_from_targets = False  # changes values, not the parameter order
    with torch.device("meta"):
        table = torch.empty(vocab_size, cfg.targets.dim) if layout.reads_target_table else None
        model = build_model(layout, vocab_size, table)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in model.param_groups(0.0, 1.0) for p in group["params"]]
    masters = [t for group in groups for t in group]
    if len(order) != len(masters) or any(state[n].shape != t.shape for n, t in zip(order, masters)):
        raise ValueError("the checkpoint's fp32 master weights do not match this model's parameters; "
                         "was it written by another version of the code?")
    state.update(zip(order, masters))
    return state


def load_weights_file(path: Path) -> dict:
    """A DeepSpeed module file of a checkpoint, loaded without unpickling code (weights_only)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: the checkpoint is incomplete")
    return torch.load(path, map_location="cpu", weights_only=True)
