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

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "api.h"
#include "front.h"
#include "ort_api.h"
#include "oip_dtypes.h"

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

// The ONNX element type (ONNXTensorElementDataType) of a numeric Open Inference Protocol dtype; -1 for others.
int element_type(const char* dtype) {
  const fovea::oip::DType* d = fovea::oip::dtype(dtype);
  return d && d->numeric ? d->onnx : -1;
}

// The numeric dtype of an ONNX element type; nullptr for one the fast port does not answer with.
const char* dtype_name(int onnx) {
  const fovea::oip::DType* d = fovea::oip::dtype_of_onnx(onnx);
  return d && d->numeric ? d->name : nullptr;
}

// One batch size's session (size 0: any batch size).
struct Bucket {
  int64_t size = 0;
  OrtSession* s = nullptr;
  std::atomic<int64_t> runs{0};
};

// A model instance: one ONNX Runtime session, or one per batch bucket (api.h fv_session_spec.sizes).
struct Session {
  std::vector<std::unique_ptr<Bucket>> buckets;  // ascending sizes
  std::vector<std::string> in_names, out_names;
  std::vector<const char*> in_c, out_c;
  std::vector<int> in_types;
  std::vector<std::vector<char>> padded;  // each input's padded copy, reused batch to batch
  std::atomic<int64_t> runs{0};           // batches run, warm-up included (tests check which session ran)

  // The bucket a batch of n samples runs on: the first that holds it (the last when none does; the
  // front never batches past max_batch, which the sizes end with).
  Bucket* bucket_for(int64_t n) {
    for (auto& b : buckets)
      if (b->size == 0 || b->size >= n) return b.get();
    return buckets.back().get();
  }
};

void release_values(std::vector<OrtValue*>& values) {
  for (auto*& v : values)
    if (v) ORT(ReleaseValue)(v), v = nullptr;
}

// Runs one batch; outs gets one value per output (the caller releases them), *run_samples the batch size
// it ran at (more than b.samples when padded up to its bucket).
std::string run(Session* s, const fv_batch& b, std::vector<OrtValue*>& outs, int64_t* run_samples) {
  if (b.ninputs != int(s->in_c.size())) return "the batch has " + std::to_string(b.ninputs) + " inputs, the session " +
                                               std::to_string(s->in_c.size());
  for (int i = 0; i < b.ninputs; ++i)  // ONNX Runtime checks the bytes against the shape; these it reads first
    if (b.rank[i] < 1 || b.rank[i] > kMaxRank || b.nbytes[i] < 0 || !b.data[i])
      return "input " + std::to_string(i) + " of the batch has a rank out of 1.." + std::to_string(kMaxRank) +
             " or no data";
  const int64_t n = b.samples;
  Bucket* bucket = s->bucket_for(n);
  const int64_t size = bucket->size > n ? bucket->size : n;
  s->runs++;
  bucket->runs++;
  *run_samples = size;
  std::vector<OrtValue*> ins(size_t(b.ninputs), nullptr);
  std::string err;
  for (int i = 0; i < b.ninputs && err.empty(); ++i) {
    void* data = const_cast<void*>(b.data[i]);
    size_t nbytes = size_t(b.nbytes[i]);
    int64_t dims[kMaxRank];
    std::copy(b.dims[i], b.dims[i] + b.rank[i], dims);
    if (size > n) {  // zeros after the batch's samples, which stay first, so that outputs cut back to them
      if (n < 1 || dims[0] != n || nbytes % size_t(n) != 0) {  // the inputs made so far are released below
        err = "input " + std::to_string(i) + " of the batch does not have its " + std::to_string(n) +
              " samples on the first axis; it cannot be padded";
        break;
      }
      const size_t grown = nbytes / size_t(n) * size_t(size);
      auto& buf = s->padded[size_t(i)];
      if (buf.size() < grown) buf.resize(grown);
      std::memcpy(buf.data(), data, nbytes);
      std::memset(buf.data() + nbytes, 0, grown - nbytes);
      data = buf.data();
      nbytes = grown;
      dims[0] = size;
    }
    err = error(ORT(CreateTensorWithDataAsOrtValue)(g_cpu, data, nbytes, dims, size_t(b.rank[i]), s->in_types[i],
                                                    &ins[i]));
  }
  outs.assign(s->out_c.size(), nullptr);
  if (err.empty())
    err = error(ORT(Run)(bucket->s, nullptr, s->in_c.data(), ins.data(), ins.size(), s->out_c.data(), outs.size(),
                         outs.data()));
  release_values(ins);
  return err;
}

