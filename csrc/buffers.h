// Checked access to caller-owned numpy buffers from pybind11.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

namespace lapo {

namespace py = pybind11;

// Returns the data pointer of `arr` after checking its dtype, that it is C-contiguous and
// writeable (when asked), and that it holds `count` elements; raises ValueError/TypeError naming
// `what` otherwise.
template <typename T>
T* checked_data(const py::array& arr, const char* what, py::ssize_t count, bool writeable = true) {
  if (!py::isinstance<py::array_t<T>>(arr) || !arr.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(what) + ": expected dtype " +
                         std::string(py::str(py::dtype::of<T>())) + ", got " +
                         std::string(py::str(arr.dtype())));
  if (!(arr.flags() & py::array::c_style))
    throw py::value_error(std::string(what) + ": array must be C-contiguous");
  if (writeable && !arr.writeable()) throw py::value_error(std::string(what) + ": array is read-only");
  if (count >= 0 && arr.size() != count)
    throw py::value_error(std::string(what) + ": expected " + std::to_string(count) +
                          " elements, got " + std::to_string(arr.size()));
  return static_cast<T*>(const_cast<void*>(arr.data()));
}

}  // namespace lapo
