// The entries of ONNX Runtime's C API (struct OrtApi) that the worker's native code calls, in one table:
// each entry's name, its position in the table and its signature. (CreateStatus and GetErrorCode are
// the probe's only: they prove GetErrorMessage.)
//
// The onnxruntime wheel ships libonnxruntime.so but no headers, so the table is reached by position.
// Positions only ever get appended to, but nothing here is taken on trust: every entry below is proven
// against the real library, by behaviour distinctive to that function, by ort_probe.cc (built by
// build.sh) and tests/worker/test_ort_api.py. kCheckedVersions are the releases those tests passed on;
// fv_ort_init refuses any other, and pyproject.toml pins them: onnxruntime 1.32.0 for CPU workers, and
// onnxruntime-gpu 1.31.1 for GPU ones (PyPI has no onnxruntime-gpu 1.32.0; 1.31.1 was proven on the
// library of the onnxruntime 1.31.1 wheel, the same release's C API, and the CUDA provider's entries on
// onnxruntime-gpu 1.31.1's own library, which scripts/ort_gpu_library.sh fetches: `ort_probe cuda LIB`).
//
// To move to another release: add it here, change the pin, and run the test with it installed.

#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace fv_ort {

struct OrtStatus;
struct OrtEnv;
struct OrtSession;
struct OrtSessionOptions;
struct OrtValue;
struct OrtMemoryInfo;
struct OrtRunOptions;
struct OrtTensorTypeAndShapeInfo;
struct OrtCUDAProviderOptionsV2;
struct OrtTensorRTProviderOptionsV2;

constexpr const char* kCpuRelease = "1.32.0";  // pyproject.toml's onnxruntime pin
constexpr const char* kGpuRelease = "1.31.1";  // pyproject.toml's onnxruntime-gpu pin
constexpr const char* kCheckedVersions[] = {kCpuRelease, kGpuRelease};
constexpr uint32_t kApiVersion = 16;  // the table version asked of OrtApiBase::GetApi; every entry is in 16

// Enumerations' values (onnxruntime_c_api.h), as the probe confirms where they change behaviour.
constexpr int kLogError = 3;        // ORT_LOGGING_LEVEL_ERROR
constexpr int kArenaAllocator = 1;  // OrtArenaAllocator
constexpr int kMemTypeDefault = 0;  // OrtMemTypeDefault

