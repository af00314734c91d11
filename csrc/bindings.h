// The extension's two halves, each binding itself into lapo_fast._C (module.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace lapo {

void bind_engine(pybind11::module_& m);  // bind_engine.cpp: ProcgenEngine
void bind_vq(pybind11::module_& m);      // bind_vq.cpp: vq_forward, vq_ema_update, vq_cpu_kernel

}  // namespace lapo
