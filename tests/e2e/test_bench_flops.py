"""bench/flops.py --quick (issue 34, part 6): the FLOP-count bench runs stage 2's own steps on the micro
UNet, prints one table per recipe and writes its raw counts. No count is asserted (they follow the code);
what is checked is what must hold whatever they are: the printed phases add up to the printed iteration,
every count doubles from batch 1 to batch 2 and the step-count extension's slope is one UNet forward
(within 1 %), the K = 4 distribution-matching step costs more than the K = 1 one, and the tables agree with
the raw counts they were scaled from (recomputed here) and the hours with the stated peak."""

import json
import re

from bench_output import NUM, rounding, within_rounding
from helpers import run_cli

RECIPES = ("spec", "dm_k1", "dm_k4")
ROW = re.compile(rf"^  (?P<name>\S.*?) +(?P<value>{NUM})(?: +(?P<share>{NUM})%)?$")


def tables(out: str) -> dict:
    """{recipe: {"per_step": {row: text}, "phases": {row: text}, "iteration": text, "checks": {k: v}}}."""
    found = {}
    for block in re.split(r"^(?=recipe )", out, flags=re.M)[1:]:
        name = re.match(r"recipe (\w+): ", block).group(1)
        part, t = None, {"per_step": {}, "phases": {}, "checks": {}}
        for line in block.splitlines()[1:]:
            if line.startswith("  per step "):
                part = "per_step"
            elif line.startswith("  phase of one iteration "):
                part, t["unit"] = "phases", line.split()[-2]
            elif line.startswith("  check "):
                key, value = line[len("  check ") :].rsplit(": ", 1)
                t["checks"][key] = float(value)
            elif (m := ROW.match(line)) and part:
                if m.group("name") == "iteration (sum of the phases)":
                    t["iteration"] = m.group("value")
                else:
                    t[part][m.group("name")] = m.group("value")
        found[name] = t
    return found


def raw_count(record: dict, what: str, **point) -> int:
    rows = [r for r in record["raw"] if r["what"] == what and all(r.get(k) == v for k, v in point.items())]
    assert rows, (what, point)
    return rows[-1]["flops"]


def check_against_raw(record: dict) -> None:
    """The per-step figures from the batch-1 counts: x batch, and the spec's extended along its steps."""
    spec = record["recipes"]["spec"]
    b, steps = spec["run"]["batch"], spec["run"]["steps"]
    one = raw_count(record, "g_step", recipe="spec", batch=1, steps=2)
    four = raw_count(record, "g_step", recipe="spec", batch=1, steps=4)
    expected = b * (one + (steps - 2) * (four - one) / 2)
    assert abs(spec["per_step"][f"generator step (batch {b})"] - expected) <= 1e-9 * expected
    for name in ("dm_k1", "dm_k4"):
        r = record["recipes"][name]
        k, b = r["run"]["steps"], r["run"]["batch"]
        whole = raw_count(record, "g_step", recipe=name, batch=1, steps=k)
        assert r["per_step"][f"generator step (batch {b})"] == whole * b
        assert r["phases"]["fine-tune"] == r["run"]["g_steps"] * whole * b


def check_linear_in_batch(record: dict) -> None:
    """Every raw count made at two sizes (batch, D batch or fakes) s and 2s doubles, within 1 %."""
    by_point = {}
    for r in record["raw"]:
        size = next(k for k in ("batch", "d_batch", "n") if k in r)
        rest = tuple(sorted((k, v) for k, v in r.items() if k not in ("flops", "pre_step", size)))
        by_point.setdefault((r["what"], rest), {})[r[size]] = r["flops"]
    pairs = [
        (what, by_size[2 * s] / f)
        for (what, _), by_size in by_point.items()
        for s, f in by_size.items()
        if 2 * s in by_size
    ]
    assert {"g_step", "d_step", "generation", "unet_forward"} <= {what for what, _ in pairs}, pairs
    assert all(abs(ratio - 2) <= 0.02 for _, ratio in pairs), pairs


def test_flops_quick_tables_add_up(tmp_path):
    out_file = tmp_path / "flops.json"
    proc = run_cli("bench/flops.py", "--quick", "--out", str(out_file), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(
        r"an estimate \(counted on CPU; no GPU time was measured\): micro \([\d.]+M parameters\) at 4x8x8",
        out,
    ), out
    found = tables(out)
    assert sorted(found) == sorted(RECIPES), out
    for name, t in found.items():
        assert t["unit"] == "TFLOP" and t["iteration"], (name, t)
        assert {"generation", "fine-tune"} <= set(t["phases"]), (name, t)
        total = sum(float(v) for v in t["phases"].values())
        slack = sum(rounding(v) for v in t["phases"].values())
        assert within_rounding(t["iteration"], total - slack, total + slack), (name, t)
        assert t["checks"], (name, out)
        for key, value in t["checks"].items():
            target = 2.0 if "batch 2 / batch 1" in key else 1.0
            assert abs(value / target - 1) <= 0.01, (name, key, value)
    assert any("slope" in k for k in found["spec"]["checks"]), found["spec"]
    k1, k4 = (float(found[n]["per_step"]["generator step (batch 32)"]) for n in ("dm_k1", "dm_k4"))
    assert k4 > k1 > 0, (k1, k4)

    record = json.loads(out_file.read_text())
    assert "no GPU time was measured" in record["note"]
    for name in RECIPES:
        r = record["recipes"][name]
        assert abs(r["iteration"] - sum(r["phases"].values())) <= 1e-9 * r["iteration"], r
        for label, hours in r["hours"].items():
            utilisation = float(label.rstrip("%")) / 100
            assert abs(hours * utilisation * record["peak_flops"] * 3600 / r["iteration"] - 1) < 1e-9, r
        printed = float(found[name]["iteration"]) * 1e12
        assert abs(printed - r["iteration"]) <= rounding(found[name]["iteration"]) * 1e12, (printed, r)
    check_against_raw(record)
    check_linear_in_batch(record)
