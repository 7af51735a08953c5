"""Run in a subprocess by ``test_peft_rounding.py`` (the CPU kernels' instruction set is chosen once per process,
from ``ADALORA_KERNELS_CPU_ISA``): PEFT's mixed-adapter test model (its ``tests/test_mixed.py``: ``SimpleNet``, an
AdaLoRA adapter with ``init_lora_weights=False`` on either layer or both, input ``arange(90)``), plain and after
``accelerate_peft`` with each ``numerics``, against an fp64 copy. Prints one JSON object:
``{numerics: {"ratio_to_tol": max |ours - PEFT| / (1e-5 + 1e-5 |PEFT|), "equal": all outputs bitwise equal,
"err": [our error vs fp64, per case], "peft_err": [PEFT's, per case]}}``."""

import copy
import json
import sys

import peft
import torch
from torch import nn

import adalora_kernels as ak


class SimpleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 16)

    def forward(self, x):
        dtype = next(self.parameters()).dtype
        return self.lin1(self.relu(self.lin0(x.to(dtype))))


def main(seeds: int) -> None:
    x = torch.arange(90).reshape(9, 10)
    out = {n: {"ratio_to_tol": 0.0, "equal": True, "err": [], "peft_err": []} for n in ("peft", "fused")}
    for targets in (["lin0"], ["lin1"], ["lin0", "lin1"]):
        for seed in range(seeds):
            torch.manual_seed(0)
            base = SimpleNet().eval()
            torch.manual_seed(seed)
            cfg = peft.AdaLoraConfig(target_modules=targets, init_lora_weights=False, total_step=1)
            plain = peft.get_peft_model(base, cfg).eval()
            with torch.no_grad():
                ref = plain(x)
                exact = copy.deepcopy(plain).double()(x)
            for numerics, row in out.items():
                fast = ak.accelerate_peft(copy.deepcopy(plain), numerics=numerics)
                got = fast(x)  # grad mode on, as in PEFT's test
                tol = 1e-5 + 1e-5 * ref.abs()
                row["ratio_to_tol"] = max(row["ratio_to_tol"], ((got - ref).abs() / tol).max().item())
                row["equal"] &= torch.equal(got, ref)
                row["err"].append((got.double() - exact).abs().max().item())
                row["peft_err"].append((ref.double() - exact).abs().max().item())
    print(json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]))
