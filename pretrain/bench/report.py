"""The benchmark report: bench/results.json -> results.md (tables) + PNG plots, optionally MLflow.

`pretrain bench all` writes the combined JSON ({"hardware", "suites": {data, loss, train, decode}})
and calls `write_report`; `pretrain bench report` does the same from an existing JSON. Every ratio
shown here is computed from the numbers of one run (measured side by side), never across runs.
This module is not a suite: it only reads what the suites returned (their JSON keys are theirs).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shlex
from pathlib import Path
from typing import Any, Iterator

PLOTS = {
    "loss_time": "loss_time_vs_vocab.png",
    "loss_memory": "loss_memory_vs_vocab.png",
    "train": "train_tokens_per_s_vs_vocab.png",
    "decode": "decode_vectors_per_s_vs_vocab.png",
}
MARKDOWN = "results.md"
SOFTMAX_HEADS = ("softmax", "softmax_chunked", "adaptive_softmax", "liger", "cce")  # the softmax peers


# What the numbers were measured on ---------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_info() -> dict[str, Any]:
    """CPU, GPU, library versions, date and load: absolute numbers mean nothing without them."""
    import faiss
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "faiss": faiss.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if hasattr(os, "getloadavg"):  # other jobs on the machine move the absolute numbers
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpu"] = names[0] if len(set(names)) == 1 else ", ".join(names)
        info["gpu_count"] = len(names)
    return info


def hardware_line(hardware: dict) -> str:
    gpu = f"{hardware.get('gpu_count', 1)} × {hardware['gpu']}" if hardware.get("gpu") else "no GPU"
    return f"{hardware.get('cpu', '?')} ({hardware.get('cores', '?')} cores), {gpu}, torch {hardware.get('torch', '?')}"


# Reading a results file --------------------------------------------------------------------------

def load_results(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no benchmark results there; run `pretrain bench all` first (it writes bench/results.json)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); rerun `pretrain bench all` to rewrite it") from exc
    if not isinstance(results, dict) or not isinstance(results.get("suites"), dict):
        raise ValueError(f"{path} has no 'suites' object: it is not a `pretrain bench all` results file")
    return results


def _suite(results: dict, name: str) -> dict | None:
    """A suite's result, or None when it was not run or failed (the failure is shown in the report)."""
    suite = results.get("suites", {}).get(name)
    return suite if isinstance(suite, dict) and "error" not in suite else None


# Rows: the numbers each table and plot shows, ratios computed here ------------------------------

def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def loss_rows(loss: dict) -> list[dict]:
    """Per V and measured head: median ms [min, max], peak MiB, softmax (and chunked CE) / head, FLOP-ideal V/D."""
    rows = []
    for vocab in sorted(loss["results"], key=int):
        heads = {h: c for h, c in loss["results"][vocab].items() if "ms" in c}
        softmax, chunked = heads["softmax"], heads.get("softmax_chunked", {})
        for head, cell in heads.items():
            rows.append({
                "vocab": int(vocab), "head": head, "ms": cell["ms"], "min_ms": cell.get("min_ms"), "max_ms": cell.get("max_ms"),
                "peak_mib": cell.get("peak_mib"),
                "time_ratio": _ratio(softmax["ms"], cell["ms"]),
                "chunked_time_ratio": _ratio(chunked.get("ms"), cell["ms"]),
                "memory_ratio": _ratio(softmax.get("peak_mib"), cell.get("peak_mib")),
                "chunked_memory_ratio": _ratio(chunked.get("peak_mib"), cell.get("peak_mib")),
                "flop_ideal": int(vocab) / cell["dim"] if "dim" in cell else None,
            })
    return rows


def loss_skipped(loss: dict) -> dict[str, str]:
    """Peers a run could not measure (e.g. the GPU-only ones on CPU), with the reason."""
    return {h: c["skipped"] for cells in loss["results"].values() for h, c in cells.items() if "skipped" in c}


