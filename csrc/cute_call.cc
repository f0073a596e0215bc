// XLA FFI handler that runs a CuTe-DSL-compiled host launcher on XLA's CUDA stream.
//
// The kernel arrives as an ELF object (what `JitCompiledFunction.dump_to_object`
// writes) in the `object` attribute, so a compiled XLA executable carries its own
// kernels.  We load it with the CuTe DSL runtime C API (libcute_dsl_runtime.so,
// dlopen'ed so that CPU-only installs never need it), once per process per
// `symbol` (the object's function prefix, derived from a hash of the variant),
// then call the launcher with the argument convention of `export_to_c`:
//   args = {&stream, &ptr_0, ..., &size_0, ..., &i32_0, ..., &f32_0, ..., &ret}
// where the pointers are the call's operands then its results, the sizes are
// int32 dimensions read from those buffers (pairs in `size_dims`), and the
// scalars come from attributes.  The launcher never allocates or synchronizes,
// so the handler is safe to capture into CUDA graphs (XLA command buffers).
#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "nanobind/nanobind.h"
#include "nanobind/stl/string.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace nb = nanobind;

// The CUDA runtime's stream type, declared here so the extension builds
// without a CUDA toolkit (CPU-only CI).
typedef struct CUstream_st* cudaStream_t;

namespace {

// Subset of CuteDSLRuntime.h (nvidia-cutlass-dsl) that we use.
using CreateFromBytesFn = int (*)(void** module, const unsigned char* bytes,
                                  size_t size, const char** shared_libs,
                                  size_t num_shared_libs);
using GetFunctionFn = int (*)(void** func, void* module, const char* prefix);
using RunFn = int (*)(void* func, void** args, size_t num_args);
using ErrorStringFn = const char* (*)(int error);

struct Runtime {
  CreateFromBytesFn create = nullptr;
  GetFunctionFn get_function = nullptr;
  RunFn run = nullptr;
  ErrorStringFn error_name = nullptr;
  ErrorStringFn error_string = nullptr;
};

// Testing aid: fill every result with 0xFF bytes (NaN in bf16/fp16/f32) on the
// stream before the launch, so a test can prove the kernel wrote each element.
using MemsetD8AsyncFn = int (*)(uintptr_t dst, unsigned char value, size_t n,
                                cudaStream_t stream);
MemsetD8AsyncFn g_poison = nullptr;

std::mutex g_mutex;
std::string g_runtime_path;  // set from Python; JAX_FA4_CUTE_RUNTIME overrides
Runtime* g_runtime = nullptr;
std::unordered_map<std::string, void*>* g_functions = nullptr;  // symbol -> fn

std::string RuntimeErrorText(const Runtime& rt, int code) {
  std::string text = "error " + std::to_string(code);
  if (rt.error_name) text += std::string(" ") + rt.error_name(code);
  if (rt.error_string) text += std::string(": ") + rt.error_string(code);
  return text;
}

// Requires g_mutex.
ffi::Error LoadRuntime() {
  if (g_runtime) return ffi::Error::Success();
  std::string path = g_runtime_path;
  if (const char* env = std::getenv("JAX_FA4_CUTE_RUNTIME")) path = env;
  if (path.empty()) path = "libcute_dsl_runtime.so";
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "jax_fa4: cannot load the CuTe DSL runtime '" + path +
                          "' (" + dlerror() +
                          "). Install nvidia-cutlass-dsl[cu13] or set "
                          "JAX_FA4_CUTE_RUNTIME to libcute_dsl_runtime.so.");
  }
  auto rt = std::make_unique<Runtime>();
  rt->create = reinterpret_cast<CreateFromBytesFn>(
      dlsym(lib, "CuteDSLRT_Module_Create_From_Bytes"));
  rt->get_function = reinterpret_cast<GetFunctionFn>(
      dlsym(lib, "CuteDSLRT_Module_Get_Function"));
  rt->run = reinterpret_cast<RunFn>(dlsym(lib, "CuteDSLRT_Function_Run"));
  rt->error_name =
      reinterpret_cast<ErrorStringFn>(dlsym(lib, "CuteDSLRT_GetErrorName"));
  rt->error_string =
      reinterpret_cast<ErrorStringFn>(dlsym(lib, "CuteDSLRT_GetErrorString"));
  if (!rt->create || !rt->get_function || !rt->run) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "jax_fa4: '" + path +
                          "' lacks the CuteDSLRT_Module_* / Function_Run C API");
  }
  g_runtime = rt.release();
  g_functions = new std::unordered_map<std::string, void*>();
  return ffi::Error::Success();
}

