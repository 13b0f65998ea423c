"""Markdown tables from bench/gpu.sh's JSON lines (python bench/gpu_table.py RESULTS.jsonl)."""

import json
import sys


def gib(v):
    return "" if v is None else f"{v:.2f}"


def main(path):
    rows = [json.loads(line) for line in open(path) if line.strip().startswith("{")]
    gen = [r for r in rows if r.get("part") == "gen"]
    if gen:
        base = next(
            (
                r["samples_per_s"]
                for r in gen
                if r["precision"] == "no" and r["tf32"] and not r["channels_last"] and not r["compile"]
            ),
            None,
        )
        print(
            "| precision | TF32 | batch | channels-last | compile | fakes measured | s for 5000 x 100 steps "
            "| fakes/s | vs fp32+TF32 | peak GiB |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in gen:
            ratio = f"{r['samples_per_s'] / base:.2f}x" if base else ""
            scaled = "" if r["n"] == 5000 else " (scaled)"
            print(
                f"| {r['precision']} | {r['tf32']} | {r['batch']} | {r['channels_last']} | "
                f"{r['compile']} | {r['n']} "
                f"| {r['seconds_for_5000']}{scaled} | {r['samples_per_s']} | {ratio} | {gib(r['peak_gib'])} |"
            )
        print()
    train = [r for r in rows if str(r.get("part", "")).startswith("train_")]
    if train:
        print("| phase | precision | TF32 | channels-last | batch | steps/s | peak GiB |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in train:
            print(
                f"| {r['part'][6:]} | {r['precision']} | {r['tf32']} | "
                f"{r.get('channels_last', False)} | {r['batch']} "
                f"| {r['steps_per_s']} | {gib(r['peak_gib'])} |"
            )
        print()
    for r in rows:
        if r.get("part") == "repro":
            print(
                f"repro ({r['precision']}, deterministic={r['deterministic']}): generation bit-identical "
                f"{r['generation_bitwise_equal']} (max diff {r['generation_max_abs_diff']:.3g}); "
                f"3 training steps "
                f"bit-identical {r['training_bitwise_equal']} (max diff {r['training_max_abs_diff']:.3g})"
            )
    if rows:
        print(f"\ndevice: {rows[0].get('device')}, date: {rows[0].get('date')}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/gpu_results.jsonl")
