"""``keep_freed_memory``: a large tensor, once freed, stays in the process's heap for the next one
instead of going back to the kernel (whose fresh pages then fault in one by one). Each case runs
in its own process: the setting is process-wide and cannot be undone.

The measure is glibc's own count of the free bytes its heap holds (``mallinfo2().fordblks``)
right after a 32 MiB tensor is freed: deterministic, where counting the page faults of the next
allocation is not (a small allocation in between can split the freed block, and it did on CI)."""

import subprocess
import sys
import textwrap

import pytest

# Allocates and frees a 32 MiB tensor; prints the MiB that the heap holds free just after.
SCRIPT = textwrap.dedent(
    """
    import ctypes, sys, torch
    import lightning as L
    from dti_sprites.module import DTISpritesModule
    from dti_sprites.model import DTISprites

    class MallInfo2(ctypes.Structure):  # glibc >= 2.33, <malloc.h>
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2

    if sys.argv[1] == "module":  # what training does: the LightningModule's setup
        keep = sys.argv[2] == "1"
        module = DTISpritesModule(DTISprites(n_sprites=2, encoder="resnet8"),
                                  keep_freed_memory=keep)
        module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
        module.setup("fit")

    x = torch.ones(8 * 2**20)
    del x
    print(mallinfo2().fordblks / 2**20)
    """
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's mallopt and page-fault counts: Linux"
)


def mib_kept_free_after_a_32_mib_tensor(*args: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def test_by_default_a_freed_large_tensor_goes_back_to_the_kernel():
    assert mib_kept_free_after_a_32_mib_tensor("plain") < 32  # unmapped on free


def test_the_module_setup_keeps_freed_memory_for_the_next_tensor():
    assert mib_kept_free_after_a_32_mib_tensor("module", "1") >= 32


def test_the_switch_off_leaves_the_c_library_defaults():
    assert mib_kept_free_after_a_32_mib_tensor("module", "0") < 32


def test_it_reports_whether_the_setting_is_in_force():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from dti_sprites.allocator import keep_freed_memory as k; print(k(), k())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["True", "True"]  # applied, then already in force
