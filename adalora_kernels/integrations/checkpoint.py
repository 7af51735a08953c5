"""Checkpoints of the adapters: our own format, and PEFT's adapter format (export and import).

Ours: ``adalora.safetensors`` (P, lam, Q, rank_mask per layer) + ``adalora_config.json`` (per-layer init_r,
lora_alpha, lora_dropout, the rank pattern). ``resize=True`` keeps only the unpruned ranks, for inference.
PEFT's: ``adapter_model.safetensors`` + ``adapter_config.json``, which plain ``PeftModel.from_pretrained``
loads offline (pruned ranks dropped and ``rank_pattern`` recorded, as PEFT's own ``save_pretrained`` does).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..modules import AdaLoRALinear
from ..modules.linear import check_adapter_args, is_conv1d, quantized_kind, unfusable_reason
from .inject import inject_adalora

CONFIG_NAME, WEIGHTS_NAME = "adalora_config.json", "adalora.safetensors"
PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _layers(model: nn.Module) -> dict[str, AdaLoRALinear]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, AdaLoRALinear)}
    if not layers:
        raise ValueError("model: no AdaLoRALinear layer found (use inject_adalora first)")
    return layers


def _uniform(layers: dict[str, AdaLoRALinear], attr: str):
    values = {getattr(m, attr) for m in layers.values()}
    if len(values) != 1:
        raise ValueError(f"export_peft: PEFT's config holds one {attr}, but the layers have {sorted(values)}")
    return values.pop()


class _Files:
    """Every file operation a save makes, in one place (the tests interrupt a save at each of them in turn)."""

    @staticmethod
    def write(path: Path, data: bytes) -> None:
        with open(path, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def replace(src: Path, dst: Path) -> None:
        os.replace(src, dst)

    @staticmethod
    def remove(path: Path) -> None:
        os.remove(path)


def _sync_folder(folder: Path) -> None:
    """Make the folder's renames durable (best effort: not every filesystem lets a folder be synced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _target_folder(path: str | Path) -> Iterator[Path]:
    """The folder a checkpoint goes into, made where missing; the folders made here are removed again when the
    save fails before its end. Every file of a save is written inside this folder (never beside it), so a
    symlink to another filesystem, a mount point or a read-only parent folder work as plain folders do."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"path: {folder} exists and is not a folder")
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for made in created:  # innermost first
            with contextlib.suppress(OSError):
                made.rmdir()
        raise


def _write_replacing(folder: Path, name: str, data: bytes) -> None:
    """``folder/name`` holds ``data`` or what it held before, never a part: a temporary file in the same folder,
    written and synced, then renamed over it (atomic on POSIX filesystems)."""
    tmp = folder / f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        _Files.write(tmp, data)
        _Files.replace(tmp, folder / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _commit(folder: Path, files: dict[str, bytes], config_name: str, config: bytes) -> None:
    """Write ``files`` (names that no earlier save of other content used) and then ``config``, the one file that
    says which of them make the checkpoint: until its rename the folder's config names the previous files, which
    stay untouched, and after it the new ones. Files the new config no longer needs are removed last."""
    written = []
    try:
        for name, data in files.items():
            existed = (folder / name).exists()
            _write_replacing(folder, name, data)
            if not existed:
                written.append(name)
        _write_replacing(folder, config_name, config)
    except BaseException:
        for name in written:  # the previous config does not name them
            with contextlib.suppress(OSError):
                os.remove(folder / name)
        raise
    _sync_folder(folder)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weights_file(folder: Path, config: dict) -> Path:
    """The weights file a config names (checkpoints before content-named weights: ``adalora.safetensors``)."""
    name = config.get("weights", WEIGHTS_NAME)
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
        raise ValueError(f"path: {folder / CONFIG_NAME} names no weights file of its folder ({name!r})")
    return folder / name


def save_adalora(model: nn.Module, path: str | Path, *, resize: bool = False) -> Path:
    """Write the adapters of ``model`` to the folder ``path``; ``resize`` drops pruned ranks.

    Atomic: the weights go to a file named by their digest (``adalora-<sha256>.safetensors``) beside the
    previous checkpoint's, then the config that names them replaces the previous config in one rename, then the
    previous weights are removed. A save interrupted at any point leaves the previous checkpoint loadable (or the
    new one, once the config is in place), never a mix; the config records the weights' digest too."""
    from safetensors.torch import save

    tensors, config = {}, {"format": "adalora_kernels", "version": 2, "resized": resize, "layers": {}}
    for name, m in _layers(model).items():
        keep = m.rank_mask if resize else torch.ones_like(m.rank_mask)
        tensors[f"{name}.P"] = m.P[:, keep].contiguous()
        tensors[f"{name}.lam"] = m.lam[keep].contiguous()
        tensors[f"{name}.Q"] = m.Q[keep].contiguous()
        tensors[f"{name}.rank_mask"] = m.rank_mask[keep].contiguous()
        config["layers"][name] = {
            "init_r": m.init_r, "lora_alpha": m.lora_alpha, "lora_dropout": m.lora_dropout,
            "rank_pattern": m.rank_mask.tolist(),
        }  # fmt: skip
    data = save({k: v.detach().cpu() for k, v in tensors.items()})
    digest = hashlib.sha256(data).hexdigest()
    weights = f"adalora-{digest[:16]}.safetensors"
    config["weights"], config["weights_sha256"] = weights, digest
    text = json.dumps(config, indent=1).encode()
    with _target_folder(path) as folder:
        _commit(folder, {weights: data}, CONFIG_NAME, text)
    for old in [*folder.glob("adalora-*.safetensors"), folder / WEIGHTS_NAME]:  # the previous checkpoint's
        if old.name != weights and old.exists():
            with contextlib.suppress(OSError):
                _Files.remove(old)
    return folder


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"path: {path.parent} has no {path.name} ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"path: {path} is not valid JSON ({exc}); the checkpoint is damaged") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"path: {path.parent} has no {path.name}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ValueError(
            f"path: {path} is not a readable safetensors file ({exc}); the checkpoint is damaged"
        ) from None