// Hands a batch's outputs to the front, which copies them and answers the calls.
// A padded batch's outputs are cut back to its samples (the first rows, contiguous).
std::string complete(fv_front* front, const fv_batch& b, int64_t run_samples, int64_t compute_ns,
                     const std::vector<OrtValue*>& outs) {
  const int n = int(outs.size());
  if (n > kMaxTensors) return std::to_string(n) + " outputs; the fast port takes at most " + std::to_string(kMaxTensors);
  fv_output out[kMaxTensors] = {};
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
    if (err.empty()) err = error(ORT(GetDimensions)(info, out[o].dims, rank));
    if (info) ORT(ReleaseTensorTypeAndShapeInfo)(info);
    if (err.empty() && run_samples > b.samples) {
      if (out[o].dims[0] != run_samples)
        err = "output " + std::to_string(o) + " of a batch padded to " + std::to_string(run_samples) +
              " samples has " + std::to_string(out[o].dims[0]) + " on its first axis";
      else
        out[o].dims[0] = b.samples;
    }
    if (err.empty() && !dtype_name(type))
      err = "an output of ONNX element type " + std::to_string(type) + ", which the protocol cannot carry";
    void* p = nullptr;
    if (err.empty()) err = error(ORT(GetTensorMutableData)(outs[o], &p));
    if (!err.empty()) return err;
    out[o].dtype = dtype_name(type);
    out[o].data = p;
    out[o].rank = int32_t(rank);
  }
  // -2 (outputs that do not fit the batch) is answered by the front itself; -1 cannot happen here.
  fv_complete(front, b.id, compute_ns, n, out);
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
  std::vector<fv_batch_record> records;
  std::vector<double> waits;  // each record's calls' queue waits (s), in order
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

// Records and waits kept at most; past this (nobody reads them) batches go uncounted.
constexpr size_t kMaxRecords = size_t(1) << 22;

Session* session_of(fv_session* s) { return reinterpret_cast<Session*>(s); }
Instances* instances_of(fv_instances* in) { return reinterpret_cast<Instances*>(in); }

// Appends a provider (TensorRT's or CUDA's), with its options, to so: "" or why not. Both take their options
// the same way, through their own four entries.
template <typename Options, typename Create, typename Update, typename Append, typename Release>
std::string append_provider(OrtSessionOptions* so, const char* name, const std::vector<std::string>& keys,
                            const std::vector<std::string>& values, Create create, Update update, Append append,
                            Release release) {
  Options* options = nullptr;
  std::string e = error(create(&options));
  if (e.empty() && !keys.empty()) {
    std::vector<const char*> k, v;
    for (size_t i = 0; i < keys.size(); ++i) k.push_back(keys[i].c_str()), v.push_back(values[i].c_str());
    e = error(update(options, k.data(), v.data(), k.size()));
  }
  if (e.empty()) e = error(append(so, options));
  if (options) release(options);
  return e.empty() ? e : std::string(name) + ": " + e;
}

std::string append(OrtSessionOptions* so, const std::string& name, const std::vector<std::string>& keys,
                   const std::vector<std::string>& values) {
  if (name == "CUDAExecutionProvider")
    return append_provider<OrtCUDAProviderOptionsV2>(
        so, "the CUDA provider", keys, values, ORT(CreateCUDAProviderOptions), ORT(UpdateCUDAProviderOptions),
        ORT(SessionOptionsAppendExecutionProvider_CUDA_V2), ORT(ReleaseCUDAProviderOptions));
  if (name == "TensorrtExecutionProvider")
    return append_provider<OrtTensorRTProviderOptionsV2>(
        so, "the TensorRT provider", keys, values, ORT(CreateTensorRTProviderOptions),
        ORT(UpdateTensorRTProviderOptions), ORT(SessionOptionsAppendExecutionProvider_TensorRT_V2),
        ORT(ReleaseTensorRTProviderOptions));
  return "the C++ batch loop appends TensorrtExecutionProvider or CUDAExecutionProvider (the CPU's comes last by "
         "itself), not " + name;
}

}  // namespace

