"""PEFT's own test suite as the judge of ``accelerate_peft``.

Fetches the source distribution of the installed PEFT version once (into ``$ADALORA_KERNELS_CACHE`` or
``~/.cache/adalora_kernels``; nothing of it enters this repository), makes a virtual environment beside it that
sees this one's packages and adds what PEFT's tests import (diffusers, datasets, parameterized, scipy, pyyaml),
then runs PEFT's offline tests that involve AdaLoRA: plain, then with every model that ``get_peft_model`` or
``PeftModel.from_pretrained`` creates passed through ``accelerate_peft`` (``scripts/peft_suite_plugin.py``), once
with the CPU kernels' widest instruction set and once forced to each narrower one (AVX2, baseline; see
``ADALORA_KERNELS_CPU_ISA``), so an AVX-512 machine also judges what an AVX2 machine runs. Prints the counts of
every run and how many tests ran the fused op; exits 1 when a test passes plain and fails in an accelerated run.

The suite's venv is made once per base interpreter and sees the calling environment's packages through a
``.pth`` file rewritten on every run, so it follows whichever environment runs the suite.

    python scripts/peft_suite.py [--keep-going] [-k EXPR] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import site
import subprocess
import sys
import tarfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# PEFT's test modules that exercise AdaLoRA without the hub (its other AdaLoRA tests load hub models: their first
# call would wait out network retries, and they fail offline in both runs alike)
FILES = ["test_custom_models.py", "test_config.py", "test_initialization.py", "test_mixed.py", "test_other.py",
         "test_helpers.py", "test_torch_compile.py"]  # fmt: skip
SELECT = "adalora or AdaLora or ADALORA"
SUITE_DEPS = ["diffusers", "datasets", "parameterized", "scipy", "pyyaml"]
# offline, and a hub address that refuses at once should a test go online anyway
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # fmt: skip


def _cache() -> Path:
    return Path(os.environ.get("ADALORA_KERNELS_CACHE") or Path.home() / ".cache" / "adalora_kernels")


def fetch_tests(peft_version: str) -> Path:
    """PEFT's source tree of ``peft_version`` (its tests as a package), unpacked once."""
    root = _cache() / f"peft-{peft_version}-src"
    if (root / ".complete").exists():
        return root
    downloads = _cache() / "sdists"
    downloads.mkdir(parents=True, exist_ok=True)
    sdist = downloads / f"peft-{peft_version}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--isolated", "--no-deps", "--no-binary", ":all:",
                        "-d", str(downloads), f"peft=={peft_version}"], check=True)  # fmt: skip
    with tarfile.open(sdist) as tar:
        tar.extractall(root.parent / f".peft-{peft_version}-partial", filter="data")
    partial = root.parent / f".peft-{peft_version}-partial" / f"peft-{peft_version}"
    (partial / "tests" / "__init__.py").touch()  # its modules import each other relatively
    if root.exists():
        import shutil

        shutil.rmtree(root)
    partial.rename(root)
    (root / ".complete").touch()
    return root