def _dims(module: nn.Module, name: str) -> tuple[int, int]:
    """(out, in) of a layer that is, or can take, an adapter."""
    if isinstance(module, AdaLoRALinear) or quantized_kind(module):
        return module.out_features, module.in_features
    if not isinstance(module, nn.Linear) and not is_conv1d(module):
        raise TypeError(
            f"{name}: is a {type(module).__name__}; only nn.Linear, transformers' Conv1D and bitsandbytes' "
            "Linear4bit and Linear8bitLt take an adapter"
        )
    reason = unfusable_reason(module)
    if reason:
        raise TypeError(f"{name}: {reason}; an adapter would replace that forward with F.linear of its weight")
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.weight.shape[1], module.weight.shape[0]


_SPEC_KEYS = ("init_r", "lora_alpha", "lora_dropout", "rank_pattern")


def _check_spec(name: str, spec, backend: str | None) -> None:
    """One layer's entry of a checkpoint config, checked before any layer changes (a damaged or hand-edited
    config fails here, naming the layer, not half-way through the load)."""
    if not isinstance(spec, dict):
        raise ValueError(f"{name}: the checkpoint's config entry is a {type(spec).__name__}, expected an object")
    missing = [k for k in _SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"{name}: the checkpoint's config entry lacks {missing}")
    try:
        check_adapter_args(spec["init_r"], spec["lora_alpha"], spec["lora_dropout"], backend)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: the checkpoint's config entry is invalid: {exc}") from None


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{name}: the checkpoint has this layer, the model has no module of that name") from None


def _expect(name: str, label: str, tensor: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if tensor is None:
        raise ValueError(f"{name}.{label}: missing from the checkpoint's weights")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name}.{label}: the checkpoint's shape {tuple(tensor.shape)} does not fit the layer {shape}")
    if label != "rank_mask" and not tensor.is_floating_point():
        raise TypeError(f"{name}.{label}: expected floating point, the checkpoint has {tensor.dtype}")


