"""Wall time of the study under a protocol, and what each stage costs beyond its own work.

Runs `compose protocol=P` + `dvc repro` in a fresh `git clone` of this checkout (the checkout's params.yaml,
cells.yaml, results/ and reports/ are never touched), with the model and texts already in the flap-exp cache
(warm), then reads every stage's own clock from results/usage/ (written by the stage around its work) and
prints: stages run, wall time, the stages' own time, and the overhead per stage (process start, imports, DVC's
bookkeeping) = (wall - own) / stages; the same in CPU seconds (dvc's process tree against the stages' own CPU
time), which other work on a shared machine does not inflate the way it inflates wall time.

    .venv/bin/python bench/bench_smoke.py                      # the smoke protocol (minutes)
    .venv/bin/python bench/bench_smoke.py --protocols smoke,quick   # and the whole quick study (about an hour)
    .venv/bin/python bench/bench_smoke.py --cold               # every stage a fresh interpreter (make run WARM=0)

Stages start warm by default, as under `make run` (flap_exp.pipeline.running.warm_client: forked from a server that
imported the library once). A warm stage's CPU time is not a child of this process, so the CPU columns are
printed for --cold only.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flap_exp.pipeline.running.warm_client import install, stop_servers

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, warm: Path | None = None) -> subprocess.CompletedProcess:
    """`cmd` in `cwd` with the venv first on PATH; `warm`: with warm stages (the shim folder first on PATH, the
    servers' sockets beside it)."""
    path = f"{warm}{os.pathsep}" if warm else ""
    env = {**os.environ, "PATH": f"{path}{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(cwd / "src")}
    if warm:
        env["FLAP_WARM_DIR"] = str(warm.parent / "sock")
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p


def measure(protocol: str, workdir: Path, warm: bool) -> dict:
    clone = workdir / protocol
    run(["git", "clone", "-q", str(ROOT), str(clone)], workdir)
    # what the Makefile passes as FLAP_EXP_WIKITEXT2; the clone has no ../shared beside it
    wikitext2 = ROOT.parent / "shared" / "data" / "wikitext-2-raw"
    if wikitext2.is_dir():
        os.environ.setdefault("FLAP_EXP_WIKITEXT2", str(wikitext2))
    # the experiment `make run PROTOCOL=P` picks (Makefile: smoke -> the smoke experiment, else the study)
    experiment = "smoke" if protocol == "smoke" else "study"
    run([sys.executable, "-m", "flap_exp.pipeline.study.compose", f"protocol={protocol}",
         f"experiment={experiment}"], clone)
    load_before = round(os.getloadavg()[0], 2)  # other work on the machine inflates wall times, not CPU times
    # the clone starts without results/: every stage runs (the run-cache is the clone's own, empty)
    shim = install(workdir / "warm" / "bin") if warm else None  # the Makefile's WARM_SHIM
    start, cpu0 = time.monotonic(), children_cpu()
    try:
        p = run([str(VENV_BIN / "python"), "-m", "flap_exp.pipeline.running.fast_lock", "repro"], clone,
                shim.parent if shim else None)  # as make run
    finally:
        stop_servers(workdir / "warm" / "sock")
    wall, cpu = time.monotonic() - start, children_cpu() - cpu0
    ran = re.findall(r"Running stage '([^']+)'", p.stdout)
    per_stage = {f.stem: json.loads(f.read_text()) for f in (clone / "results" / "usage").glob("*.json")}
    usage = list(per_stage.values())
    own, own_cpu = sum(u["seconds"] for u in usage), sum(u["cpu_seconds"] for u in usage)
    # before a stage's own clock: the interpreter's start and the stage's imports (torch, transformers)
    startup = sum(u.get("startup_seconds") or 0.0 for u in usage)
    n = max(len(ran), 1)
    return {"protocol": protocol, "warm": warm, "stages": len(ran), "wall_s": round(wall, 1), "own_s": round(own, 1),
            "overhead_per_stage_s": round((wall - own) / n, 2), "usage_files": len(usage),
            "startup_per_stage_s": round(startup / n, 2), "dvc_per_stage_s": round((wall - own - startup) / n, 2),
            "cpu_s": round(cpu, 1), "own_cpu_s": round(own_cpu, 1),
            "overhead_cpu_per_stage_s": round((cpu - own_cpu) / n, 2), "load_before": load_before,
            "per_stage": per_stage}


def children_cpu() -> float:
    """User + system CPU seconds of every finished child process (dvc and the stages it ran and waited for)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocols", default="smoke", help="comma-separated: smoke, quick, paper")
    ap.add_argument("--cold", action="store_true", help="every stage a fresh interpreter (make run WARM=0)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_smoke-") as tmp:
        for protocol in a.protocols.split(","):
            rows.append(measure(protocol.strip(), Path(tmp), not a.cold))
            r = rows[-1]
            cpu = (f"CPU {r['cpu_s']:.1f} s, own {r['own_cpu_s']:.1f} s, overhead {r['overhead_cpu_per_stage_s']:.2f} "
                   "CPU s per stage; " if a.cold else "")
            print(f"{r['protocol']:<6} {'warm' if r['warm'] else 'cold'} {r['stages']:>4} stages  wall "
                  f"{r['wall_s']:>7.1f} s  own {r['own_s']:>7.1f} s  overhead {r['overhead_per_stage_s']:.2f} s "
                  f"per stage (wall); {cpu}load {r['load_before']}\n       of the overhead per stage: "
                  f"{r['startup_per_stage_s']:.2f} s "
                  f"interpreter start and imports, {r['dvc_per_stage_s']:.2f} s DVC ({r['usage_files']} stages "
                  "recorded their clocks)", flush=True)
            shutil.rmtree(Path(tmp) / r["protocol"], ignore_errors=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