// Returns the launcher for `symbol`, loading `object` the first time.
// Modules are never unloaded: executables may be rerun until process exit.
ffi::Error GetFunction(ffi::Span<const uint8_t> object, std::string_view symbol,
                       void** out) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (ffi::Error err = LoadRuntime(); err.failure()) return err;
  std::string key(symbol);
  if (auto it = g_functions->find(key); it != g_functions->end()) {
    *out = it->second;
    return ffi::Error::Success();
  }
  void* module = nullptr;
  int rc = g_runtime->create(&module, object.begin(), object.size(), nullptr, 0);
  if (rc != 0 || !module) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      "jax_fa4: loading kernel object '" + key + "' (" +
                          std::to_string(object.size()) + " bytes) failed: " +
                          RuntimeErrorText(*g_runtime, rc));
  }
  void* fn = nullptr;
  rc = g_runtime->get_function(&fn, module, key.c_str());
  if (rc != 0 || !fn) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      "jax_fa4: kernel object has no launcher '" + key +
                          "': " + RuntimeErrorText(*g_runtime, rc));
  }
  g_functions->emplace(key, fn);
  *out = fn;
  return ffi::Error::Success();
}

ffi::Error Initialize(ffi::RemainingArgs, ffi::RemainingRets,
                      ffi::Span<const uint8_t> object, std::string_view symbol,
                      ffi::Span<const int64_t>, ffi::Span<const int32_t>,
                      ffi::Span<const float>) {
  void* fn = nullptr;
  return GetFunction(object, symbol, &fn);
}