def load_adalora(model: nn.Module, path: str | Path, *, backend: str | None = None) -> list[str]:
    """Load adapters written by ``save_adalora`` into ``model``: layers that are still plain ``nn.Linear``/
    ``Conv1D`` get injected first; resized checkpoints resize the layers. Returns the layer names.

    All or nothing: every layer and tensor is checked against the model before the first one changes; an error
    names the layer and tensor that does not fit, and leaves the model as it was."""
    folder = Path(path)
    config = _read_json(folder / CONFIG_NAME, "an adalora_kernels checkpoint")
    if config.get("format") != "adalora_kernels" or not isinstance(config.get("layers"), dict):
        raise ValueError(f"path: {folder / CONFIG_NAME} is not an adalora_kernels checkpoint config")
    weights = _weights_file(folder, config)
    digest = config.get("weights_sha256")
    if digest is not None and weights.exists() and _digest(weights) != digest:
        raise ValueError(f"path: {weights} is not the file its config was saved with (an interrupted save?)")
    tensors = _read_tensors(weights)
    plan = []
    for name, spec in config["layers"].items():
        _check_spec(name, spec, backend)
        module = _submodule(model, name)
        out_f, in_f = _dims(module, name)
        pattern = spec.get("rank_pattern")
        if not isinstance(pattern, list) or len(pattern) != spec.get("init_r"):
            raise ValueError(
                f"{name}: the checkpoint's rank_pattern does not have init_r = {spec.get('init_r')} entries"
            )
        if isinstance(module, AdaLoRALinear) and (module.init_r, module.lora_alpha) != (
            spec["init_r"],
            spec["lora_alpha"],
        ):
            raise ValueError(
                f"{name}: the checkpoint has init_r={spec['init_r']}, lora_alpha={spec['lora_alpha']}, the model's "
                f"layer init_r={module.init_r}, lora_alpha={module.lora_alpha}"
            )
        r = sum(map(bool, pattern)) if config.get("resized") else spec["init_r"]
        current_r = module.r if isinstance(module, AdaLoRALinear) else spec["init_r"]
        if current_r not in (r, spec["init_r"]):
            raise ValueError(f"{name}: the layer has {current_r} ranks left, the checkpoint {r} of {spec['init_r']}")
        for label, shape in (("P", (out_f, r)), ("lam", (r,)), ("Q", (r, in_f)), ("rank_mask", (r,))):
            _expect(name, label, tensors.get(f"{name}.{label}"), shape)
        plan.append((name, spec, r, current_r))
    for name, spec, r, current_r in plan:  # nothing below can fail on a checked plan
        if not isinstance(model.get_submodule(name), AdaLoRALinear):
            inject_adalora(model, [name], init_r=spec["init_r"], lora_alpha=spec["lora_alpha"],
                           lora_dropout=spec["lora_dropout"], backend=backend)  # fmt: skip
        module = model.get_submodule(name)
        if current_r != r:
            module.keep_ranks(torch.tensor(spec["rank_pattern"], dtype=torch.bool))
        _copy(module, tensors[f"{name}.P"], tensors[f"{name}.lam"], tensors[f"{name}.Q"], tensors[f"{name}.rank_mask"])
    return list(config["layers"])


@torch.no_grad()
def _copy(module: AdaLoRALinear, P, lam, Q, rank_mask=None) -> None:
    for dst, src in ((module.P, P), (module.lam, lam), (module.Q, Q)):
        dst.copy_(src)
    if rank_mask is not None:
        module.rank_mask.copy_(rank_mask)


def export_peft(model: nn.Module, path: str | Path, *, base_model_name_or_path: str | None = None,
                task_type: str | None = None) -> Path:  # fmt: skip
    """Write a PEFT AdaLoRA adapter folder that plain ``PeftModel.from_pretrained(base, path)`` loads offline.
    Each file is replaced whole (written beside it, then renamed), the weights before the config; PEFT's file
    names are fixed, so an interrupt between the two renames leaves new weights beside the old config."""
    import peft
    from safetensors.torch import save

    layers = _layers(model)
    init_r = _uniform(layers, "init_r")
    pattern, tensors = {}, {}
    for name, m in layers.items():
        keep = m.rank_mask
        pattern[f"{name}.lora_E"] = keep.tolist()
        tensors[f"{_PREFIX}{name}.lora_A"] = m.Q[keep]
        tensors[f"{_PREFIX}{name}.lora_B"] = m.P[:, keep]
        tensors[f"{_PREFIX}{name}.lora_E"] = m.lam[keep].view(-1, 1)
    cfg = peft.AdaLoraConfig(
        init_r=init_r, target_r=min(sum(v) for v in pattern.values()) or 1, lora_alpha=_uniform(layers, "lora_alpha"),
        lora_dropout=_uniform(layers, "lora_dropout"), target_modules=sorted(layers), total_step=1,
        fan_in_fan_out=_uniform(layers, "fan_in_fan_out"), rank_pattern=pattern,
        base_model_name_or_path=base_model_name_or_path, task_type=task_type,
    )  # fmt: skip
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    with _target_folder(path) as folder:
        scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))  # PEFT writes its config as it likes
        try:
            cfg.save_pretrained(str(scratch))
            text = (scratch / PEFT_CONFIG_NAME).read_bytes()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        _commit(folder, {PEFT_WEIGHTS_NAME: data}, PEFT_CONFIG_NAME, text)
    return folder


