// The fast port's batch loop on ONNX Runtime's C API: each model instance's thread takes a batch from
// the front, runs it and hands the outputs back, without Python in between.
//
// With Python running each batch, every batch paid for taking the GIL back, NumPy views, the
// binding's argument handling and the outputs' conversion, on the path of every call (about 0.2 ms
// per batch at concurrency 1, bench/worker/c1_trace.py). Python still loads, warms up and routes; it
// reads each batch's figures (size, queue waits, compute) from here for its metrics.
//
// The C API is a table of function pointers (OrtApi) that only ever grows. This file calls the
// entries it needs by their position in that table (ort_api.h names them, and tests prove each one
// against the real library), so that it builds without ONNX Runtime's headers, which the onnxruntime
// wheel does not ship. The library is opened at run time, from the onnxruntime package Python uses
// (worker/fast_port.py finds it), and must be the release the table was checked against.

#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "api.h"
#include "front.h"
#include "ort_api.h"

namespace {

using namespace fv_ort;  // NOLINT: the table's types and entries (ort_api.h)

const ApiBase* g_base = nullptr;
const void* const* g_api = nullptr;
OrtEnv* g_env = nullptr;
OrtMemoryInfo* g_cpu = nullptr;
std::mutex g_init_mu;

// An entry of the table by its name in ort_api.h, typed as declared there.
#define ORT(name) FV_ORT(g_api, name)

// The message of a failed call ("" for success); frees the status.
std::string error(OrtStatus* st) {
  if (!st) return {};
  const char* m = ORT(GetErrorMessage)(st);
  std::string out = m && *m ? m : "ONNX Runtime failed without a message";
  ORT(ReleaseStatus)(st);
  return out;
}

int put_error(char* buf, int cap, const std::string& message) {
  if (buf && cap > 0) {
    std::strncpy(buf, message.c_str(), size_t(cap) - 1);
    buf[cap - 1] = 0;
  }
  return -1;
}

// ONNX element types (ONNXTensorElementDataType) of the Open Inference Protocol's dtypes.
const char* const kDtypes[] = {nullptr, "FP32", "UINT8", "INT8", "UINT16", "INT16", "INT32", "INT64",
                               nullptr, "BOOL", "FP16", "FP64", "UINT32", "UINT64"};
constexpr int kNumDtypes = sizeof(kDtypes) / sizeof(kDtypes[0]);

int element_type(const char* dtype) {
  for (int t = 0; t < kNumDtypes; ++t)
    if (kDtypes[t] && std::strcmp(kDtypes[t], dtype) == 0) return t;
  return -1;
}

struct Session {
  OrtSession* s = nullptr;
  std::vector<std::string> in_names, out_names;
  std::vector<const char*> in_c, out_c;
  std::vector<int> in_types;
  std::atomic<int64_t> runs{0};  // batches run, warm-up included (tests check which session ran)
};

void release_values(std::vector<OrtValue*>& values) {
  for (auto*& v : values)
    if (v) ORT(ReleaseValue)(v), v = nullptr;
}

// Runs one batch; outs gets one value per output (the caller releases them).
std::string run(Session* s, const fv_batch& b, std::vector<OrtValue*>& outs) {
  if (b.ninputs != int(s->in_c.size())) return "the batch has " + std::to_string(b.ninputs) + " inputs, the session " +
                                               std::to_string(s->in_c.size());
  s->runs++;
  std::vector<OrtValue*> ins(size_t(b.ninputs), nullptr);
  std::string err;
  for (int i = 0; i < b.ninputs && err.empty(); ++i)
    err = error(ORT(CreateTensorWithDataAsOrtValue)(g_cpu, const_cast<void*>(b.data[i]), size_t(b.nbytes[i]),
                                                    b.dims[i], size_t(b.rank[i]), s->in_types[i], &ins[i]));
  outs.assign(s->out_c.size(), nullptr);
  if (err.empty())
    err = error(ORT(Run)(s->s, nullptr, s->in_c.data(), ins.data(), ins.size(), s->out_c.data(), outs.size(),
                         outs.data()));
  release_values(ins);
  return err;
}

// Hands a batch's outputs to the front, which copies them and answers the calls.
std::string complete(void* front, int64_t id, int64_t compute_ns, const std::vector<OrtValue*>& outs) {
  const int n = int(outs.size());
  std::vector<const char*> dtypes(n);
  std::vector<const void*> data(n);
  std::vector<int32_t> ranks(n);
  std::vector<int64_t> dims;
  for (int o = 0; o < n; ++o) {
    OrtTensorTypeAndShapeInfo* info = nullptr;
    std::string err = error(ORT(GetTensorTypeAndShape)(outs[o], &info));
    int type = 0;
    size_t rank = 0;
    if (err.empty())
      err = error(ORT(GetTensorElementType)(info, &type));
    if (err.empty())
      err = error(ORT(GetDimensionsCount)(info, &rank));
    if (err.empty() && (rank < 1 || rank > size_t(kMaxRank))) err = "an output of rank " + std::to_string(rank);
    if (err.empty()) {
      size_t at = dims.size();
      dims.resize(at + rank);
      err = error(ORT(GetDimensions)(info, dims.data() + at, rank));
    }
    if (info) ORT(ReleaseTensorTypeAndShapeInfo)(info);
    if (err.empty() && (type <= 0 || type >= kNumDtypes || !kDtypes[type]))
      err = "an output of ONNX element type " + std::to_string(type) + ", which the protocol cannot carry";
    void* p = nullptr;
    if (err.empty()) err = error(ORT(GetTensorMutableData)(outs[o], &p));
    if (!err.empty()) return err;
    dtypes[o] = kDtypes[type];
    data[o] = p;
    ranks[o] = int32_t(rank);
  }
  // -2 (outputs that do not fit the batch) is answered by the front itself; -1 cannot happen here.
  fv_complete(front, id, compute_ns, n, dtypes.data(), data.data(), ranks.data(), dims.data());
  return {};
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A model version's instances, as worker/fast_port.py's Instances: a batch that would run by itself (no
// other instance computing, nothing queued) runs on the alone session, and the others wait for it.
// Also where each batch's figures wait for Python's metrics.
struct Instances {
  Session* alone = nullptr;
  std::mutex mu;
  std::condition_variable cv;
  int busy = 0;
  bool alone_busy = false;

  std::mutex rec_mu;
  std::vector<double> records;  // per batch: samples, calls, compute s, then each call's queue wait in s
  int64_t expired = 0, cancelled = 0, failed = 0, lost = 0;
  std::string last_error;

  bool acquire(int queued) {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return !alone_busy; });
    busy++;
    if (alone && busy == 1 && queued == 0) return alone_busy = true;
    return false;
  }

  void release(bool was_alone) {
    {
      std::lock_guard lock(mu);
      busy--;
      if (was_alone) alone_busy = false;
    }
    if (was_alone) cv.notify_all();
  }
};

constexpr size_t kMaxRecords = size_t(1) << 22;  // doubles; past this (nobody reads them) batches go uncounted

}  // namespace

