"""Build script. Two optional, import-safe compiled extensions:

* ``stn_kernels._host`` (csrc/host/): the modules' eager calls on CPU tensors issued from C++ (the reference's
  ATen ops with a C++ autograd Function; less host time per call). Built wherever torch is installed, never
  when STN_KERNELS_BUILD_HOST=0. :func:`host_build_decision` makes that choice.
* ``stn_kernels._C`` (csrc/*.cpp, csrc/*.cu): the CUDA kernels of the ``cuda`` backend, as follows.

A build of either that fails (no compiler, a compiler that fails, a compiler error, an nvcc that does not match
torch's CUDA) is reported and left out, and the install goes on (:func:`build_ext_class`); only with FORCE_CUDA=1
does a failed CUDA build fail the install. pip shows a successful build's output only with ``-v``, so the report
is also written to the terminal (:func:`tell_user`).

It is built when csrc/ has sources and a CUDA toolkit (nvcc) plus a CUDA build of torch
are present, or when FORCE_CUDA=1; never when STN_KERNELS_BUILD_CUDA=0. On a machine
without them, ``pip install`` compiles nothing. :func:`cuda_build_decision` makes that
choice (importable: ``setup()`` runs only when this file is executed).

Knobs (environment variables):

* ``STN_KERNELS_BUILD_CUDA=0``: never build the extension.
* ``FORCE_CUDA=1``: build it even where torch or the toolkit are not detected; a failed build then fails the install.
* ``CUDA_HOME`` / ``CUDA_PATH``: the toolkit folder. When unset, it is found from the nvcc on
  the PATH, following symlinks and wrapper scripts that ``exec`` the toolkit's own nvcc.
* ``TORCH_CUDA_ARCH_LIST``: target GPUs; default ``8.0;9.0+PTX`` (sm_80, sm_90 and PTX for
  newer GPUs). No GPU is queried.
* ``MAX_JOBS``: parallel compile jobs (ninja is used when installed, e.g. ``pip install ninja``).
"""

import glob
import os
import re
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# What the user loses when an optional extension is left out (the report of a failed build says it).
WITHOUT = {
    "stn_kernels._host": "the modules take their Python path instead (same numbers, more host time per call)",
    "stn_kernels._C": "the 'cuda' backend is unavailable (the 'reference' and 'triton' backends still work)",
}


def cuda_sources(root: str = HERE) -> list:
    """The extension's translation units (csrc/*.cpp and csrc/*.cu; csrc/emulate/ is for the tests)."""
    csrc = os.path.join(root, "csrc")
    return sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "*.cu")))


def host_sources(root: str = HERE) -> list:
    """The translation units of stn_kernels._host (csrc/host/*.cpp)."""
    return sorted(glob.glob(os.path.join(root, "csrc", "host", "*.cpp")))


def host_build_decision(env=None, root: str = HERE):
    """``(build, reason)``: whether ``pip install`` builds stn_kernels._host here, and why."""
    env = os.environ if env is None else env
    if env.get("STN_KERNELS_BUILD_HOST", "").strip() == "0":
        return False, "STN_KERNELS_BUILD_HOST=0"
    if not host_sources(root):
        return False, "no sources in csrc/host/"
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    return True, f"torch {torch.__version__}"


def host_extensions():
    build, reason = host_build_decision()
    if not build:
        print(f"stn_kernels: not building the host extension ({reason})")
        return []
    print(f"stn_kernels: building the host extension stn_kernels._host ({reason})")
    import torch
    from torch.utils.cpp_extension import CppExtension

    return [CppExtension(
        "stn_kernels._host",
        [os.path.relpath(s, HERE) for s in host_sources()],
        extra_compile_args=["-O3", "-g0"],
        define_macros=[("TORCH_VERSION_STRING", f'"{torch.__version__.split("+")[0]}"')],
        optional=True,  # a compiler error leaves the Python path, not a failed install
    )]


def _toolkit_root_of(nvcc: str):
    """The toolkit folder of an nvcc executable: <root>/bin/nvcc, after symlinks; for a wrapper
    script (e.g. ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``), the toolkit it execs."""
    real = os.path.realpath(nvcc)
    root = os.path.dirname(os.path.dirname(real))
    if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
        return root
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    for target in re.findall(rb"(/[^\s'\"]*/bin/nvcc)\b", head):
        target = target.decode(errors="replace")
        if os.path.realpath(target) != real and os.access(target, os.X_OK):
            return _toolkit_root_of(target)
    return None


def find_cuda_home(env=None):
    """CUDA_HOME / CUDA_PATH if set, else the toolkit of the nvcc on the PATH, else None."""
    env = os.environ if env is None else env
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc", path=env.get("PATH", os.defpath))
    return _toolkit_root_of(nvcc) if nvcc else None


def cuda_build_decision(env=None, root: str = HERE):
    """``(build, reason)``: whether ``pip install`` builds the CUDA extension here, and why.

    Imports torch only when the answer depends on it.
    """
    env = os.environ if env is None else env
    if env.get("STN_KERNELS_BUILD_CUDA", "").strip() == "0":
        return False, "STN_KERNELS_BUILD_CUDA=0"
    if not cuda_sources(root):
        return False, "no sources in csrc/"
    force = env.get("FORCE_CUDA", "").strip() == "1"
    home = find_cuda_home(env)
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if force:
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return False, "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return True, f"CUDA toolkit at {home}, torch {torch.__version__} (CUDA {torch.version.cuda})"


