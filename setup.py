"""Build script. The CUDA extension in csrc/ is optional and import-safe.

It is built only when csrc/ has sources and a CUDA toolkit plus a CUDA build of
torch are present (or FORCE_CUDA=1), and never when STN_KERNELS_BUILD_CUDA=0. On a
machine without them, ``pip install`` compiles nothing.
"""

import glob
import os

from setuptools import setup


def cuda_extensions():
    if os.environ.get("STN_KERNELS_BUILD_CUDA", "1") == "0":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    force = os.environ.get("FORCE_CUDA", "0") == "1"
    if not force and (CUDA_HOME is None or torch.version.cuda is None):
        return [], {}
    ext = CUDAExtension(
        "stn_kernels._C",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
        define_macros=[("TORCH_VERSION_STRING", f'"{torch.__version__.split("+")[0]}"')],
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
