"""pytest plugin for PEFT's own test suite (``scripts/peft_suite.py``): with ``ADALORA_SUITE_ACCELERATE=1`` every
AdaLoRA model that ``peft.get_peft_model`` or ``PeftModel.from_pretrained`` creates is passed through
``adalora_kernels.accelerate_peft``; in both runs each test's outcome, and how often the fused op ran in it,
go to the JSON file ``ADALORA_SUITE_REPORT``. Nothing of PEFT's is copied: it wraps PEFT's entry points."""

from __future__ import annotations

import functools
import json
import os
import warnings

import pytest

ACCELERATE = os.environ.get("ADALORA_SUITE_ACCELERATE") == "1"
_results: dict[str, dict] = {}
_fused_calls = [0]


def _accelerated(model):
    from peft import PeftModel
    from peft.tuners.adalora import AdaLoraModel

    from adalora_kernels import accelerate_peft

    if isinstance(model, PeftModel) and isinstance(getattr(model, "base_model", None), AdaLoraModel):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's tests count warnings; ours about unfused layers is not theirs
            accelerate_peft(model)
    return model


def _wrap(fn):
    @functools.wraps(fn)
    def make(*args, **kwargs):
        return _accelerated(fn(*args, **kwargs))

    return make


def pytest_configure(config):
    if not ACCELERATE:
        return
    import peft
    import peft.mapping_func
    from peft import PeftModel

    from adalora_kernels.integrations import peft_classes

    peft.get_peft_model = peft.mapping_func.get_peft_model = _wrap(peft.mapping_func.get_peft_model)
    PeftModel.from_pretrained = classmethod(_wrap(PeftModel.from_pretrained.__func__))
    for name in ("adalora_linear", "adalora_linear_peft_order"):  # the fused op, or its PEFT-rounded forward
        setattr(peft_classes, name, _counted(getattr(peft_classes, name)))


def _counted(fn):
    @functools.wraps(fn)
    def counted(*args, **kwargs):
        _fused_calls[0] += 1
        return fn(*args, **kwargs)

    return counted


def pytest_runtest_setup(item):
    _fused_calls[0] = 0


def pytest_runtest_logreport(report):
    entry = _results.setdefault(report.nodeid, {"outcome": "passed", "fused_calls": 0})
    if report.failed:
        entry["outcome"] = "failed"
    elif report.skipped and entry["outcome"] != "failed":
        entry["outcome"] = "skipped"
    if report.when == "teardown":
        entry["fused_calls"] = _fused_calls[0]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("ADALORA_SUITE_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"accelerated": ACCELERATE, "tests": _results}, f, indent=0)