extern "C" {
#pragma GCC visibility push(default)

// Opens ONNX Runtime's library at path (once per process). 0, or -1 with a message in err.
int fv_ort_init(const char* path, char* err, int cap) {
  std::lock_guard lock(g_init_mu);
  if (g_api) return 0;
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!lib) return put_error(err, cap, dlerror());
  auto get_base = reinterpret_cast<const ApiBase* (*)()>(dlsym(lib, "OrtGetApiBase"));
  const ApiBase* base = get_base ? get_base() : nullptr;
  if (!base) return put_error(err, cap, std::string(path) + " has no OrtGetApiBase: not ONNX Runtime's library");
  // The positions in ort_api.h were proven against one release; another could have moved none of them,
  // but nothing has checked that, so it is refused rather than called.
  const char* version = base->GetVersionString();
  if (!checked(version))
    return put_error(err, cap,
                     std::string(path) + " is ONNX Runtime " + (version ? version : "(no version)") +
                         "; the native part's C API table was checked against " + checked_list() +
                         " only (install the release pyproject.toml pins: onnxruntime==" + kCpuRelease +
                         " or onnxruntime-gpu==" + kGpuRelease + ")");
  const void* table = base->GetApi(kApiVersion);
  if (!table) return put_error(err, cap, std::string(path) + " does not offer ONNX Runtime's C API version 16");
  g_base = base;
  g_api = static_cast<const void* const*>(table);
  std::string e = error(ORT(CreateEnv)(kLogError, "fovea-fast-port", &g_env));
  if (e.empty()) e = error(ORT(CreateCpuMemoryInfo)(kArenaAllocator, kMemTypeDefault, &g_cpu));
  if (!e.empty()) {
    g_api = nullptr;
    return put_error(err, cap, e);
  }
  return 0;
}

// The version string of the opened library ("" before fv_ort_init).
const char* fv_ort_version() {
  return g_base ? g_base->GetVersionString() : "";
}

