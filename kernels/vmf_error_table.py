"""Measured error of the closed-form log C_m(κ) against the exact value, per dimension m.

    python -m pretrain_kernels.vmf_error_table [--markdown]

For each approximation and m, over κ in [1e-3, 1e5] (log grid):
  value_err   max |approx − exact| (debye: the NLL itself)
  offset      for the forms "up to a constant": the median of approx − exact, and
  spread      max − min of approx − exact over κ (what the constant cannot absorb)
  deriv_rel   max relative error of d/dκ log C_m (the Bessel ratio the gradient uses)
The exact side is vmf_normaliser.log_cm_exact_numpy (checked against mpmath in the tests).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from pretrain_kernels.vmf_normaliser import APPROXIMATIONS, DEBYE_MIN_DIM, dlog_cm_approx, log_cm_approx, log_cm_exact_numpy

DIMS = (4, 8, 16, 32, 64, 128, 300, 512, 1024, 2048)
KAPPAS = np.logspace(-3, 5, 161)


def error_table(dims=DIMS, kappas=KAPPAS) -> list[dict]:
    rows = []
    kappa_t = torch.tensor(kappas, dtype=torch.float64)
    for m in dims:
        exact, dexact = log_cm_exact_numpy(m, kappas)
        for approx in APPROXIMATIONS:
            if approx == "debye" and m < DEBYE_MIN_DIM:
                continue  # refused by the API (its gradient is off by up to 118% there)
            diff = log_cm_approx(kappa_t, m, approx).numpy() - exact
            deriv_rel = np.abs(dlog_cm_approx(kappa_t, m, approx).numpy() - dexact) / np.abs(dexact)
            worst = int(np.argmax(deriv_rel))
            rows.append({
                "m": m,
                "approx": approx,
                "value_err": float(np.abs(diff).max()),
                "offset": float(np.median(diff)),
                "spread": float(diff.max() - diff.min()),
                "deriv_rel": float(deriv_rel.max()),
                "deriv_rel_worst_kappa": float(kappas[worst]),
            })
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| m | approx | max abs value error | median offset | spread (max−min) | max rel. error of d/dκ | at κ |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['m']} | {r['approx']} | {r['value_err']:.2e} | {r['offset']:.4g} | {r['spread']:.2e} | "
            f"{r['deriv_rel']:.2e} | {r['deriv_rel_worst_kappa']:.3g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead of JSON")
    args = parser.parse_args(argv)
    rows = error_table()
    print(markdown(rows) if args.markdown else json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