def train_rows(train: dict) -> list[dict]:
    rows = []
    for result in sorted(train["results"], key=lambda r: r["vocab_size"]):
        heads = {k: v for k, v in result.items() if isinstance(v, dict) and "tokens_per_s" in v}
        softmax = heads.get("softmax", {}).get("tokens_per_s")
        rows.append({
            "vocab": result["vocab_size"],
            "tokens_per_s": {head: cell["tokens_per_s"] for head, cell in heads.items()},
            "phases_ms": {head: [cell.get(f"{p}_ms") for p in ("forward", "backward", "optimizer")] for head, cell in heads.items()},
            # The suite's own ratio (median of the rounds' paired ratios) where it has one.
            "over_softmax": {head: result.get(f"ratio_{head}_over_softmax", _ratio(cell["tokens_per_s"], softmax))
                             for head, cell in heads.items() if head != "softmax"},
            "flop_ideal": {head: result.get(f"flop_ideal_{head}_over_softmax") for head in heads if head != "softmax"},
            "softmax_head_params": heads.get("softmax", {}).get("head_params"),
        })
    return rows


def _decode_reference(method: str) -> str:
    return "torch_cpu" if method.endswith("_cpu") else "torch_cuda"


def decode_rows(decode: dict) -> list[dict]:
    """Per V: vectors/s of every method, and each FAISS placement over torch on the same device."""
    rows = []
    for result in sorted(decode["results"], key=lambda r: r["vocab_size"]):
        speed = {name: m["vectors_per_s"] for name, m in result["methods"].items()}
        ratios = {name: _ratio(v, speed.get(_decode_reference(name))) for name, v in speed.items() if name.startswith("faiss_")}
        rows.append({"vocab": result["vocab_size"], "vectors_per_s": speed, "faiss_over_torch": ratios})
    return rows


# Markdown -----------------------------------------------------------------------------------------

def vocab_label(vocab: int) -> str:
    if vocab % 1024 == 0:
        return f"{vocab // 1024}k"
    if vocab % 1000 == 0:
        return f"{vocab // 1000}k"
    return f"{vocab:,}"


def _num(x: float | None) -> str:
    if x is None:
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if abs(x) >= 0.1 else f"{x:.3f}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _times(x: float | None) -> str:
    return "n/a" if x is None else f"{_num(x)}×"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    """A markdown table; align has one letter per column, l or r (default: first column left, numbers right)."""
    align = align or "l" + "r" * (len(header) - 1)
    align = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |", *("| " + " | ".join(r) + " |" for r in rows)]


def _min_max(row: dict) -> str:
    return f"{_num(row['ms'])} [{_num(row['min_ms'])}, {_num(row['max_ms'])}]" if row.get("min_ms") is not None else _num(row["ms"])


def _method_line(suite: dict) -> str:
    clock = {"process_cpu_time": "process CPU time", "cuda_events": "CUDA events"}.get(suite.get("clock"), "wall time, best run")
    load = suite.get("load_average") or {}
    line = f"Methods interleaved round by round; clock: {clock}; median [min, max] of {suite.get('repeats', '?')} repeats"
    if load.get("before"):
        line += f"; load average {' / '.join(map(str, load['before']))} before, {' / '.join(map(str, load.get('after') or []))} after"
    return line + "."