extern "C" {
#pragma GCC visibility push(default)

// Opens ONNX Runtime's library at path (once per process). 0, or -1 with a message in err.
int32_t fv_ort_init(const char* path, char* err, int32_t cap) {
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
const char* fv_ort_version(void) {
  return g_base ? g_base->GetVersionString() : "";
}

// The strings of an array from Python, or false when one is missing.
bool strings(const char* const* items, int n, std::vector<std::string>* out) {
  for (int i = 0; i < n; ++i) {
    if (!items || !items[i]) return false;
    out->emplace_back(items[i]);
  }
  return true;
}

// A session on a model held in memory (api.h): one, or one per batch bucket. NULL, with err, on failure.
fv_session* fv_ort_session(const fv_session_spec* spec, char* err, int32_t cap) {
  const fv_session_spec& sp = *spec;
  if (!g_api) return put_error(err, cap, "fv_ort_init has not run"), nullptr;
  if (sp.ninputs < 1 || sp.ninputs > kMaxTensors || sp.noutputs < 1 || sp.noutputs > kMaxTensors ||
      sp.nentries < 0 || sp.nentries > FV_MAX_OPTIONS || sp.nproviders < 0 || sp.nproviders > FV_MAX_PROVIDERS ||
      sp.nsizes < 0 || sp.nsizes > FV_MAX_BUCKETS)
    return put_error(err, cap, "inputs, outputs, options or batch sizes out of the fast port's limits"), nullptr;
  auto s = std::make_unique<Session>();
  std::vector<std::string> in_dtypes, keys, values;
  if (!sp.model || sp.model_len < 0 || !strings(sp.input_names, sp.ninputs, &s->in_names) ||
      !strings(sp.input_dtypes, sp.ninputs, &in_dtypes) || !strings(sp.output_names, sp.noutputs, &s->out_names) ||
      !strings(sp.keys, sp.nentries, &keys) || !strings(sp.values, sp.nentries, &values) ||
      (sp.nsizes > 0 && !sp.sizes) || (sp.nproviders > 0 && !sp.providers))
    return put_error(err, cap, "a session spec with a missing model, name, entry or batch size"), nullptr;
  struct Provider {
    std::string name;
    std::vector<std::string> keys, values;
  };
  std::vector<Provider> providers(size_t(sp.nproviders));
  for (int i = 0; i < sp.nproviders; ++i) {
    const fv_provider& p = sp.providers[i];
    if (!p.name || p.noptions < 0 || p.noptions > FV_MAX_OPTIONS || !strings(p.keys, p.noptions, &providers[i].keys) ||
        !strings(p.values, p.noptions, &providers[i].values))
      return put_error(err, cap, "a provider with a missing name or option, or too many options"), nullptr;
    providers[i].name = p.name;
  }
  for (int i = 0; i < sp.nsizes; ++i)
    if (sp.sizes[i] < 1 || (i > 0 && sp.sizes[i] <= sp.sizes[i - 1]))
      return put_error(err, cap, "batch sizes must be ascending and at least 1"), nullptr;
  for (const auto& dtype : in_dtypes) {
    s->in_types.push_back(element_type(dtype.c_str()));
    if (s->in_types.back() < 0) return put_error(err, cap, "input dtype " + dtype + " has no ONNX element type"), nullptr;
  }
  for (auto& n : s->in_names) s->in_c.push_back(n.c_str());
  for (auto& n : s->out_names) s->out_c.push_back(n.c_str());
  s->padded.resize(s->in_names.size());

  OrtSessionOptions* so = nullptr;
  std::string e = error(ORT(CreateSessionOptions)(&so));
  if (e.empty()) e = error(ORT(SetIntraOpNumThreads)(so, sp.intra_op_threads));
  if (e.empty()) e = error(ORT(SetInterOpNumThreads)(so, sp.inter_op_threads));
  if (e.empty()) e = error(ORT(SetSessionGraphOptimizationLevel)(so, sp.optimization_level));
  if (e.empty()) e = error(sp.cpu_mem_arena ? ORT(EnableCpuMemArena)(so) : ORT(DisableCpuMemArena)(so));
  for (size_t i = 0; i < keys.size() && e.empty(); ++i)
    e = error(ORT(AddSessionConfigEntry)(so, keys[i].c_str(), values[i].c_str()));
  for (size_t i = 0; i < providers.size() && e.empty(); ++i)
    e = append(so, providers[i].name, providers[i].keys, providers[i].values);
  // One session per bucket, on the same options: a session only ever sees its own batch size.
  const int nbuckets = sp.nsizes > 0 ? sp.nsizes : 1;
  for (int i = 0; i < nbuckets && e.empty(); ++i) {
    auto bucket = std::make_unique<Bucket>();
    bucket->size = sp.nsizes > 0 ? sp.sizes[i] : 0;
    e = error(ORT(CreateSessionFromArray)(g_env, sp.model, size_t(sp.model_len), so, &bucket->s));
    if (bucket->s) s->buckets.push_back(std::move(bucket));
  }
  if (so) ORT(ReleaseSessionOptions)(so);
  if (!e.empty()) {
    for (auto& bucket : s->buckets) ORT(ReleaseSession)(bucket->s);
    return put_error(err, cap, e), nullptr;
  }
  return reinterpret_cast<fv_session*>(s.release());
}

// Runs a batch and drops its outputs (warm-up). 0, or -1 with err.
int32_t fv_ort_run(fv_session* session, const fv_batch* in, char* err, int32_t cap) {
  std::vector<OrtValue*> outs;
  int64_t run_samples = 0;
  std::string e = run(session_of(session), *in, outs, &run_samples);
  release_values(outs);
  return e.empty() ? 0 : put_error(err, cap, e);
}

int64_t fv_ort_runs(fv_session* session) { return session_of(session)->runs; }

int64_t fv_ort_bucket_runs(fv_session* session, int32_t size) {
  for (auto& b : session_of(session)->buckets)
    if (b->size == size) return b->runs;
  return -1;
}

void fv_ort_free(fv_session* session) {
  auto* s = session_of(session);
  if (!s) return;
  for (auto& b : s->buckets) ORT(ReleaseSession)(b->s);
  delete s;
}

// The shared state of a version's batch loops; alone may be NULL.
fv_instances* fv_instances_new(fv_session* alone) {
  auto* in = new Instances();
  in->alone = session_of(alone);
  return reinterpret_cast<fv_instances*>(in);
}

void fv_instances_free(fv_instances* instances) { delete instances_of(instances); }

// One model instance's batch loop for a slot of the front; returns once the slot is closed and drained.
int32_t fv_serve(fv_front* front, int32_t slot, fv_session* session, fv_instances* instances, int32_t max_batch) {
  auto* s = session_of(session);
  auto* in = instances_of(instances);
  fv_batch b{};
  std::vector<double> waits(size_t(max_batch > 0 ? max_batch : 1));
  std::vector<OrtValue*> outs;
  while (true) {
    int got = fv_next_batch(front, slot, 250, &b, waits.data(), int32_t(waits.size()));
    if (b.expired || b.cancelled) {
      std::lock_guard lock(in->rec_mu);
      in->expired += b.expired;
      in->cancelled += b.cancelled;
    }
    if (got < 0) return 0;
    if (got == 0) continue;
    bool alone = in->acquire(b.queued);
    int64_t t0 = now_ns(), run_samples = b.samples;
    std::string err = run(alone ? in->alone : s, b, outs, &run_samples);
    int64_t compute_ns = now_ns() - t0;
    in->release(alone);
    if (err.empty()) err = complete(front, b, run_samples, compute_ns, outs);
    release_values(outs);
    if (!err.empty()) fv_fail(front, b.id, 13, ("model failed on this batch: " + err.substr(0, 200)).c_str());  // INTERNAL
    std::lock_guard lock(in->rec_mu);
    if (!err.empty()) {
      in->failed++;
      in->last_error = err.substr(0, 300);
      continue;
    }
    const size_t calls = std::min(size_t(b.calls), waits.size());
    if (in->records.size() >= kMaxRecords || in->waits.size() + calls > kMaxRecords) {
      in->lost++;
      continue;
    }
    in->records.push_back(fv_batch_record{b.samples, int32_t(run_samples), int32_t(calls), double(compute_ns) / 1e9});
    in->waits.insert(in->waits.end(), waits.begin(), waits.begin() + long(calls));
  }
}

// Moves whole batch records into io, as many as fit (api.h); returns how many.
int32_t fv_take_records(fv_instances* instances, fv_records* io) {
  auto* in = instances_of(instances);
  std::lock_guard lock(in->rec_mu);
  // The caller's room: none without an array.
  const size_t records_cap = io->records ? size_t(std::max(io->records_cap, 0)) : 0;
  const size_t waits_cap = io->waits ? size_t(std::max(io->waits_cap, 0)) : 0;
  size_t n = 0, nwaits = 0;
  while (n < in->records.size() && n < records_cap) {
    const size_t calls = size_t(in->records[n].calls);
    if (nwaits + calls > waits_cap) break;
    nwaits += calls;
    n += 1;
  }
  // data() may be null when empty
  if (n > 0) std::memcpy(io->records, in->records.data(), n * sizeof(fv_batch_record));
  if (nwaits > 0) std::memcpy(io->waits, in->waits.data(), nwaits * sizeof(double));
  in->records.erase(in->records.begin(), in->records.begin() + long(n));
  in->waits.erase(in->waits.begin(), in->waits.begin() + long(nwaits));
  io->nrecords = int32_t(n);
  io->nwaits = int32_t(nwaits);
  io->expired = in->expired;
  io->cancelled = in->cancelled;
  io->failed = in->failed;
  io->lost = in->lost;
  in->expired = in->cancelled = in->failed = in->lost = 0;
  put_error(io->last_error, int(sizeof io->last_error), in->last_error);
  in->last_error.clear();
  return int32_t(n);
}

#pragma GCC visibility pop
}  // extern "C"
