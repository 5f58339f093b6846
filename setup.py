"""Build of fusedloss: the Python package plus the C++/CUDA extension fusedloss._C.

    pip install --no-build-isolation -e .      # development (torch must already be installed)
    pip install --no-build-isolation .
    python setup.py build_ext --inplace

Environment:
    FUSEDLOSS_BUILD_EXT=0   pure-Python install, no extension (fusedloss falls back to reference)
    MAX_JOBS=n              parallel compile jobs (torch's ninja backend)
    FUSEDLOSS_SANITIZE=address   build the CPU code with AddressSanitizer (-O1 -g1; CI's ASan step,
                            .ci/asan.sh; run Python with libasan preloaded)
    FUSEDLOSS_ISAS=DEFAULT,AVX512   compile the CPU kernels for these instruction sets only

Sources of fusedloss._C:
    csrc/registration.cpp            op schemas (TORCH_LIBRARY)
    csrc/autograd/*.cpp              device-generic: eager one-call ops with C++ autograd
    csrc/cpu/*.cpp                   CPU bindings: argument checks, allocation, ISA dispatch
    csrc/cpu/*_kernel.cpp            CPU kernels, compiled once per instruction set (see below)
    csrc/cuda/*.cu                   CUDA kernels, only with a CUDA build of torch and CUDA_HOME

Per-ISA CPU kernels: at::vec::Vectorized<float> only uses AVX2/AVX-512 when its translation unit
is compiled with CPU_CAPABILITY_AVX2/AVX512 and the matching -m flags, and the generic fallback is
several times slower. So, as ATen does for its own kernels, every csrc/cpu/*_kernel.cpp is compiled
once per instruction set in ISA_FLAGS, with -DCPU_CAPABILITY=<ISA> -DCPU_CAPABILITY_<ISA> (the
kernels live in namespace fusedloss::cpu::CPU_CAPABILITY, so the copies do not clash), and the
bindings pick a copy at run time from torch's own CPU capability (which honours
ATEN_CPU_CAPABILITY=default|avx2|avx512). A new loss adds its csrc/cpu/<loss>_kernel.cpp; nothing
here needs to change.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Flags per instruction-set copy of the CPU kernels, as ATen's cmake/Codegen.cmake compiles them.
# The DEFAULT copy comes first: it is also linked first, so that any inline function from a header
# (a COMDAT that several copies emit) resolves to the version compiled without AVX flags.
ISA_FLAGS_GCC = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}
ISA_FLAGS_MSVC = {"DEFAULT": [], "AVX2": ["/arch:AVX2"], "AVX512": ["/arch:AVX512"]}


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _want_ext() -> bool:
    return (os.environ.get("FUSEDLOSS_BUILD_EXT", "1").strip().lower()
            not in ("0", "false", "no", "off"))


def _isa_list() -> list[str]:
    """Instruction sets to compile the CPU kernels for (x86-64 only; elsewhere the DEFAULT copy)."""
    only = os.environ.get("FUSEDLOSS_ISAS", "").strip()
    if only:
        isas = [x.strip().upper() for x in only.split(",") if x.strip()]
        return ["DEFAULT"] + [x for x in isas if x != "DEFAULT"]
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "x64", "i686", "x86"):
        return ["DEFAULT", "AVX2", "AVX512"]
    return ["DEFAULT"]


def _extension_and_cmdclass():
    """The fusedloss._C Extension and the build_ext command that compiles it."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "building fusedloss._C needs torch installed first; install with "
            "`pip install --no-build-isolation .` in an environment with torch, or set "
            "FUSEDLOSS_BUILD_EXT=0 for a pure-Python install") from e

    msvc = sys.platform == "win32"
    isa_flags = ISA_FLAGS_MSVC if msvc else ISA_FLAGS_GCC
    isas = _isa_list()

    cpu_all = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    isa_kernels = [p for p in cpu_all if p.endswith("_kernel.cpp")]
    # csrc/autograd: device-generic C++ (the eager one-call ops and their autograd)
    generic = _rel(glob.glob(os.path.join(ROOT, "csrc", "autograd", "*.cpp")))
    sources = ["csrc/registration.cpp"] + generic + [p for p in cpu_all if p not in isa_kernels]
    depends = _rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True)
                   + glob.glob(os.path.join(ROOT, "csrc", "**", "*.cuh"), recursive=True))

    if msvc:
        cxx = ["/O2", "/openmp"]
        link = []
    else:
        cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function",
               "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
        link = ["-fopenmp"]
        sanitize = os.environ.get("FUSEDLOSS_SANITIZE", "").strip()
        if sanitize:
            cxx = [f if f != "-O3" else "-O1" for f in cxx] + [
                f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g1"]
            link += [f"-fsanitize={sanitize}"]
    # Tell the bindings which kernel copies exist.
    cxx += [f"-DFUSEDLOSS_HAVE_{isa}" for isa in isas]

    with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        cu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        nvcc = ["-O3", "-lineinfo",
                "-gencode=arch=compute_80,code=sm_80",
                "-gencode=arch=compute_90,code=sm_90"]
        ext_cls = cpp_extension.CUDAExtension
        sources += cu_sources
        compile_args = {"cxx": cxx + ["-DFUSEDLOSS_WITH_CUDA"],
                        "nvcc": nvcc + ["-DFUSEDLOSS_WITH_CUDA"]}
    else:
        ext_cls = cpp_extension.CppExtension
        compile_args = {"cxx": cxx}

    ext = ext_cls(
        name="fusedloss._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        depends=depends,
        extra_compile_args=compile_args,
        extra_link_args=link,
    )
    # Not an Extension field: read by BuildExtensionISA below.
    ext.isa_kernels = isa_kernels
    ext.isa_list = isas

    class BuildExtensionISA(cpp_extension.BuildExtension):
        """torch's BuildExtension, plus the per-ISA copies of csrc/cpu/*_kernel.cpp.

        Each copy is compiled through the same (ninja or plain) compiler that BuildExtension set up,
        into its own folder under build_temp, with the extension's flags plus the ISA's; the
        objects are linked after the extension's own objects, DEFAULT copy first.
        """

        def build_extension(self, ext):
            kernels = getattr(ext, "isa_kernels", [])
            if not kernels:
                return super().build_extension(ext)
            args = ext.extra_compile_args
            base = list(args["cxx"] if isinstance(args, dict) else args)
            objects = []
            for isa in ext.isa_list:
                flags = base + [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"]
                flags += isa_flags[isa]
                objects += self.compiler.compile(
                    kernels,
                    output_dir=os.path.join(self.build_temp, f"isa_{isa.lower()}"),
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs=flags,
                    depends=ext.depends,
                )
            saved = ext.extra_objects
            ext.extra_objects = list(saved or []) + objects
            try:
                super().build_extension(ext)
            finally:
                ext.extra_objects = saved

    return ext, BuildExtensionISA


def main():
    ext_modules, cmdclass = [], {}
    if _want_ext():
        ext, build_cls = _extension_and_cmdclass()
        ext_modules = [ext]
        cmdclass = {"build_ext": build_cls.with_options(use_ninja=True)}

    # Metadata, packages and extras: pyproject.toml. This file only adds the extension.
    setup(
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":
    main()