def _loss_section(loss: dict) -> list[str]:
    shape = loss["shape"]
    dims = shape.get("dims", [shape.get("dim")])
    threads = f", {_plural(shape['cpu_threads'], 'CPU thread')}" if loss["device"] == "cpu" else ""
    lines = [
        "## Output head + loss, forward + backward (`pretrain bench loss`)", "",
        f"Device {loss['device']}; N={shape['tokens']} tokens, H={shape['hidden']}, D in {{{', '.join(map(str, dims))}}}, "
        f"{shape['dtype']}, chunk {shape['chunk_size']}, continuous loss implementation `{shape['impl']}`{threads}. "
        f"{_method_line(loss)} Peak memory is what the step allocates beyond its inputs. Ratios: the softmax "
        "head's (or the Liger-style chunked CE's) time or memory / this head's, same run; FLOP-ideal: V/D.", "",
    ]
    rows = [[vocab_label(r["vocab"]), r["head"], _min_max(r), _num(r["peak_mib"]), _times(r["time_ratio"]),
             _times(r["flop_ideal"]) if r["flop_ideal"] else "", _times(r["chunked_time_ratio"]), _times(r["memory_ratio"]),
             _times(r["chunked_memory_ratio"])] for r in loss_rows(loss)]
    lines += _table(["V", "head", "fwd+bwd ms, median [min, max]", "peak MiB", "softmax / head, time", "FLOP-ideal V/D",
                     "chunked CE / head, time", "softmax / head, memory", "chunked CE / head, memory"], rows, align="llrrrrrrr")
    for head, reason in loss_skipped(loss).items():
        lines += ["", f"{head}: {reason}."]
    kernels = loss.get("kernels")
    if isinstance(kernels, dict):
        lines += ["", f"Triton kernels against their PyTorch references at V={vocab_label(kernels['vocab'])} "
                  f"(device peak bandwidth {kernels.get('peak_bandwidth_gb_s')} GB/s):", ""]
        krows = [[name, _num(k["triton_ms"]), _num(k["reference_ms"]), _times(k["speedup"]),
                  _num(k.get("achieved_gb_s")), _num(k.get("fraction_of_peak_bandwidth"))] for name, k in kernels["losses"].items()]
        lines += _table(["loss", "Triton ms", "reference ms", "speed-up", "kernel GB/s", "fraction of peak"], krows)
    elif kernels:
        lines += ["", f"Triton kernels vs references: {kernels}."]
    return lines


def _train_section(train: dict) -> list[str]:
    model = train["model"]
    rows = train_rows(train)
    heads = list(rows[0]["tokens_per_s"]) if rows else []
    ratio_heads = [h for h in heads if h != "softmax"]
    lines = [
        "## End-to-end training throughput (`pretrain bench train`)", "",
        f"Device {train['device']}; the same encoder (d_model {model['d_model']}, {model['n_layers']} layers, "
        f"{model['n_heads']} heads, d_ff {model['d_ff']}), {train['objective']} objective, batch {train['batch_size']} × "
        f"{train['seq_len']} tokens, loss {train['loss']}, target dim {train['target_dim']}; full steps (forward, backward, "
        f"optimizer `{train.get('optimizer', 'AdamW')}` for every head). {_method_line(train)} FLOP-ideal: the ratio of the "
        "two steps' matmul FLOPs per token.", "",
    ]
    table = [[vocab_label(r["vocab"]), *(_num(r["tokens_per_s"][h]) for h in heads),
              *(f"{_times(r['over_softmax'][h])} (ideal {_times(r['flop_ideal'].get(h))})" for h in ratio_heads),
              *(" / ".join(_num(x) for x in r["phases_ms"][h]) if None not in r["phases_ms"][h] else "n/a" for h in heads),
              f"{r['softmax_head_params']:,}" if r["softmax_head_params"] else "n/a"] for r in rows]
    header = ["V", *(f"{h} tokens/s" for h in heads), *(f"{h} / softmax" for h in ratio_heads),
              *(f"{h} fwd / bwd / opt ms" for h in heads), "softmax head params"]
    lines += _table(header, table)
    engine = train.get("engine")
    if engine:
        calls = ", ".join(f"{n} {c}" for n, c in sorted(engine["collectives_per_step"].items())) or "none"
        lines += ["", f"DeepSpeed engine (ZeRO-{engine['zero_stage']}, one process) over the bare PyTorch step of the continuous "
                  f"model: {_num(engine['deepspeed']['step_ms'])} vs {_num(engine['bare']['step_ms'])} ms, overhead "
                  f"{engine['overhead_fraction'] * 100:.0f}%; collectives per step: {calls}."]
    return lines


