// The Python module stn_kernels._C. Importing it loads this library, whose static
// initializers (TORCH_LIBRARY_IMPL in hyper_linear_ops.cpp) register the CUDA kernels of the
// private ops; the module itself only tells which torch and CUDA it was built against.
#include <Python.h>

#ifndef TORCH_VERSION_STRING
#define TORCH_VERSION_STRING "unknown"
#endif
#ifndef TORCH_CUDA_VERSION_STRING
#define TORCH_CUDA_VERSION_STRING "unknown"
#endif

// A marker that stn_kernels/backends/extension.py reads from the file before loading it, so that a
// build for another torch is reported (and never loaded) even when it would not load at all.
extern "C" __attribute__((visibility("default"), used)) const char stn_kernels_build_marker[] =
    "STN_KERNELS_BUILT_FOR_TORCH=" TORCH_VERSION_STRING ";CUDA=" TORCH_CUDA_VERSION_STRING ";";

static PyModuleDef stn_kernels_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled CUDA kernels of stn_kernels (private ops stn_kernels::_cuda_*).",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&stn_kernels_c_module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddStringConstant(m, "TORCH_VERSION", TORCH_VERSION_STRING) < 0 ||
      PyModule_AddStringConstant(m, "CUDA_VERSION", TORCH_CUDA_VERSION_STRING) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
