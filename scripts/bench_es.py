"""Benchmark one ES hypergradient: the population as one vmap vs a Python loop over candidates.

Same work on both sides: the same problem, batch, noise (same seed and call counter) and so
the same estimate (its largest deviation from the loop's is printed). Times the reference
loop (``vectorize=False``), the vmap of all 2P candidates (``chunk=None``), and a chunked
vmap (``chunk=P``: two calls), each the median of ``--repeats`` (interleaved) after one
warm-up. On CUDA also the peak allocated memory of each.

    python scripts/bench_es.py                    # CPU
    python scripts/bench_es.py --device cuda

The last line printed is one JSON object with every measured ratio (loop time / vmap time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _bench_common import setup  # scripts/ is on sys.path

CONFIGS = [  # name, task, T, K, P
    ("sine_ml3_T8_K5_P16", "sine", 8, 5, 16),
    ("mnist1d_taylorglo_T4_K5_P16", "mnist1d", 4, 5, 16),
]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _once(es, problem, meta, batch, device: str):
    es.load_state_dict({"calls": 0})  # every call at the same noise
    _sync(device)
    t0 = time.perf_counter()
    out = es(problem, meta, batch)
    _sync(device)
    return time.perf_counter() - t0, out


def _measure(variants: dict, problem, meta, batch, device: str, repeats: int):
    """Median seconds of one estimate per variant. The repeats are interleaved (round-robin
    over the variants), so load from other processes on a shared machine hits all alike."""
    outs = {
        lbl: _once(es, problem, meta, batch, device)[1] for lbl, es in variants.items()
    }  # warm-up
    times = {lbl: [] for lbl in variants}
    for _ in range(repeats):
        for lbl, es in variants.items():
            times[lbl].append(_once(es, problem, meta, batch, device)[0])
    peaks = {}
    if device == "cuda":  # separately, one variant at a time
        for lbl, es in variants.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _once(es, problem, meta, batch, device)
            peaks[lbl] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {lbl: statistics.median(ts) for lbl, ts in times.items()}, peaks, outs


def main() -> None:
    from metaloss.hypergrad.es import EvolutionStrategies

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--only", default=None, help="comma-separated config names")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(",")) if args.only else None
    results = {}
    for name, task, t, k, p in CONFIGS:
        if only and name not in only:
            continue
        problem, meta, batch, _ = setup(task, t, k, args.device)
        variants = {"loop": dict(vectorize=False), "vmap": dict(), f"vmap_chunk{p}": dict(chunk=p)}
        variants = {
            lbl: EvolutionStrategies(population=p, sigma=0.05, **kw) for lbl, kw in variants.items()
        }
        secs, peaks, outs = _measure(variants, problem, meta, batch, args.device, args.repeats)
        res, ref = {}, None
        for label in variants:
            flat = torch.cat([outs[label].grads[n].flatten() for n in sorted(outs[label].grads)])
            ref = flat if ref is None else ref
            dev = (flat - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
            res[label] = {
                "seconds": secs[label],
                "peak_mib": peaks.get(label),
                "rel_dev_from_loop": dev,
            }
            mem = "" if label not in peaks else f"  peak {peaks[label]:8.1f} MiB"
            print(
                f"{name:30s} {label:12s} {secs[label] * 1e3:9.1f} ms{mem}  "
                f"max|Δĝ|/max|ĝ| vs loop {dev:.1e}",
                flush=True,
            )
        loop = res["loop"]["seconds"]
        results[name] = {
            "speedup_vmap_vs_loop": loop / res["vmap"]["seconds"],
            f"speedup_vmap_chunk{p}_vs_loop": loop / res[f"vmap_chunk{p}"]["seconds"],
            "seconds": {lbl: r["seconds"] for lbl, r in res.items()},
            "max_rel_dev_from_loop": max(r["rel_dev_from_loop"] for r in res.values()),
        }
        if args.device == "cuda":
            results[name]["peak_mib"] = {lbl: r["peak_mib"] for lbl, r in res.items()}
    print(
        json.dumps(
            {
                "device": args.device,
                "threads": torch.get_num_threads(),
                "repeats": args.repeats,
                "ratios": results,
            }
        )
    )


if __name__ == "__main__":
    main()