def _decode_section(decode: dict) -> list[str]:
    rows = decode_rows(decode)
    methods = sorted({m for r in rows for m in r["vectors_per_s"]}, key=lambda m: (not m.startswith("torch"), m))
    faiss = [m for m in methods if m.startswith("faiss_")]
    lines = [
        "## Nearest-neighbour decoding (`pretrain bench decode`)", "",
        f"Top-{decode['k']} of {decode['queries']} queries in a unit table [V, {decode['dim']}]; FAISS {decode['faiss_version']} "
        f"(OpenMP threads {decode['threads']['faiss_omp']}), torch threads {decode['threads']['torch']}. "
        "Ratio: FAISS vectors/s over torch matmul + topk on the same device.", "",
    ]
    table = [[vocab_label(r["vocab"]), *(_num(r["vectors_per_s"].get(m)) for m in methods),
              *(_times(r["faiss_over_torch"].get(m)) for m in faiss)] for r in rows]
    header = ["V", *(f"{m} vectors/s" for m in methods), *(f"{m} / {_decode_reference(m)}" for m in faiss)]
    return lines + _table(header, table)


def _data_section(data: dict) -> list[str]:
    prep, enc = data["prepare_encode_pack_write"], data["sentencepiece_encode"]
    threads = sorted((k for k in enc if k.startswith("threads_") and k != "threads_ratio"), key=lambda k: int(k.split("_")[1]))
    rows = [
        ["prepare: tokenise + pack + write", f"{_num(prep['mb_per_s'])} MB/s", f"{_num(prep['tokens_per_s'])} tokens/s",
         f"{prep['processes']} process{'' if prep['processes'] == 1 else 'es'}" if "processes" in prep else _plural(prep["threads"], "thread")],
        *[[f"prepare, {name.split('_')[1]} process(es)", f"{_num(row['mb_per_s'])} MB/s", f"{_num(row['tokens_per_s'])} tokens/s",
           f"x{row[next(k for k in row if k.startswith('ratio_vs_'))]} (ideal x{row['ideal_ratio']})"]
          for name, row in data.get("prepare_processes", {}).items() if name.startswith("processes_")],
        *[[f"SentencePiece encode, {_plural(int(t.split('_')[1]), 'thread')}", f"{_num(enc[t]['mb_per_s'])} MB/s", f"{_num(enc[t]['tokens_per_s'])} tokens/s",
           f"all threads / 1: {_times(enc.get('threads_ratio'))}" if t == threads[-1] and len(threads) > 1 else ""] for t in threads],
        ["read shards, one process", f"{_num(data['read_shards_one_process']['samples_per_s'])} samples/s",
         f"{_num(data['read_shards_one_process']['tokens_per_s'])} tokens/s", ""],
    ]
    for name, row in data["streaming"].items():
        ratio = next((v for k, v in row.items() if k.startswith("samples_per_s_ratio_vs_")), None)
        rows.append([f"loader, {name.replace('_', ' ')}", f"{_num(row['samples_per_s'])} samples/s", f"{_num(row['tokens_per_s'])} tokens/s",
                     f"first batch {row['first_batch_s']} s, restored from a checkpoint {row['restored_first_batch_s']} s; "
                     f"samples/s vs the first setting: {_times(ratio)}"])
    lines = [
        "## Data: tokenisation and streaming (`pretrain bench data`)", "",
        f"{data['corpus_mb']} MB of text, sequences of {data['seq_len']} tokens, {data['train_samples']:,} training samples; "
        f"tokenizer training took {data['tokenizer_train_s']} s.", "",
    ]
    return lines + _table(["stage", "throughput", "tokens/s", "notes"], rows, align="lrrl")


