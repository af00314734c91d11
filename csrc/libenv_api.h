// The libenv C ABI (version 1) that procgen's prebuilt libenv.so exports, declared here from its
// documentation so the repo needs neither procgen's sources nor its Qt headers. The library is
// loaded with dlopen at run time (see LibenvLibrary).
#pragma once

#include <cstdint>
#include <string>

namespace lapo::libenv {

constexpr int kVersion = 1;
constexpr int kMaxNameLen = 128;
constexpr int kMaxNdim = 16;

enum Dtype : int { kDtypeUnused = 0, kDtypeUint8 = 1, kDtypeInt32 = 2, kDtypeFloat32 = 3 };
enum Space : int { kSpaceUnused = 0, kSpaceObservation = 1, kSpaceAction = 2, kSpaceInfo = 3 };

union Value {
  uint8_t uint8;
  int32_t int32;
  float float32;
};

struct TensorType {
  char name[kMaxNameLen];
  int scalar_type;
  int dtype;
  int shape[kMaxNdim];
  int ndim;
  Value low;
  Value high;
};

struct Option {
  char name[kMaxNameLen];
  int dtype;
  int count;
  void* data;
};

struct Options {
  Option* items;
  int count;
};

// Each pointer array holds len(space) * num_envs entries, space-major: [key * num_envs + env].
struct Buffers {
  void** ob;
  float* rew;
  uint8_t* first;
  void** info;
  void** ac;
};

using Handle = void;

// Function table of one loaded libenv.so.
struct Api {
  int (*version)();
  Handle* (*make)(int num, const Options options);
  int (*get_tensortypes)(Handle* handle, int space, TensorType* types);
  void (*set_buffers)(Handle* handle, Buffers* bufs);
  void (*observe)(Handle* handle);
  void (*act)(Handle* handle);
  void (*close)(Handle* handle);
};

// Loads (once per path, for the life of the process) and returns the function table; throws
// std::runtime_error naming the path and the dlerror() message on failure.
const Api& load_api(const std::string& path);

// Size in bytes of one element of a libenv dtype.
int dtype_size(int dtype);

}  // namespace lapo::libenv
