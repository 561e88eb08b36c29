"""``train.mixed_precision: auto``: bfloat16 where the hardware computes it natively.

Measured (BENCHMARKS.md): on CPUs with AVX512_BF16 (and AMX) the ResNet-18 step
under ``mixed_bfloat16`` is 1.3-1.84x the float32 step at equal kNN quality (52.0
against 51.9).  Without those instructions oneDNN emulates bfloat16 and it is
slower than float32, so ``auto`` picks it only where it pays:

* GPUs visible: ``mixed_bfloat16`` when every one has compute capability >= 8.0
  (Ampere and later have bfloat16 tensor cores), float32 otherwise;
* CPU only: ``mixed_bfloat16`` when the CPU has ``avx512_bf16`` or ``amx_bf16``
  (as Linux names them in ``/proc/cpuinfo``), float32 otherwise.

The choice is made once per run: it is written into the run's ``config.yaml`` as a
concrete value, so a run resumed on another machine keeps it.
"""

import os

BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
MIN_GPU_CAPABILITY = (8, 0)


def cpu_flags(path="/proc/cpuinfo"):
    """The CPU's feature flags as Linux lists them (an empty set where it does not)."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def gpu_capabilities():
    """``(major, minor)`` compute capability of every visible GPU (None where unknown)."""
    import tensorflow as tf

    return [tf.config.experimental.get_device_details(device).get("compute_capability")
            for device in tf.config.list_physical_devices("GPU")]


def choose_mixed_precision(*, flags=None, capabilities=None, environ=None):
    """``(policy, reason)``: ``"mixed_bfloat16"`` or ``"none"``, and why, for this machine
    (``flags``, ``capabilities`` and ``environ`` default to ``cpu_flags()``,
    ``gpu_capabilities()`` and ``os.environ``).  On a CPU, oneDNN switched off
    (``TF_ENABLE_ONEDNN_OPTS=0``) or capped below bfloat16 (``ONEDNN_MAX_CPU_ISA``) means
    emulated bfloat16, so float32."""
    capabilities = gpu_capabilities() if capabilities is None else capabilities
    if capabilities:
        if all(c is not None and tuple(c) >= MIN_GPU_CAPABILITY for c in capabilities):
            return "mixed_bfloat16", (f"every GPU has compute capability >= "
                                      f"{'.'.join(map(str, MIN_GPU_CAPABILITY))} "
                                      f"({capabilities})")
        return "none", (f"a GPU below compute capability "
                        f"{'.'.join(map(str, MIN_GPU_CAPABILITY))} ({capabilities}): float32")
    environ = os.environ if environ is None else environ
    if environ.get("TF_ENABLE_ONEDNN_OPTS") == "0":
        return "none", "TF_ENABLE_ONEDNN_OPTS=0: no oneDNN bfloat16 kernels"
    isa = environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and isa != "ALL" and "BF16" not in isa and "AMX" not in isa:
        return "none", (f"ONEDNN_MAX_CPU_ISA={isa} caps oneDNN below bfloat16 instructions "
                        f"(bfloat16 would be emulated)")
    flags = cpu_flags() if flags is None else set(flags)
    native = sorted(set(BFLOAT16_CPU_FLAGS) & flags)
    if native:
        return "mixed_bfloat16", f"the CPU computes bfloat16 natively ({', '.join(native)})"
    return "none", (f"the CPU has none of {', '.join(BFLOAT16_CPU_FLAGS)} (bfloat16 would be "
                    f"emulated, slower than float32)")


def resolve_mixed_precision(setting, recorded=None, *, across_workers=False, **machine):
    """``(policy, reason)`` for a run's ``train.mixed_precision`` ``setting``.

    A concrete setting is kept.  ``auto`` takes ``recorded`` (the concrete value in the
    config of the run being resumed) when there is one.  Otherwise, in a multi-worker
    cluster (``across_workers``) it is float32: each worker would judge its own hardware,
    and workers that disagree would train one model in two precisions without an error.
    Else ``choose_mixed_precision``."""
    if setting != "auto":
        return setting, "set in the config"
    if recorded not in (None, "auto"):
        return recorded, "recorded by the run being resumed"
    if across_workers:
        return "none", ("a multi-worker cluster, whose workers could choose differently; set "
                        "train.mixed_precision explicitly to train in bfloat16")
    return choose_mixed_precision(**machine)

