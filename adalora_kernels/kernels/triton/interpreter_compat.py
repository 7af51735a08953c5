"""Triton's CPU interpreter (``TRITON_INTERPRET=1``) on the versions users have.

Triton before 3.8 converts a one-element array to an index with ``int(array)``, which NumPy 2.4 refuses
(``TypeError: only 0-dimensional arrays can be converted to Python scalars``, triton-lang/triton#9171): every
interpreted kernel that indexes with a scalar tensor fails. ``install()`` wraps the interpreter's patching of
``tl.tensor`` so that ``__index__`` takes the element first. It does nothing where it is not needed (compiled
kernels, Triton ≥ 3.8, NumPy < 2.4) and is applied once, on import of the Triton backend.
"""

from __future__ import annotations

import os


def needed() -> bool:
    import numpy
    import triton
    from torch.torch_version import TorchVersion  # compares version strings

    return (
        os.environ.get("TRITON_INTERPRET") == "1"
        and TorchVersion(triton.__version__) < "3.8"
        and TorchVersion(numpy.__version__) >= "2.4"
    )


def install() -> bool:
    """Apply the shim where it is needed; returns whether it is in place."""
    if not needed():
        return False
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_adalora_shim", False):
        return True

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_lang_tensor._adalora_shim = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