ffi::Error Execute(cudaStream_t stream, ffi::RemainingArgs args,
                   ffi::RemainingRets rets, ffi::Span<const uint8_t> object,
                   std::string_view symbol, ffi::Span<const int64_t> size_dims,
                   ffi::Span<const int32_t> i32_scalars,
                   ffi::Span<const float> f32_scalars) {
  void* fn = nullptr;
  if (ffi::Error err = GetFunction(object, symbol, &fn); err.failure()) {
    return err;
  }

  const size_t num_args = args.size(), num_rets = rets.size();
  std::vector<void*> ptrs(num_args + num_rets);
  std::vector<ffi::AnyBuffer::Dimensions> dims(num_args + num_rets);
  for (size_t i = 0; i < num_args; ++i) {
    auto buf = args.get<ffi::AnyBuffer>(i);
    if (buf.has_error()) return buf.error();
    ptrs[i] = buf->untyped_data();
    dims[i] = buf->dimensions();
  }
  for (size_t i = 0; i < num_rets; ++i) {
    auto buf = rets.get<ffi::AnyBuffer>(i);
    if (buf.has_error()) return buf.error();
    ptrs[num_args + i] = (*buf)->untyped_data();
    dims[num_args + i] = (*buf)->dimensions();
  }
  if (size_dims.size() % 2 != 0) {
    return ffi::Error::InvalidArgument("jax_fa4: size_dims must hold pairs");
  }
  std::vector<int32_t> sizes(size_dims.size() / 2);
  for (size_t i = 0; i < sizes.size(); ++i) {
    int64_t buffer = size_dims[2 * i], axis = size_dims[2 * i + 1];
    if (buffer < 0 || buffer >= static_cast<int64_t>(dims.size()) || axis < 0 ||
        axis >= static_cast<int64_t>(dims[buffer].size())) {
      return ffi::Error::InvalidArgument(
          "jax_fa4: size_dims names a missing buffer dimension");
    }
    sizes[i] = static_cast<int32_t>(dims[buffer][axis]);
  }

  if (g_poison) {
    for (size_t i = 0; i < num_rets; ++i) {
      auto buf = rets.get<ffi::AnyBuffer>(i);
      if (int rc = g_poison(reinterpret_cast<uintptr_t>((*buf)->untyped_data()),
                            0xFF, (*buf)->size_bytes(), stream);
          rc != 0) {
        return ffi::Error(ffi::ErrorCode::kInternal,
                          "jax_fa4: poisoning outputs failed: CUDA error " +
                              std::to_string(rc));
      }
    }
  }

  int32_t ret = 0;
  std::vector<void*> call;
  call.reserve(2 + ptrs.size() + sizes.size() + i32_scalars.size() +
               f32_scalars.size());
  call.push_back(&stream);
  for (void*& p : ptrs) call.push_back(&p);
  for (int32_t& s : sizes) call.push_back(&s);
  for (const int32_t& v : i32_scalars) call.push_back(const_cast<int32_t*>(&v));
  for (const float& v : f32_scalars) call.push_back(const_cast<float*>(&v));
  call.push_back(&ret);  // the launcher's int32 return slot; counted in n

  int rc = g_runtime->run(fn, call.data(), call.size());
  if (rc != 0 || ret != 0) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      "jax_fa4: launching '" + std::string(symbol) +
                          "' failed: " + RuntimeErrorText(*g_runtime, rc) +
                          ", launcher returned " + std::to_string(ret));
  }
  return ffi::Error::Success();
}

#define JAX_FA4_ATTRS                               \
  .Attr<ffi::Span<const uint8_t>>("object")         \
      .Attr<std::string_view>("symbol")             \
      .Attr<ffi::Span<const int64_t>>("size_dims")  \
      .Attr<ffi::Span<const int32_t>>("i32_scalars") \
      .Attr<ffi::Span<const float>>("f32_scalars")

XLA_FFI_DEFINE_HANDLER(kInitialize, Initialize,
                       ffi::Ffi::BindInitialize()
                           .RemainingArgs()
                           .RemainingRets() JAX_FA4_ATTRS);

XLA_FFI_DEFINE_HANDLER(kExecute, Execute,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .RemainingArgs()
                           .RemainingRets() JAX_FA4_ATTRS,
                       {ffi::Traits::kCmdBufferCompatible});

template <typename T>
nb::capsule Capsule(T* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_ffi, m) {
  m.doc() = "jax_fa4's XLA FFI handler for CuTe DSL kernel objects";
  m.def("handlers", []() {
    nb::dict d;
    d["initialize"] = Capsule(kInitialize);
    d["execute"] = Capsule(kExecute);
    return d;
  });
  m.def("set_runtime_path", [](std::string path) {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_runtime_path = std::move(path);
  });
  m.def("set_poison_outputs", [](bool on) {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!on) {
      g_poison = nullptr;
      return;
    }
    void* cuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!cuda) cuda = dlopen("libcuda.so.1", RTLD_NOW);
    void* fn = cuda ? dlsym(cuda, "cuMemsetD8Async") : nullptr;
    if (!fn) throw std::runtime_error("jax_fa4: cuMemsetD8Async not found in libcuda.so.1");
    g_poison = reinterpret_cast<MemsetD8AsyncFn>(fn);
  });
  m.def("loaded_kernels", []() {
    std::lock_guard<std::mutex> lock(g_mutex);
    return g_functions ? g_functions->size() : size_t{0};
  });
}
