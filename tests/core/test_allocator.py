"""``keep_freed_memory``: a large tensor freed and allocated again reuses the process's memory
instead of new pages from the kernel (counted as minor page faults). Each case runs in its own
process: the setting is process-wide and cannot be undone."""

import subprocess
import sys
import textwrap

import pytest

# Allocates and frees a 32 MiB tensor six times; prints the fewest minor page faults of an
# allocation after the first (8,192 pages of 4 KiB when the memory is new; another thread of the
# process can take part of a freed block now and then, so one reuse is enough).
SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    import lightning as L
    from dti_sprites.module import DTISpritesModule
    from dti_sprites.model import DTISprites

    if sys.argv[1] == "module":  # what training does: the LightningModule's setup
        keep = sys.argv[2] == "1"
        module = DTISpritesModule(DTISprites(n_sprites=2, encoder="resnet8"),
                                  keep_freed_memory=keep)
        module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
        module.setup("fit")

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    counts = []
    for _ in range(6):
        before = faults()
        x = torch.ones(8 * 2**20)
        counts.append(faults() - before)
        del x
    print(min(counts[1:]))
    """
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's mallopt and page-fault counts: Linux"
)


def fewest_faults_of_a_reallocation(*args: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_by_default_a_freed_large_tensor_goes_back_to_the_kernel():
    assert fewest_faults_of_a_reallocation("plain") >= 8192  # every page new again


def test_the_module_setup_keeps_freed_memory_for_the_next_tensor():
    assert fewest_faults_of_a_reallocation("module", "1") < 100


def test_the_switch_off_leaves_the_c_library_defaults():
    assert fewest_faults_of_a_reallocation("module", "0") >= 8192


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
