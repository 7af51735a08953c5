"""Integrations: model patching, PEFT interop, the Trainer callback (``integrations.trainer``), checkpoints."""

from .checkpoint import export_peft, import_peft, load_adalora, save_adalora
from .inject import inject_adalora
from .peft_interop import accelerate_peft

__all__ = ["accelerate_peft", "export_peft", "import_peft", "inject_adalora", "load_adalora", "save_adalora"]
