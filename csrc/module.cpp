// lapo_fast._C: the batched Procgen engine and the CPU fused VQ kernel, bound apart.
#include <pybind11/pybind11.h>

#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "lapo_fast native extension: batched Procgen engine and CPU fused VQ kernel";
  lapo::bind_engine(m);
  lapo::bind_vq(m);
}
