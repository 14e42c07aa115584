// The Python module adaml_kernels._C has no functions: importing it loads the library, whose
// static initializers register the ops (adaml_kernels::*), as in pytorch/extension-cpp.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "adaml_kernels' compiled kernels, registered as the ops adaml_kernels::*",
      -1,       // size
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}