def _summary(results: dict) -> list[str]:
    """Headline ratios at the largest vocabulary each suite measured."""
    bullets = []
    if loss := _suite(results, "loss"):
        rows = loss_rows(loss)
        top = max(r["vocab"] for r in rows)
        parts = [f"{r['head']} {_times(r['time_ratio'])} time (FLOP-ideal {_times(r['flop_ideal'])}), {_times(r['memory_ratio'])} "
                 f"memory ({_times(r['chunked_memory_ratio'])} against the chunked CE)"
                 for r in rows if r["vocab"] == top and r["head"] not in SOFTMAX_HEADS and "+fused" not in r["head"]]
        shape = loss["shape"]
        bullets.append(f"Head + loss at V={vocab_label(top)}, N={shape['tokens']}, H={shape['hidden']}, softmax / continuous: "
                       + "; ".join(parts) + ".")
    if train := _suite(results, "train"):
        last = train_rows(train)[-1]
        parts = [f"{h} {_times(r)} (FLOP-ideal {_times(last['flop_ideal'].get(h))})" for h, r in last["over_softmax"].items()]
        bullets.append(f"Training tokens/s at V={vocab_label(last['vocab'])}, d_model {train['model']['d_model']}, "
                       f"batch {train['batch_size']}×{train['seq_len']}, continuous / softmax: " + ", ".join(parts) + ".")
    if decode := _suite(results, "decode"):
        last = decode_rows(decode)[-1]
        parts = [f"{m} {_times(r)}" for m, r in last["faiss_over_torch"].items()]
        bullets.append(f"Decoding at V={vocab_label(last['vocab'])}, FAISS / torch vectors/s: " + ", ".join(parts) + ".")
    if data := _suite(results, "data"):
        first = next(iter(data["streaming"].values()))
        bullets.append(f"Data: prepare {_num(data['prepare_encode_pack_write']['mb_per_s'])} MB/s; loader "
                       f"{_num(first['samples_per_s'])} samples/s ({_num(first['tokens_per_s'])} tokens/s).")
    return [f"- {b}" for b in bullets]


SECTIONS = {"loss": _loss_section, "train": _train_section, "decode": _decode_section, "data": _data_section}


def markdown_report(results: dict, plot_dir: str | Path | None = None) -> str:
    """results.md: hardware, headline ratios, one table per suite; plot links relative to plot_dir."""
    hardware = results.get("hardware", {})
    lines = ["# Benchmark results", ""]
    lines.append(f"Measured {hardware.get('date', '(date not recorded)')} on {hardware_line(hardware)}.")
    load = hardware.get("load_average")
    if load:
        end = results.get("load_average_end")
        lines.append(f"Load average (1/5/15 min) at the start: {' / '.join(map(str, load))}"
                     + (f"; at the end: {' / '.join(map(str, end))}" if end else "")
                     + f" (the machine has {hardware.get('cores', '?')} cores; other jobs slow the absolute numbers, not the ratios much).")
    if "seconds" in results:
        lines.append(f"`pretrain bench all` took {results['seconds']:.0f} s.")
    lines += ["", "## Headline ratios", "", *_summary(results)]
    for name, section in SECTIONS.items():
        suite = results.get("suites", {}).get(name)
        if suite is None:
            continue
        lines.append("")
        if "error" in suite:
            lines += [f"## `pretrain bench {name}` failed", "", f"    {suite['error']}"]
            continue
        lines += section(suite)
        if "suite_seconds" in suite:
            lines += ["", f"Suite time {suite['suite_seconds']} s" + (f"; arguments: `{shlex.join(results['suite_args'][name])}`"
                                                                      if results.get("suite_args", {}).get(name) else "") + "."]
    if plot_dir is not None:
        existing = [p for p in PLOTS.values() if (Path(plot_dir) / p).is_file()]
        if existing:
            lines += ["", "## Plots"]
            for name in existing:
                lines += ["", f"![{name[:-4]}]({name})"]
    return "\n".join(lines) + "\n"


# Plots --------------------------------------------------------------------------------------------

def _figure(title: str, subtitle: str):
    # Figure without pyplot: no global backend state; PNGs are drawn by the Agg canvas.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    fig.suptitle(f"{title}\n{subtitle}", fontsize=10)
    return fig, ax


