"""Builds vLLM's Marlin GEMM from gptqmodel 7.7.0's sources for this machine's GPU, as one library
that `torch.ops.load_library` loads (ops `gptqmodel_marlin_bf16::gptq_marlin_gemm_bf16` and
`::gptq_marlin_repack`, the names gptqmodel's own build registers).

gptqmodel builds this library itself on first use (every weight format, both activation dtypes),
but it needs torch >= 2.14.1, and the GPU image has 2.11. Here only what the harness uses is
built: bf16 activations, symmetric 4-bit (`uint4b8`) and 8-bit (`uint8b128`) weights in GPTQ's
format, every tile and group size the kernel's own selector offers for them (120 kernels, a few
per file so that ninja compiles them in parallel). The selector is cut to the same two formats, so
every kernel it names is built.

    pip download --no-deps --no-binary=:all: gptqmodel==7.7.0 && tar xzf gptqmodel-7.7.0.tar.gz
    python experiments/gpu/build_marlin.py gptqmodel-7.7.0/gptqmodel_ext/marlin OUT_DIR

Needs nvcc and ninja; writes OUT_DIR/gptqmodel_marlin_bf16_ops.so for the visible GPU's arch.
"""

from __future__ import annotations

import itertools
import re
import shutil
import sys
import time
from pathlib import Path

WEIGHTS = ("vllm::kU4B8", "vllm::kU8B128")
GROUP_BLOCKS = (-1, 2, 4, 8)  # the selector's COMMON set: channelwise, groups of 32, 64, 128
ONE_ROW_TILES = ((8, 8, 256), (8, 4, 128), (4, 8, 128))  # (n blocks, k blocks, threads), batch <= 16
MANY_ROW_TILES = ((16, 4, 256), (8, 4, 128), (4, 8, 128))  # batch 17-64
PER_FILE = 4


def instantiations(weight: str) -> list[str]:
    """The kernels COMMON_GET_IF(weight, pipe_stages) selects, in generate_kernels.py's form."""
    kinds = [(1, tile, m8) for tile in ONE_ROW_TILES for m8 in (True, False)]
    kinds += [(m, tile, False) for m in (2, 3, 4) for tile in MANY_ROW_TILES]
    return [
        f"template __global__ void Marlin<nv_bfloat16, {weight}.id(), vllm::kBFloat16.id(), {threads}, {m}, "
        f"{n}, {k}, {'true' if m8 else 'false'}, pipe_stages, {group}, false>( MARLIN_KERNEL_PARAMS );"
        for (m, (n, k, threads), m8), group in itertools.product(kinds, GROUP_BLOCKS)
    ]


def cut_selector(source: str) -> str:
    """Keep only the COMMON selections of WEIGHTS in get_marlin_kernel (its other calls name unbuilt kernels)."""
    call = re.compile(r"^\s+(\w+)_GET_IF\((vllm::\w+), \w+\)\s*$")

    def kept(line: str) -> bool:
        found = call.match(line)
        return not found or (found[1] == "COMMON" and found[2] in WEIGHTS)

    return "\n".join(line for line in source.splitlines() if kept(line)) + "\n"


def main(sources: Path, out: Path) -> None:
    import torch
    from torch.utils.cpp_extension import load

    work = out / "src"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(sources, work, ignore=shutil.ignore_patterns("kernel_*.cu", "*fp16*"))
    (work / "gptq_marlin.cu").write_text(cut_selector((work / "gptq_marlin.cu").read_text()))
    head = '#include "kernel.h"\n#include "marlin_template.h"\n\nnamespace MARLIN_NAMESPACE_NAME {\n'
    kernels = [line for weight in WEIGHTS for line in instantiations(weight)]
    files = []
    for i in range(0, len(kernels), PER_FILE):
        files.append(work / f"kernel_bf16_{i // PER_FILE:03d}.cu")
        files[-1].write_text(head + "\n".join(kernels[i : i + PER_FILE]) + "\n}\n")
    major, minor = torch.cuda.get_device_capability()
    started = time.perf_counter()
    load(
        name="gptqmodel_marlin_bf16_ops",
        sources=[str(work / name) for name in ("marlin_torch_bf16.cpp", "gptq_marlin_bf16.cu", "gptq_marlin_repack.cu",
                                               "awq_marlin_repack.cu")] + [str(f) for f in files],
        extra_include_paths=[str(work)],
        extra_cflags=["-O3", "-std=c++17", "-DENABLE_BF16"],
        extra_cuda_cflags=["-O3", "-std=c++17", "-DENABLE_BF16", "-static-global-template-stub=false",
                           "-Xfatbin", "-compress-all", "-diag-suppress=179,39,177",
                           f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"],
        build_directory=str(out),
        is_python_module=False,
        verbose=False,
    )
    library = out / "gptqmodel_marlin_bf16_ops.so"
    print(f"built {library} ({library.stat().st_size / 2**20:.1f} MiB, {len(kernels)} kernels, "
          f"sm_{major}{minor}) in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
