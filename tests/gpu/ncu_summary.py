#!/usr/bin/env python3
"""Sums an ncu CSV log (`ncu --metrics gpu__time_duration.sum --csv --log-file F PROGRAM`) per kernel name and prints
the kernels that take the most GPU time, with counts and shares: where a step's time goes, without a timeline.

  python3 tests/gpu/ncu_summary.py F [--top 40]
"""
import argparse
import collections
import csv


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv_log")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    with open(args.csv_log, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]  # ncu's own "==PROF==" lines are not CSV
    total_ns = collections.Counter()
    count = collections.Counter()
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        scale = {"nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9}.get(row.get("Metric Unit", "nsecond"), 1)
        name = row["Kernel Name"].split("(")[0][:110]
        total_ns[name] += value * scale
        count[name] += 1
    grand = sum(total_ns.values())
    print(f"{sum(count.values())} kernel launches, {grand / 1e6:.1f} ms of kernel time")
    for name, ns in total_ns.most_common(args.top):
        print(f"{ns / 1e6:9.2f} ms {100 * ns / grand:5.1f}% {count[name]:6d}x  {name}")


if __name__ == "__main__":
    main()
