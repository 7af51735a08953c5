"""Integrations: model patching, PEFT interop, the Trainer callback (``integrations.trainer``), checkpoints."""

from .checkpoint import export_peft, import_peft, load_adalora, save_adalora
from .inject import inject_adalora
from .lora_export import export_lora
from .peft_interop import accelerate_peft
from .report import rank_report

__all__ = [
    "accelerate_peft",
    "export_lora",
    "export_peft",
    "import_peft",
    "inject_adalora",
    "load_adalora",
    "rank_report",
    "save_adalora",
]