def import_peft(model: nn.Module, path: str | Path, *, backend: str | None = None) -> list[str]:
    """Inject AdaLoRA layers into a plain ``model`` from a PEFT AdaLoRA adapter folder (offline); returns the
    layer names. Pruned ranks stay dropped, with PEFT's scale (init_r). Trained biases (``bias="lora_only"`` or
    ``"all"``) and ``modules_to_save`` (a classifier head, say) are copied into the model's own modules.

    All or nothing: every tensor is checked against the model before the first layer changes; an error names
    the layer and tensor that does not fit, and leaves the model as it was."""
    folder = Path(path)
    cfg = _read_json(folder / PEFT_CONFIG_NAME, "a PEFT adapter")
    if cfg.get("peft_type") != "ADALORA":
        raise ValueError(f"path: {folder} holds a {cfg.get('peft_type')} adapter, expected ADALORA")
    tensors = _read_tensors(folder / PEFT_WEIGHTS_NAME)
    strange = [k for k in tensors if not k.startswith(_PREFIX)]
    if strange:
        raise ValueError(f"{strange[0]}: a tensor outside {_PREFIX}…; not a PEFT adapter file of a PeftModel")
    keys = {k[len(_PREFIX) :]: v for k, v in tensors.items()}
    names = sorted(k[: -len(".lora_A")] for k in keys if k.endswith(".lora_A"))
    pattern = cfg.get("rank_pattern") or {}
    _check_spec("adapter_config.json", {"rank_pattern": None, **cfg}, backend)
    init_r = cfg["init_r"]
    plan = []
    for name in names:
        module = _submodule(model, name)
        if isinstance(module, AdaLoRALinear):
            raise ValueError(f"{name}: is already an AdaLoRALinear; import_peft takes a plain model")
        out_f, in_f = _dims(module, name)
        kept = pattern.get(f"{name}.lora_E")
        if kept is not None and len(kept) != init_r:
            raise ValueError(f"{name}.lora_E: the config's rank_pattern has {len(kept)} entries, init_r is {init_r}")
        r = sum(map(bool, kept)) if kept is not None else init_r
        for label, shape in (("lora_A", (r, in_f)), ("lora_B", (out_f, r)), ("lora_E", (r, 1))):
            _expect(name, label, keys.get(f"{name}.{label}"), shape)
        plan.append((name, kept))
    # the rest: biases of any module (bias="lora_only"/"all") and modules_to_save copies, into the model's own
    # (PEFT's forward uses a modules_to_save copy over the module itself; the original_module is unused)
    extra = {}
    for key, value in sorted(keys.items(), key=lambda kv: ".modules_to_save." in kv[0]):
        if key.rsplit(".", 1)[0] in names and key.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_E"):
            continue
        if ".original_module." in key:
            continue
        target = key.replace(".modules_to_save.", ".").replace(".base_layer.", ".")  # PEFT's wrappers
        owner, _, attr = target.rpartition(".")
        module = _submodule(model, owner) if owner else model
        current = getattr(module, attr, None)
        if not isinstance(current, torch.Tensor) or current.shape != value.shape:
            have = "none" if not isinstance(current, torch.Tensor) else tuple(current.shape)
            raise ValueError(f"{key}: the adapter's tensor {tuple(value.shape)} fits no tensor of the model ({have})")
        extra[target] = (current, value)
    inject_adalora(model, names, init_r=init_r, lora_alpha=cfg["lora_alpha"],
                   lora_dropout=cfg["lora_dropout"], backend=backend)  # fmt: skip
    for name, kept in plan:
        module = model.get_submodule(name)
        if kept is not None:
            module.keep_ranks(torch.tensor(kept, dtype=torch.bool))
        _copy(module, keys[f"{name}.lora_B"], keys[f"{name}.lora_E"].view(-1), keys[f"{name}.lora_A"])
    with torch.no_grad():
        for current, value in extra.values():
            current.copy_(value)
    return names