def _nvidia_wheel_include(torch_module):
    """site-packages/nvidia/cu<major>/include of the CUDA wheels torch came with (cuBLAS and
    cuSPARSE headers that some ATen CUDA headers include), when present."""
    site = os.path.dirname(os.path.dirname(torch_module.__file__))
    major = (torch_module.version.cuda or "").split(".")[0]
    path = os.path.join(site, "nvidia", f"cu{major}", "include")
    return path if major and os.path.isdir(path) else None


def cuda_extensions():
    build, reason = cuda_build_decision()
    if not build:
        print(f"stn_kernels: not building the CUDA extension ({reason})")
        return []
    print(f"stn_kernels: building the CUDA extension stn_kernels._C ({reason})")
    home = find_cuda_home()
    if home and not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        os.environ["CUDA_HOME"] = home  # read when torch.utils.cpp_extension is imported
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

    import torch
    from torch.utils.cpp_extension import CUDAExtension

    cxx = ["-O3", "-g0"]  # no debug info: Python's own -g makes the torch headers slower to compile
    wheel_include = _nvidia_wheel_include(torch)
    if wheel_include:
        cxx += ["-idirafter", wheel_include]  # after the toolkit's own headers: never shadows them
    ext = CUDAExtension(
        "stn_kernels._C",
        [os.path.relpath(s, HERE) for s in cuda_sources()],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--threads", "2"]},
        define_macros=[
            ("TORCH_VERSION_STRING", f'"{torch.__version__.split("+")[0]}"'),
            ("TORCH_CUDA_VERSION_STRING", f'"{torch.version.cuda}"'),
        ],
        # a failed build leaves the 'cuda' backend out, not a failed install; unless it was asked for by name
        optional=os.environ.get("FORCE_CUDA", "").strip() != "1",
    )
    return [ext]


def tell_user(message: str) -> None:
    """``message`` in the build's output, and on the terminal where the output is captured: pip shows a
    successful build's output only with ``-v``, but the build runs in the user's terminal session."""
    print(message, flush=True)
    if sys.stdout.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:  # no terminal (CI, a detached session): the build log has it
            tty.write(f"\n{message}\n")
    except OSError:
        pass


def _has_cuda_sources(ext) -> bool:
    return any(source.endswith(".cu") for source in ext.sources)


def build_ext_class():
    """torch's BuildExtension, where an extension marked ``optional`` that fails to build is reported and left
    out instead of failing the install:

    * its compiler fails on its sources (torch's ninja build raises RuntimeError, which setuptools' own
      ``optional`` handling does not catch), or there is no compiler;
    * torch's checks before any extension is built fail: the C++ compiler (``CXX=/bin/false``: every extension
      needs it) or nvcc against torch's CUDA (the CUDA extensions). They are checked for all extensions at once,
      so the CUDA extensions are left out first and the others tried again.

    A copy that an earlier build left in the source tree (editable installs, ``build_ext --inplace``) is removed
    with the extension left out: it would otherwise be loaded, built from other sources."""
    from torch.utils.cpp_extension import BuildExtension

    class OptionalBuildExtension(BuildExtension):
        def run(self):
            self._left_out = []
            inplace = self.inplace  # setuptools builds in build/ and then copies in place; it clears the flag
            super().run()
            if inplace:
                for ext in self._left_out:
                    self._remove_inplace_copy(ext)

        def build_extensions(self):
            while self.extensions:
                self._building = False
                try:
                    super().build_extensions()
                    return
                except Exception as exc:  # noqa: BLE001 - any failure of torch's checks before the builds
                    if self._building:
                        raise  # a required extension's own build failed (build_extension lets it through)
                    cuda = [ext for ext in self.extensions if _has_cuda_sources(ext)]
                    failed = cuda if cuda and len(cuda) < len(self.extensions) else list(self.extensions)
                    if not all(getattr(ext, "optional", False) for ext in failed):
                        raise
                    for ext in failed:
                        self._leave_out(ext, exc, "torch's check of the compilers, before any build, failed: ")
                    self.extensions = [ext for ext in self.extensions if ext not in failed]

        def build_extension(self, ext):
            self._building = True
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any build failure of an optional extension
                if not getattr(ext, "optional", False):
                    raise
                self._leave_out(ext, exc)

        def _leave_out(self, ext, exc: BaseException, where: str = "") -> None:
            self._left_out.append(ext)
            reason = where + " ".join(f"{type(exc).__name__}: {exc}".split())
            tell_user(f"stn_kernels: the optional extension {ext.name} was not built ({reason}); "
                      f"{WITHOUT.get(ext.name, 'it is left out')}. The install goes on without it; "
                      "`pip install -v --no-build-isolation .` shows the compiler's output.")

        def _remove_inplace_copy(self, ext) -> None:
            package = ".".join(ext.name.split(".")[:-1])
            package_dir = self.get_finalized_command("build_py").get_package_dir(package)
            stale = os.path.join(package_dir, os.path.basename(self.get_ext_filename(ext.name)))
            if os.path.exists(stale):
                os.remove(stale)
                tell_user(f"stn_kernels: removed {stale}, left by an earlier build of {ext.name}")

    return OptionalBuildExtension.with_options(no_python_abi_suffix=True)


if __name__ == "__main__":
    bindir = os.path.dirname(sys.executable)  # ninja installed in this environment, not yet on the PATH: both
    if os.path.exists(os.path.join(bindir, "ninja")):  # extensions build with it (parallel, incremental)
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    cuda = cuda_extensions()  # first: it sets CUDA_HOME, read when torch.utils.cpp_extension is imported
    ext_modules = host_extensions() + cuda
    setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext_class()} if ext_modules else {})
