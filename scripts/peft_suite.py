"""PEFT's own test suite as the judge of ``accelerate_peft``.

Fetches the source distribution of the installed PEFT version once (into ``$ADALORA_KERNELS_CACHE`` or
``~/.cache/adalora_kernels``; nothing of it enters this repository), makes a virtual environment beside it that
sees this one's packages and adds what PEFT's tests import (diffusers, datasets, parameterized, scipy, pyyaml),
then runs PEFT's offline tests that involve AdaLoRA twice: plain, and with every model that
``get_peft_model`` or ``PeftModel.from_pretrained`` creates passed through ``accelerate_peft``
(``scripts/peft_suite_plugin.py``). Prints plain-vs-accelerated counts and how many tests ran the fused op;
exits 1 when a test passes plain and fails accelerated.

    python scripts/peft_suite.py [--keep-going] [-k EXPR] [--json FILE]
"""

from __future__ import annotations

import argparse
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


def suite_python() -> str:
    """A venv that sees this environment's packages (torch, peft, adalora_kernels) plus PEFT's test imports."""
    venv = _cache() / "peft-suite-venv"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        # where this interpreter is itself a venv, its packages come before the base interpreter's there too
        parents = [p for p in site.getsitepackages() if not p.startswith(sys.base_prefix)]
        lib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in parents)
        (Path(lib) / "adalora_parent_env.pth").write_text(lines)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *SUITE_DEPS], check=True)
        (venv / ".complete").touch()
    return str(python)


def run(python: str, src: Path, accelerate: bool, select: str, report: Path) -> float:
    env = {**os.environ, **OFFLINE, "ADALORA_SUITE_ACCELERATE": "1" if accelerate else "0",
           "ADALORA_SUITE_REPORT": str(report), "PYTHONPATH": f"{ROOT / 'scripts'}{os.pathsep}{ROOT}"}  # fmt: skip
    env.pop("TRITON_INTERPRET", None)
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
    for accelerate in (False, True):
        report = _cache() / f"peft-suite-{'accelerated' if accelerate else 'plain'}.json"
        report.unlink(missing_ok=True)
        seconds = run(python, src, accelerate, args.select, report)
        if not report.exists():
            print(f"PEFT suite ({'accelerated' if accelerate else 'plain'}) wrote no report: it did not run")
            return 1
        outcomes[accelerate] = json.loads(report.read_text())["tests"]
        print(f"{'accelerated' if accelerate else 'plain':11s} run: {seconds:.0f} s")
    plain, fast = outcomes[False], outcomes[True]

    def count(results, outcome):
        return sum(r["outcome"] == outcome for r in results.values())

    print(f"PEFT {peft_version}'s tests involving AdaLoRA ({len(plain)} collected, offline):")
    for label, results in (("plain", plain), ("accelerated", fast)):
        # (not in pytest's "N passed, N failed" shape: CI reads that shape as the test run's own summary)
        print(f"  {label:11s} passed {count(results, 'passed')} / failed {count(results, 'failed')} / "
              f"skipped {count(results, 'skipped')}")  # fmt: skip
    ran_fused = sorted(n for n, r in fast.items() if r["fused_calls"] > 0)
    passed_fused = [n for n in ran_fused if fast[n]["outcome"] == "passed"]
    print(f"  fused op ran in {len(ran_fused)} tests ({len(passed_fused)} of them passed), "
          f"{sum(r['fused_calls'] for r in fast.values())} fused layer calls in all")  # fmt: skip
    regressions = sorted(n for n, r in plain.items() if r["outcome"] == "passed" and fast.get(n, {}).get("outcome")
                         not in ("passed", "skipped"))  # fmt: skip
    missing = sorted(set(plain) - set(fast))
    if args.json is not None:
        args.json.write_text(json.dumps({"peft": peft_version, "plain": plain, "accelerated": fast}, indent=0))
    for name in regressions:
        print(f"FAIL accelerated only: {name}")
    for name in missing:
        print(f"FAIL not run accelerated: {name}")
    print(f"  {len(plain) - len(regressions) - len(missing)} tests with the same outcome plain and accelerated, "
          f"{len(regressions) + len(missing)} that pass plain and not accelerated")  # fmt: skip
    return 1 if regressions or missing else 0


if __name__ == "__main__":
    sys.exit(main())
