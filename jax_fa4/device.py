"""Whether the devices a call lands on can run the FA4 SM90 kernels (checked at
lowering time, per platform; dispatch.py decides everything else from static facts)."""
from __future__ import annotations

import jax


def platform_reason(platform: str | None) -> str | None:
    """Why a call placed on `platform` (default: JAX's default backend) cannot run the
    kernel, or None if it can (see device_reason for the local-device check)."""
    platform = platform or jax.default_backend()
    if platform not in ("cuda", "gpu"):
        return f"the platform is {platform}; the FA4 kernels need a CUDA SM90 GPU"
    return device_reason()


def device_reason() -> str | None:
    """Why the local CUDA devices cannot run the kernel, or None if they can.

    Without a local CUDA backend (lowering for CUDA from a CPU host, e.g. to export
    or precompile) we trust the caller that the target is SM90.
    """
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return None
    for d in devices:
        cc = getattr(d, "compute_capability", None)
        if cc is not None and not str(cc).startswith("9"):
            return f"device {d} has compute capability {cc}; the FA4 kernels need 9.x (Hopper)"
    return None