def _purelib(python: Path) -> Path | None:
    """The site-packages folder of ``python``, or ``None`` where it does not run (its base interpreter gone)."""
    done = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True)  # fmt: skip
    return Path(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip() else None


def suite_python() -> str:
    """A venv that sees this environment's packages (torch, peft, adalora_kernels) plus PEFT's test imports: one
    per base interpreter (and its version), pointed at the calling environment anew on every run."""
    key = hashlib.sha256(f"{sys.base_prefix}|{sys.version}".encode()).hexdigest()[:12]
    venv = _cache() / f"peft-suite-venv-{key}"
    python = venv / "bin" / "python"
    lib = _purelib(python) if (venv / ".complete").exists() else None
    if lib is None:
        if venv.exists():
            import shutil

            shutil.rmtree(venv)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        lib = _purelib(python)
        if lib is None:
            raise RuntimeError(f"the suite's venv {venv} does not run")
    # the calling environment's packages, where it is itself a venv, before the base interpreter's: rewritten on
    # every run, so a later run from another environment never reads a deleted one
    parents = [p for p in site.getsitepackages() if not p.startswith(sys.base_prefix)]
    (lib / "adalora_parent_env.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in parents))
    if not (venv / ".complete").exists():
        subprocess.run([str(python), "-m", "pip", "install", "-q", *SUITE_DEPS], check=True)
        (venv / ".complete").touch()
    return str(python)


# (label, accelerated, ADALORA_KERNELS_CPU_ISA or None for the widest the CPU runs)
RUNS = [("plain", False, None), ("accelerated", True, None), ("accelerated[avx2]", True, "avx2"),
        ("accelerated[baseline]", True, "baseline")]  # fmt: skip


def run(python: str, src: Path, accelerate: bool, isa: str | None, select: str, report: Path) -> float:
    env = {**os.environ, **OFFLINE, "ADALORA_SUITE_ACCELERATE": "1" if accelerate else "0",
           "ADALORA_SUITE_REPORT": str(report), "PYTHONPATH": f"{ROOT / 'scripts'}{os.pathsep}{ROOT}"}  # fmt: skip
    env.pop("TRITON_INTERPRET", None)
    if isa is not None:  # (None: the caller's choice, or the widest the CPU runs)
        env["ADALORA_KERNELS_CPU_ISA"] = isa
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "peft_suite_plugin", "-o", "addopts=",
           "-k", select, *(f"tests/{f}" for f in FILES)]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, cwd=src, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="select", default=SELECT, help=f"PEFT's tests to run (default: {SELECT!r})")
    parser.add_argument("--json", type=Path, help="write both runs' outcomes here")
    args = parser.parse_args(argv)
    peft_version = version("peft")
    src = fetch_tests(peft_version)
    python = suite_python()
    outcomes = {}
    for label, accelerate, isa in RUNS:
        report = _cache() / f"peft-suite-{label}.json"
        report.unlink(missing_ok=True)
        seconds = run(python, src, accelerate, isa, args.select, report)
        if not report.exists():
            print(f"PEFT suite ({label}) wrote no report: it did not run")
            return 1
        outcomes[label] = json.loads(report.read_text())["tests"]
        print(f"{label:21s} run: {seconds:.0f} s")
    plain = outcomes["plain"]

    def count(results, outcome):
        return sum(r["outcome"] == outcome for r in results.values())

    print(f"PEFT {peft_version}'s tests involving AdaLoRA ({len(plain)} collected, offline):")
    for label, results in outcomes.items():
        # (not in pytest's "N passed, N failed" shape: CI reads that shape as the test run's own summary)
        print(f"  {label:21s} passed {count(results, 'passed')} / failed {count(results, 'failed')} / "
              f"skipped {count(results, 'skipped')}")  # fmt: skip
    fast = outcomes["accelerated"]
    ran_fused = sorted(n for n, r in fast.items() if r["fused_calls"] > 0)
    passed_fused = [n for n in ran_fused if fast[n]["outcome"] == "passed"]
    print(f"  fused op ran in {len(ran_fused)} tests ({len(passed_fused)} of them passed), "
          f"{sum(r['fused_calls'] for r in fast.values())} fused layer calls in all")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps({"peft": peft_version, **outcomes}, indent=0))
    bad = 0
    for label, results in outcomes.items():
        if label == "plain":
            continue
        regressions = sorted(n for n, r in plain.items() if r["outcome"] == "passed"
                             and results.get(n, {}).get("outcome") not in ("passed", "skipped"))  # fmt: skip
        missing = sorted(set(plain) - set(results))
        for name in regressions:
            print(f"FAIL {label} only: {name}")
        for name in missing:
            print(f"FAIL not run {label}: {name}")
        print(f"  {label}: {len(plain) - len(regressions) - len(missing)} tests with the same outcome as plain, "
              f"{len(regressions) + len(missing)} that pass plain and not here")  # fmt: skip
        bad += len(regressions) + len(missing)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