// A CPU session on a model held in memory (already verified by the caller). Inputs and outputs are
// named in the model's order; input dtypes are the protocol's ("FP32"). NULL, with err, on failure.
void* fv_ort_session(const char* model, int64_t len, int intra_threads, int inter_threads, int opt_level, int arena,
                     int nconfig, const char** keys, const char** values, int ninputs, const char** in_names,
                     const char** in_dtypes, int noutputs, const char** out_names, char* err, int cap) {
  if (!g_api) return put_error(err, cap, "fv_ort_init has not run"), nullptr;
  if (ninputs < 1 || ninputs > kMaxTensors || noutputs < 1 || noutputs > kMaxTensors)
    return put_error(err, cap, "inputs or outputs out of the fast port's limits"), nullptr;
  auto s = std::make_unique<Session>();
  for (int i = 0; i < ninputs; ++i) {
    s->in_names.emplace_back(in_names[i]);
    s->in_types.push_back(element_type(in_dtypes[i]));
    if (s->in_types.back() < 0)
      return put_error(err, cap, std::string("input dtype ") + in_dtypes[i] + " has no ONNX element type"), nullptr;
  }
  for (int o = 0; o < noutputs; ++o) s->out_names.emplace_back(out_names[o]);
  for (auto& n : s->in_names) s->in_c.push_back(n.c_str());
  for (auto& n : s->out_names) s->out_c.push_back(n.c_str());

  OrtSessionOptions* so = nullptr;
  std::string e = error(ORT(CreateSessionOptions)(&so));
  if (e.empty()) e = error(ORT(SetIntraOpNumThreads)(so, intra_threads));
  if (e.empty()) e = error(ORT(SetInterOpNumThreads)(so, inter_threads));
  if (e.empty()) e = error(ORT(SetSessionGraphOptimizationLevel)(so, opt_level));
  if (e.empty()) e = error(arena ? ORT(EnableCpuMemArena)(so) : ORT(DisableCpuMemArena)(so));
  for (int i = 0; i < nconfig && e.empty(); ++i) e = error(ORT(AddSessionConfigEntry)(so, keys[i], values[i]));
  if (e.empty()) e = error(ORT(CreateSessionFromArray)(g_env, model, size_t(len), so, &s->s));
  if (so) ORT(ReleaseSessionOptions)(so);
  if (!e.empty()) return put_error(err, cap, e), nullptr;
  return s.release();
}

// Runs a batch and drops its outputs (warm-up). 0, or -1 with err.
int fv_ort_run(void* session, const fv_batch* in, char* err, int cap) {
  std::vector<OrtValue*> outs;
  std::string e = run(static_cast<Session*>(session), *in, outs);
  release_values(outs);
  return e.empty() ? 0 : put_error(err, cap, e);
}

int64_t fv_ort_runs(void* session) { return static_cast<Session*>(session)->runs; }

void fv_ort_free(void* session) {
  auto* s = static_cast<Session*>(session);
  if (!s) return;
  if (s->s) ORT(ReleaseSession)(s->s);
  delete s;
}

// The shared state of a version's batch loops; alone may be NULL.
void* fv_instances_new(void* alone) {
  auto* in = new Instances();
  in->alone = static_cast<Session*>(alone);
  return in;
}

void fv_instances_free(void* instances) { delete static_cast<Instances*>(instances); }

// One model instance's batch loop for a slot of the front; returns once the slot is closed and drained.
int fv_serve(void* front, int slot, void* session, void* instances, int max_batch) {
  auto* s = static_cast<Session*>(session);
  auto* in = static_cast<Instances*>(instances);
  fv_batch b{};
  std::vector<double> waits(size_t(max_batch > 0 ? max_batch : 1));
  std::vector<OrtValue*> outs;
  while (true) {
    int got = fv_next_batch(front, slot, 250, &b, waits.data());
    if (b.expired || b.cancelled) {
      std::lock_guard lock(in->rec_mu);
      in->expired += b.expired;
      in->cancelled += b.cancelled;
    }
    if (got < 0) return 0;
    if (got == 0) continue;
    bool alone = in->acquire(b.queued);
    int64_t t0 = now_ns();
    std::string err = run(alone ? in->alone : s, b, outs);
    int64_t compute_ns = now_ns() - t0;
    in->release(alone);
    if (err.empty()) err = complete(front, b.id, compute_ns, outs);
    release_values(outs);
    if (!err.empty()) fv_fail(front, b.id, 13, ("model failed on this batch: " + err.substr(0, 200)).c_str());  // INTERNAL
    std::lock_guard lock(in->rec_mu);
    if (!err.empty()) {
      in->failed++;
      in->last_error = err.substr(0, 300);
      continue;
    }
    if (in->records.size() + 3 + size_t(b.calls) > kMaxRecords) {
      in->lost++;
      continue;
    }
    in->records.push_back(b.samples);
    in->records.push_back(b.calls);
    in->records.push_back(double(compute_ns) / 1e9);
    in->records.insert(in->records.end(), waits.begin(), waits.begin() + b.calls);
  }
}

// Moves whole batch records (see Instances::records) into out, up to cap doubles; returns how many.
// counts gets, since the last call: calls expired, cancelled, batches failed, records lost. err gets
// the last failure's message.
int fv_take_records(void* instances, double* out, int cap, int64_t* counts, char* err, int errcap) {
  auto* in = static_cast<Instances*>(instances);
  std::lock_guard lock(in->rec_mu);
  size_t n = 0;
  while (n < in->records.size()) {
    size_t len = 3 + size_t(in->records[n + 1]);
    if (n + len > size_t(cap)) break;
    n += len;
  }
  if (n > 0) std::memcpy(out, in->records.data(), n * sizeof(double));  // data() may be null when empty
  in->records.erase(in->records.begin(), in->records.begin() + long(n));
  counts[0] = in->expired;
  counts[1] = in->cancelled;
  counts[2] = in->failed;
  counts[3] = in->lost;
  in->expired = in->cancelled = in->failed = in->lost = 0;
  if (!in->last_error.empty()) put_error(err, errcap, in->last_error);
  in->last_error.clear();
  return int(n);
}

#pragma GCC visibility pop
}  // extern "C"
