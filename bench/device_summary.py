"""Short summary of a device_check.sh run: test counts, the issue's loss targets, a compact grid.

    python bench/device_summary.py OUT_DIR

Reads OUT_DIR/junit_*.xml, OUT_DIR/loss_kernel.csv (and engine_sweep.csv when present); prints
plain text meant to be the last thing the device command shows.
"""

from __future__ import annotations

import csv
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# the GPU targets of issue 12 (bf16, fwd+bwd, TFLOP/s counted at 6 B^2 D)
TARGET_SMALL = (1024, 1536)  # <= 40 us and >= 10x torch.compile
TARGETS_LARGE = [(16384, 1536), (65536, 1536)]  # >= 1.3x the better of eager and compile, >= 700 TFLOP/s
TARGET_HUGE = (1_048_576, 1536)  # <= 15 s on one H100


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_lines(out: Path) -> list[str]:
    lines = []
    for xml in sorted(out.glob("junit_*.xml")):
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError:
            lines.append(f"tests {xml.stem[6:]}: junit file unreadable (run cut short?)")
            continue
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        if suite is None:
            continue
        total, fail, err, skip = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        verdict = "PASS" if fail == err == 0 and total > 0 else "FAIL"
        passed = total - fail - err - skip
        lines.append(
            f"tests {xml.stem[6:]:<22} {verdict}: {passed} passed, {fail} failed, {err} errors, "
            f"{skip} skipped ({float(suite.get('time', 0)):.0f} s)"
        )
    return lines or ["tests: no junit results found"]


def _key(r: dict) -> tuple:
    return r["provider"], r["mode"], int(r["B"]), int(r["D"])


def _cell(rows, provider, mode, B, D, ok_only=True):
    """The last row of this cell (ok rows only unless ok_only is False)."""
    found = [r for r in rows if _key(r) == (provider, mode, B, D) and (r["status"] == "ok" or not ok_only)]
    return found[-1] if found else None


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def target_lines(rows: list[dict]) -> list[str]:
    out = []
    B, D = TARGET_SMALL
    fused, compiled = _cell(rows, "fused", "fwd+bwd", B, D), _cell(rows, "compile", "fwd+bwd", B, D)
    if fused:
        us = float(fused["p50_ms"]) * 1e3
        line = f"B={B} D={D} fwd+bwd: fused {us:.1f} us (target <= 40: {_verdict(us <= 40)})"
        line += f", {fused.get('launches', '?')} launches"
        if compiled:
            speed = float(compiled["p50_ms"]) / float(fused["p50_ms"])
            line += f"; {speed:.1f}x torch.compile (target >= 10: {_verdict(speed >= 10)})"
        out.append(line)
    else:
        out.append(f"B={B} D={D} fwd+bwd: no fused result")
    for B, D in TARGETS_LARGE:
        fused = _cell(rows, "fused", "fwd+bwd", B, D)
        if not fused:
            out.append(f"B={B} D={D} fwd+bwd: no fused result")
            continue
        tf = float(fused["tflops"])
        line = f"B={B} D={D} fwd+bwd: fused {tf:.0f} TFLOP/s (target >= 700: {_verdict(tf >= 700)})"
        others = [r for r in (_cell(rows, p, "fwd+bwd", B, D) for p in ("eager", "compile")) if r]
        if others:
            best = min(float(r["p50_ms"]) for r in others)
            speed = best / float(fused["p50_ms"])
            line += f"; {speed:.2f}x the better of eager/compile (target >= 1.3: {_verdict(speed >= 1.3)})"
        out.append(line)
    B, D = TARGET_HUGE
    fused = _cell(rows, "fused", "fwd+bwd", B, D)
    if fused:
        s = float(fused["p50_ms"]) / 1e3
        out.append(
            f"B={B} D={D} fwd+bwd: fused {s:.1f} s (target <= 15: {_verdict(s <= 15)}), "
            f"{float(fused['tflops']):.0f} TFLOP/s, peak {float(fused['peak_mb']) / 1024:.1f} GiB"
        )
    else:
        bad = [r["status"] for r in rows if int(r["B"]) == B]
        out.append(f"B={B} D={D} fwd+bwd: no fused result {bad[:1]}")
    return out


def grid_lines(rows: list[dict]) -> list[str]:
    names = ("fused", "fused-v1", "torch", "eager", "compile", "inf-cl")
    providers = [p for p in names if any(r["provider"] == p for r in rows)]
    keys = sorted({(r["mode"], int(r["D"]), int(r["B"])) for r in rows})
    head = f"{'mode':<7} {'D':>5} {'B':>8} " + " ".join(f"{p + ' ms':>12}" for p in providers)
    lines = [head]
    for mode, D, B in keys:
        cells = []
        for p in providers:
            r = _cell(rows, p, mode, B, D, ok_only=False)
            cells.append("" if r is None else r["p50_ms"] if r["status"] == "ok" else r["status"][:12])
        lines.append(f"{mode:<7} {D:>5} {B:>8} " + " ".join(f"{c:>12}" for c in cells))
    return lines


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else "bench/out")
    rows = _read_csv(out / "loss_kernel.csv")
    print("=" * 100)
    print(f"device check summary ({out})")
    phases = out / "phases.txt"
    if phases.exists():
        print("phases: " + "; ".join(line.strip() for line in phases.read_text().splitlines()))
    for line in test_lines(out):
        print(line)
    if rows:
        print(f"device: {rows[-1]['device']}, dtype {rows[-1]['dtype']}, commit {rows[-1]['commit']}")
        for line in target_lines(rows):
            print(line)
        for line in grid_lines(rows):
            print(line)
    else:
        print("no benchmark rows")
    sweep = _read_csv(out / "engine_sweep.csv")
    if sweep:
        print(
            "engine sweep (p50 ms): "
            + "; ".join(f"{r['case']} B={r['B']}: {r['p50_ms']}" for r in sweep if r["p50_ms"])
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