def _vocab_axis(ax, vocabs: list[int]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(vocabs))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([vocab_label(v) for v in vocabs])
    ax.set_xlabel("vocabulary size V (log scale)")
    ax.grid(True, which="both", alpha=0.3)


def _log_y(ax) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda y, _: f"{y:,g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    # Within about a decade there may be no major tick at all: label the minor ones then.
    ax.yaxis.set_minor_formatter(plain if high / low < 20 else NullFormatter())


def _head_style(head: str) -> dict:
    if head in SOFTMAX_HEADS:
        return {"linestyle": "-", "marker": "o", "linewidth": 2.2}
    return {"linestyle": ":" if "+fused" in head else "--", "marker": "s" if "+fused" in head else "^", "linewidth": 1.4}


def _plot_loss(loss: dict, hardware: dict, key: str, ylabel: str, title: str, path: Path) -> None:
    import matplotlib

    rows = loss_rows(loss)
    vocabs = sorted({r["vocab"] for r in rows})
    fig, ax = _figure(title, f"N={loss['shape']['tokens']}, H={loss['shape']['hidden']}, D in {loss['shape']['dims']}, "
                             f"{loss['shape']['dtype']} — {hardware_line(hardware)}")
    plotted = False
    colors = matplotlib.colormaps["tab20"].colors  # more heads than the default ten-colour cycle
    for index, head in enumerate(dict.fromkeys(r["head"] for r in rows)):
        points = [(r["vocab"], r[key]) for r in rows if r["head"] == head and r[key] is not None]
        if points:
            ax.plot(*zip(*points), label=head, color=colors[index % len(colors)], **_head_style(head))
            plotted = True
    if not plotted:
        ax.text(0.5, 0.5, "not measured on this device", ha="center", va="center", transform=ax.transAxes)
    else:
        _log_y(ax)
        ax.legend(fontsize=8, ncol=2)
    _vocab_axis(ax, vocabs)
    ax.set_ylabel(ylabel)
    fig.savefig(path, dpi=120)