// X(name, position, return type, parameters)
#define FV_ORT_ENTRIES(X)                                                                                      \
  X(CreateStatus, 0, OrtStatus*, (int code, const char* message))                                              \
  X(GetErrorCode, 1, int, (const OrtStatus* status))                                                           \
  X(GetErrorMessage, 2, const char*, (const OrtStatus* status))                                                \
  X(CreateEnv, 3, OrtStatus*, (int log_level, const char* log_id, OrtEnv** out))                               \
  X(CreateSessionFromArray, 8, OrtStatus*,                                                                     \
    (const OrtEnv* env, const void* model, size_t length, const OrtSessionOptions* options, OrtSession** out)) \
  X(Run, 9, OrtStatus*,                                                                                        \
    (OrtSession * session, const OrtRunOptions* run_options, const char* const* input_names,                   \
     const OrtValue* const* inputs, size_t ninputs, const char* const* output_names, size_t noutputs,          \
     OrtValue** outputs))                                                                                      \
  X(CreateSessionOptions, 10, OrtStatus*, (OrtSessionOptions * *out))                                          \
  X(EnableCpuMemArena, 18, OrtStatus*, (OrtSessionOptions * options))                                          \
  X(DisableCpuMemArena, 19, OrtStatus*, (OrtSessionOptions * options))                                         \
  X(SetSessionGraphOptimizationLevel, 23, OrtStatus*, (OrtSessionOptions * options, int level))                \
  X(SetIntraOpNumThreads, 24, OrtStatus*, (OrtSessionOptions * options, int threads))                          \
  X(SetInterOpNumThreads, 25, OrtStatus*, (OrtSessionOptions * options, int threads))                          \
  X(CreateTensorWithDataAsOrtValue, 49, OrtStatus*,                                                            \
    (const OrtMemoryInfo* info, void* data, size_t bytes, const int64_t* shape, size_t rank, int element_type, \
     OrtValue** out))                                                                                          \
  X(GetTensorMutableData, 51, OrtStatus*, (OrtValue * value, void** out))                                      \
  X(GetTensorElementType, 60, OrtStatus*, (const OrtTensorTypeAndShapeInfo* info, int* out))                   \
  X(GetDimensionsCount, 61, OrtStatus*, (const OrtTensorTypeAndShapeInfo* info, size_t* out))                  \
  X(GetDimensions, 62, OrtStatus*, (const OrtTensorTypeAndShapeInfo* info, int64_t* dims, size_t rank))        \
  X(GetTensorTypeAndShape, 65, OrtStatus*, (const OrtValue* value, OrtTensorTypeAndShapeInfo** out))           \
  X(CreateCpuMemoryInfo, 69, OrtStatus*, (int allocator_type, int mem_type, OrtMemoryInfo** out))              \
  X(ReleaseStatus, 93, void, (OrtStatus * status))                                                             \
  X(ReleaseSession, 95, void, (OrtSession * session))                                                          \
  X(ReleaseValue, 96, void, (OrtValue * value))                                                                \
  X(ReleaseTensorTypeAndShapeInfo, 99, void, (OrtTensorTypeAndShapeInfo * info))                               \
  X(ReleaseSessionOptions, 100, void, (OrtSessionOptions * options))                                           \
  X(AddSessionConfigEntry, 130, OrtStatus*, (OrtSessionOptions * options, const char* key, const char* value)) \
  X(SessionOptionsAppendExecutionProvider_TensorRT_V2, 170, OrtStatus*,                                        \
    (OrtSessionOptions * options, const OrtTensorRTProviderOptionsV2* tensorrt_options))                       \
  X(CreateTensorRTProviderOptions, 171, OrtStatus*, (OrtTensorRTProviderOptionsV2 * *out))                     \
  X(UpdateTensorRTProviderOptions, 172, OrtStatus*,                                                            \
    (OrtTensorRTProviderOptionsV2 * tensorrt_options, const char* const* keys, const char* const* values,      \
     size_t n))                                                                                                \
  X(ReleaseTensorRTProviderOptions, 174, void, (OrtTensorRTProviderOptionsV2 * options))                       \
  X(SessionOptionsAppendExecutionProvider_CUDA_V2, 204, OrtStatus*,                                            \
    (OrtSessionOptions * options, const OrtCUDAProviderOptionsV2* cuda_options))                               \
  X(CreateCUDAProviderOptions, 205, OrtStatus*, (OrtCUDAProviderOptionsV2 * *out))                             \
  X(UpdateCUDAProviderOptions, 206, OrtStatus*,                                                                \
    (OrtCUDAProviderOptionsV2 * cuda_options, const char* const* keys, const char* const* values, size_t n))   \
  X(ReleaseCUDAProviderOptions, 208, void, (OrtCUDAProviderOptionsV2 * options))

#define FV_ORT_DECLARE(name, position, ret, params) \
  using name##Fn = ret(*) params;                   \
  constexpr int k##name = position;
FV_ORT_ENTRIES(FV_ORT_DECLARE)
#undef FV_ORT_DECLARE

inline bool checked(const char* version) {
  for (const char* v : kCheckedVersions)
    if (version && std::strcmp(version, v) == 0) return true;
  return false;
}

// "1.32.0, 1.31.1"
inline std::string checked_list() {
  std::string out;
  for (const char* v : kCheckedVersions) out += (out.empty() ? "" : ", ") + std::string(v);
  return out;
}

struct Entry {
  const char* name;
  int position;
};
#define FV_ORT_LIST(name, position, ret, params) {#name, position},
constexpr Entry kEntries[] = {FV_ORT_ENTRIES(FV_ORT_LIST)};
#undef FV_ORT_LIST

struct ApiBase {  // OrtApiBase, which OrtGetApiBase returns
  const void* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

}  // namespace fv_ort

// The entry `name` of an OrtApi table, as a function of its declared type: FV_ORT(table, Run)(...).
#define FV_ORT(table, name) \
  reinterpret_cast<fv_ort::name##Fn>(const_cast<void*>(static_cast<const void* const*>(table)[fv_ort::k##name]))