def _plot_train(train: dict, hardware: dict, path: Path) -> None:
    rows = train_rows(train)
    fig, ax = _figure("Training throughput vs vocabulary size (same encoder)",
                      f"d_model {train['model']['d_model']}, {train['model']['n_layers']} layers, batch {train['batch_size']}×{train['seq_len']}, "
                      f"{train['device']} — {hardware_line(hardware)}")
    for head in rows[0]["tokens_per_s"]:
        ax.plot([r["vocab"] for r in rows], [r["tokens_per_s"][head] for r in rows], label=head,
                **_head_style("softmax" if head == "softmax" else head.replace("_fused", "+fused")))
    for r in rows:  # the headline ratio at each V, next to the softmax point
        ratio = r["over_softmax"].get("continuous")
        if ratio is not None:
            ax.annotate(_times(ratio), (r["vocab"], r["tokens_per_s"]["softmax"]), textcoords="offset points", xytext=(0, 7),
                        ha="center", fontsize=8)
    _vocab_axis(ax, [r["vocab"] for r in rows])
    _log_y(ax)  # a ratio is then a fixed distance at every V
    ax.set_ylabel("training tokens / s (annotated: continuous / softmax)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def _plot_decode(decode: dict, hardware: dict, path: Path) -> None:
    rows = decode_rows(decode)
    fig, ax = _figure("Nearest-neighbour decoding throughput vs vocabulary size",
                      f"{decode['queries']} queries, D={decode['dim']}, top-{decode['k']} — {hardware_line(hardware)}")
    for method in sorted({m for r in rows for m in r["vectors_per_s"]}):
        points = [(r["vocab"], r["vectors_per_s"][method]) for r in rows if method in r["vectors_per_s"]]
        ax.plot(*zip(*points), label=method, linestyle="-" if method.startswith("torch") else "--", marker="o")
    _vocab_axis(ax, [r["vocab"] for r in rows])
    _log_y(ax)
    ax.set_ylabel("vectors / s")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def write_plots(results: dict, out_dir: str | Path) -> list[Path]:
    """The PNGs whose suite is in the results (a suite not run, or failed, has no plot)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hardware = results.get("hardware", {})
    written = []
    if loss := _suite(results, "loss"):
        for key, kind, ylabel, title in (("ms", "loss_time", "forward + backward (ms)", "Head + loss time vs vocabulary size"),
                                         ("peak_mib", "loss_memory", "peak memory beyond inputs (MiB)", "Head + loss peak memory vs vocabulary size")):
            _plot_loss(loss, hardware, key, ylabel, title, out_dir / PLOTS[kind])
            written.append(out_dir / PLOTS[kind])
    if train := _suite(results, "train"):
        _plot_train(train, hardware, out_dir / PLOTS["train"])
        written.append(out_dir / PLOTS["train"])
    if decode := _suite(results, "decode"):
        _plot_decode(decode, hardware, out_dir / PLOTS["decode"])
        written.append(out_dir / PLOTS["decode"])
    return written


def write_report(results: dict, out_dir: str | Path) -> list[Path]:
    """results.md and the plots into out_dir; returns the files written."""
    out_dir = Path(out_dir)
    written = write_plots(results, out_dir)
    markdown = out_dir / MARKDOWN
    markdown.write_text(markdown_report(results, plot_dir=out_dir))
    return [markdown, *written]


# MLflow -------------------------------------------------------------------------------------------

def _leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Flattened (key, value) pairs; lists of per-V rows are keyed by their vocab_size."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{prefix}{key}.")
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{prefix}{item.get('vocab_size', i)}.")
    else:
        yield prefix[:-1], value


def metrics_and_params(results: dict) -> tuple[dict[str, float], dict[str, str]]:
    """Every number of every suite as a metric; hardware, arguments and text values as params."""
    metrics, params = {}, {}
    for key, value in _leaves(results.get("suites", {})):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[key] = value
        elif value is not None:
            params[key] = json.dumps(value) if isinstance(value, list) else str(value)
    params.update({f"hardware.{k}": str(v) for k, v in results.get("hardware", {}).items()})
    params.update({f"args.{k}": shlex.join(v) for k, v in results.get("suite_args", {}).items()})
    return metrics, params


def track(results: dict, files: list[Path], store_dir: str | Path, *, tracking_uri: str | None = None,
          experiment: str = "pretrain-bench") -> tuple[str, Path]:
    """One new MLflow run per call: results as metrics/params, the JSON, table and plots as artifacts.

    Without tracking_uri the store is SQLite in store_dir (`pretrain ui STORE_DIR` opens it); each
    call gets its own record directory under store_dir/runs, so no call resumes an earlier run.
    Returns the run id and that record directory.
    """
    from mlflow import MlflowClient

    from pretrain.tracking import Tracker, local_store_uri
    from pretrain.tracking.tracker import LOCAL_ARTIFACTS, system_info

    store_dir = Path(store_dir)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    run_dir = store_dir / "runs" / stamp
    uri = tracking_uri or local_store_uri(store_dir)
    if tracking_uri is None:  # artifacts of every bench run next to the shared store, not in the first run's folder
        store_dir.mkdir(parents=True, exist_ok=True)
        chatty = logging.getLogger("mlflow.store.db.utils")  # the schema creation of a new SQLite store
        level = chatty.level
        chatty.setLevel(logging.WARNING)
        try:
            client = MlflowClient(tracking_uri=uri)
            if client.get_experiment_by_name(experiment) is None:
                client.create_experiment(experiment, artifact_location=(store_dir.resolve() / LOCAL_ARTIFACTS).as_uri())
        finally:
            chatty.setLevel(level)
    metrics, params = metrics_and_params(results)
    with Tracker(run_dir, tracking_uri=uri, experiment=experiment, run_name=f"bench-{stamp}") as tracker:
        tracker.set_tags(system_info())
        tracker.log_params(params)
        tracker.log_metrics(metrics, step=0)
        for path in files:
            tracker.log_artifact(path, artifact_path="bench")
    return tracker.run_id, run_dir
