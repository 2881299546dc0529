// Fovea's native inference front: the worker's one public gRPC port.
//
// Python keeps everything but the hot path: it loads and warms up models and decides
// routing. This file takes ModelInfer calls on raw tensors off the wire, validates them, queues them per model
// version, hands whole batches as contiguous buffers to the batch loops (ort_loop.cc on
// the CPU, Python otherwise) and splits the outputs back. Calls with encoded images wait on its image queue
// for Python's decode threads (worker/decoding.py), whose tensor then takes the same path. Every other call
// (calls to trace, versions it does not hold, streams, health, metadata) goes to the worker's Python server through
// relay.cc. A Python
// gRPC server costs about 0.2 ms of CPU per call here, more than a small model's compute; this costs a few µs. The C ABI (fv_*) is what
// worker/fast_port.py calls through its cffi binding (api.h), which releases the GIL around each call.

#include <absl/synchronization/mutex.h>
#include <google/protobuf/stubs/logging.h>
#include <grpcpp/grpcpp.h>
#include <malloc.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <shared_mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "auth.h"
#include "canary.h"
#include "check.h"
#include "api.h"
#include "front.h"
#include "relay.h"
#include "inference/grpc_predict_v2.grpc.pb.h"

namespace {

using inference::ModelInferRequest;
using inference::ModelInferResponse;
using Clock = std::chrono::steady_clock;
using SysClock = std::chrono::system_clock;
using grpc::Status;
using grpc::StatusCode;
using fovea::dtype_size;

// Trailing metadata on a call this worker refused without running it.
constexpr char kUnserved[] = "fovea-unserved";

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

// A call validate accepted (n and order come from it). ModelInfer takes its bytes raw and parses them
// into request itself (gRPC's typed handler answers bytes that do not parse with a bare UNIMPLEMENTED);
// finish serializes response into out.
// A call the worker's Python server submitted (fv_submit: a call it traces, its images decoded): its
// thread waits for the answer here instead of a reactor.
struct Local {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  Status status;
  std::string response;  // the serialized ModelInferResponse, when status is OK
  fv_call_timing timing{};  // for a trace
};

struct Call : fovea::Checked {
  grpc::CallbackServerContext* ctx = nullptr;  // null for a Local one
  Local* local = nullptr;
  ModelInferRequest request;
  ModelInferResponse response;
  const ModelInferRequest* req = &request;
  ModelInferResponse* resp = &response;
  grpc::ByteBuffer* out = nullptr;
  grpc::ServerUnaryReactor* reactor = nullptr;
  int64_t enqueued_ns = 0, started_ns = 0;
  int64_t arrived_ns = 0;  // an image call's arrival, before decoding (0: it arrived when it was enqueued)
  SysClock::time_point deadline;
};

}  // namespace

// Bounds of the request-time buckets in ns, from 50 us (overhead of a tiny model) to 10 s (a loaded CPU).
extern "C" const int64_t fv_time_bounds_ns[FV_TIME_BOUNDS] = {
    50'000,     100'000,     250'000,     500'000,       1'000'000,     2'500'000,     5'000'000,     10'000'000,
    25'000'000, 50'000'000, 100'000'000, 250'000'000, 500'000'000, 1'000'000'000, 2'500'000'000, 10'000'000'000};

namespace {

const int64_t* const kTimeBoundsNs = fv_time_bounds_ns;
constexpr int kTimeBuckets = FV_TIME_BOUNDS + 1;  // the last is +Inf
static_assert(kTimeBuckets == FV_TIME_BUCKETS && kTimeBuckets - 1 == FV_TIME_BOUNDS, "api.h's bucket counts");

// Per-version figures in Triton's ModelStatistics terms (see statistics()).
enum StatIndex { kOkCount, kOkNs, kFailCount, kFailNs, kQueueCount, kQueueNs, kInputNs, kOutputNs, kInferCount,
                 kInferNs, kSamples, kLastMs, kStats };

// A version's spec (name, max_batch, inputs, outputs) and its queue.
struct Model : fovea::ModelSpec {
  std::string version;
  size_t max_queue = 1024;
  int64_t max_queue_delay_us = 0;
  std::set<int> preferred;  // batch sizes to stop collecting at
  std::atomic<int64_t>* codes = nullptr;  // the front's counts by status code
  std::vector<std::string> labels;
  bool probabilities = false;
  int slot = 0;

  std::mutex mu;
  std::condition_variable cv;
  std::deque<Call*> queue;
  bool accepting = true;
  int busy = 0;      // batches handed out and not yet completed
  int decoding = 0;  // image calls on the front's image queue or being decoded; they count against max_queue
  std::atomic<int64_t> stats[kStats] = {};
  std::atomic<int64_t> ok_times[kTimeBuckets] = {};  // successful calls by total time (not cumulative)
  std::map<int, std::pair<int64_t, int64_t>> by_batch;  // batch size -> (count, compute ns); under mu

  // Triton's counts: success/fail/queue per request; compute per batch (perf_analyzer checks that
  // input, infer and output counts agree, so the per-request input and output times count per batch).
  inference::ModelStatistics statistics() {
    inference::ModelStatistics out;
    out.set_name(name);
    out.set_version(version);
    out.set_last_inference(stats[kLastMs]);
    out.set_inference_count(stats[kSamples]);
    // Read once: a batch finishing between reads would make the three compute counts differ, which
    // perf_analyzer rejects ("Server side statistics compute counts must be the same").
    const int64_t batches = stats[kInferCount];
    out.set_execution_count(batches);
    auto* is = out.mutable_inference_stats();
    auto put = [](inference::StatisticDuration* d, int64_t count, int64_t ns) { d->set_count(count); d->set_ns(ns); };
    put(is->mutable_success(), stats[kOkCount], stats[kOkNs]);
    put(is->mutable_fail(), stats[kFailCount], stats[kFailNs]);
    put(is->mutable_queue(), stats[kQueueCount], stats[kQueueNs]);
    put(is->mutable_compute_input(), batches, stats[kInputNs]);
    put(is->mutable_compute_infer(), batches, stats[kInferNs]);
    put(is->mutable_compute_output(), batches, stats[kOutputNs]);
    std::lock_guard lock(mu);
    for (const auto& [size, cn] : by_batch) {
      auto* b = out.add_batch_stats();
      b->set_batch_size(size);
      put(b->mutable_compute_infer(), cn.first, cn.second);
    }
    return out;
  }
};

struct Batch {
  std::shared_ptr<Model> model;
  int64_t id = 0, computed_ns = 0;
  std::vector<Call*> calls;
  std::vector<std::string> buffers;  // concatenated inputs when the batch holds several calls
  int samples = 0;
  // Filled by fv_complete: a copy of each output, for the answering thread.
  std::vector<std::string> outputs, dtypes;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<size_t> row_bytes;
};

// An image call between its arrival and its tensor: on the front's image queue, then with a decode thread.
struct ImageJob {
  int64_t id = 0;
  std::shared_ptr<Model> model;
  Call* call = nullptr;
  std::string tensor;  // the BYTES input, serialized for Python (oip.bytes_input reads it)
};

class Front;

// ModelInfer is registered raw (ByteBuffers); every other method is left to the generic relay (relay.cc).
using gen = inference::GRPCInferenceService;
using Relayed = gen::WithGenericMethod_ServerLive<gen::WithGenericMethod_ServerReady<gen::WithGenericMethod_ModelReady<
    gen::WithGenericMethod_ServerMetadata<gen::WithGenericMethod_ModelMetadata<gen::WithGenericMethod_ModelStreamInfer<
        gen::WithGenericMethod_ModelStatistics<gen::WithGenericMethod_ModelConfig<gen::Service>>>>>>>>;

class Service final : public gen::WithRawCallbackMethod_ModelInfer<Relayed> {
 public:
  explicit Service(Front* f) : front_(f) {}
  grpc::ServerUnaryReactor* ModelInfer(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* bytes,
                                       grpc::ByteBuffer* out) override;

 private:
  Front* front_;
};

class Front {
 public:
  std::vector<std::string> tokens;
  int64_t default_deadline_ms = 30000;
  std::atomic<bool> accepting{true};
  bool trace_sampled = false;  // relay calls with a sampled traceparent to Python, which traces them
  std::unique_ptr<fovea::Relay> relay;  // declared before the server, so destroyed after it
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<Service> service;
  bool stopped = false;

  std::shared_mutex routes_mu;
  std::unordered_map<std::string, std::shared_ptr<Model>> by_version;  // "name\nversion"
  std::unordered_map<std::string, std::vector<std::pair<std::shared_ptr<Model>, int>>> by_name;
  std::unordered_map<int, std::shared_ptr<Model>> slots;
  int next_slot = 1;

  std::mutex batches_mu;
  std::unordered_map<int64_t, std::unique_ptr<Batch>> batches;
  int64_t next_batch = 1;

  // Image calls for the decode threads (fv_next_images): queued, then taken until their tensor comes back.
  std::mutex jobs_mu;
  std::condition_variable jobs_cv;
  std::deque<std::unique_ptr<ImageJob>> jobs;
  std::unordered_map<int64_t, std::unique_ptr<ImageJob>> taken;
  int64_t next_job = 1;
  bool jobs_closed = false;  // after fv_shutdown: decode threads end

  std::mutex answers_mu;
  std::condition_variable answers_cv;
  std::deque<std::unique_ptr<Batch>> answers;
  bool stopping = false;
  std::thread answerer;

  std::shared_ptr<Model> model(int slot) {
    std::shared_lock lock(routes_mu);
    auto it = slots.find(slot);
    return it == slots.end() ? nullptr : it->second;
  }

  // The version a call without one goes to: a target of the model's route, by weight (fovea/canary.h, the
  // native parts' one canary pick). Python asks it too (fv_pick_version). Null when the model has no route.
  // routes_mu held.
  std::shared_ptr<Model> pick(const std::string& name) {
    auto it = by_name.find(name);
    if (it == by_name.end() || it->second.empty()) return nullptr;
    const auto& targets = it->second;
    if (targets.size() == 1) return targets[0].first;
    thread_local std::mt19937_64 rng{std::random_device{}()};
    double unit = std::uniform_real_distribution<double>(0, 1)(rng);
    return targets[fovea::canary::pick(targets, [](const auto& t) { return t.second; }, unit)].first;
  }

  Status lookup(const std::string& name, const std::string& version, std::shared_ptr<Model>* out) {
    std::shared_lock lock(routes_mu);
    if (version.empty()) {
      *out = pick(name);
      if (!*out) return Status(StatusCode::NOT_FOUND, "model '" + name + "' has no version on the native front");
      return Status::OK;
    }
    auto it = by_version.find(name + "\n" + version);
    if (it == by_version.end())
      return Status(StatusCode::NOT_FOUND, "model " + name + " v" + version + " is not loaded on this worker");
    *out = it->second;
    return Status::OK;
  }

  // A call of this port, from here on owned by the queues: its reactor, and its deadline (the caller's, else
  // the default).
  Call* adopt(std::unique_ptr<Call> owned, grpc::CallbackServerContext* ctx, grpc::ByteBuffer* out,
              grpc::ServerUnaryReactor* reactor) const {
    Call* call = owned.release();
    call->ctx = ctx;
    call->out = out;
    call->reactor = reactor;
    call->deadline = ctx->deadline();
    if (call->deadline == SysClock::time_point::max())
      call->deadline = SysClock::now() + std::chrono::milliseconds(default_deadline_ms);
    return call;
  }

  // Puts an image call on the image queue, or says why not (and frees it). The version's queue bound counts
  // these calls too, so a flood of images is refused before any is decoded.
  Status queue_images(const std::shared_ptr<Model>& m, Call* call) {
    auto job = std::make_unique<ImageJob>();
    job->model = m;
    job->call = call;
    {
      std::lock_guard lock(m->mu);
      if (!m->accepting) {
        delete call;
        return Status(StatusCode::UNAVAILABLE, "model " + m->name + " v" + m->version + " is unloading; retry");
      }
      if (m->queue.size() + size_t(m->decoding) >= m->max_queue) {
        delete call;
        m->stats[kFailCount] += 1;
        return Status(StatusCode::RESOURCE_EXHAUSTED, "queue of model " + m->name + ":" + m->version + " is full (" +
                                                          std::to_string(m->max_queue) + " requests); retry later");
      }
      m->decoding++;
    }
    call->request.inputs(0).SerializeToString(&job->tensor);
    {
      std::lock_guard lock(jobs_mu);
      if (!jobs_closed) {
        job->id = next_job++;
        jobs.push_back(std::move(job));
        jobs_cv.notify_one();
        return Status::OK;
      }
    }
    images_settled(m.get());
    delete call;
    return Status(StatusCode::UNAVAILABLE, "worker is shutting down; retry on another worker");
  }

  // An image call left the image queue and the decode threads (answered, or queued as a tensor).
  static void images_settled(Model* m) {
    std::lock_guard lock(m->mu);
    m->decoding--;
  }

  std::unique_ptr<ImageJob> take_job(int64_t id) {
    std::lock_guard lock(jobs_mu);
    auto it = taken.find(id);
    if (it == taken.end()) return nullptr;
    auto job = std::move(it->second);
    taken.erase(it);
    return job;
  }

  // Same trailing shape for every input, so that calls can share one batch.
  static bool same_shape(const Call* a, const Call* b, int nin) {
    for (int s = 0; s < nin; ++s) {
      const auto& x = a->req->inputs(a->order[s]).shape();
      const auto& y = b->req->inputs(b->order[s]).shape();
      for (int d = 1; d < x.size(); ++d)
        if (x[d] != y[d]) return false;
    }
    return true;
  }

  std::atomic<int64_t> codes[FV_STATUS_CODES] = {};  // ModelInfer calls answered, by status code

  // Answers a call and counts it. The counts come before the answer, so that a caller who got it finds them;
  // its time includes encoding the answer, which Triton's success time holds (compute output does not).
  static void finish(Call* c, const Status& st, Model* m) {
    Status sent = st;
    std::string body;
    if (c->local) {
      if (st.ok() && !c->resp->SerializeToString(&body))
        sent = Status(StatusCode::INTERNAL, "the answer could not be serialized");
    } else if (st.ok()) {  // what gRPC's typed handler would do in Finish
      bool own_buffer;
      sent = grpc::SerializationTraits<ModelInferResponse>::Serialize(*c->resp, c->out, &own_buffer);
    }
    if (m) {
      const int64_t spent = now_ns() - (c->arrived_ns ? c->arrived_ns : c->enqueued_ns);
      m->stats[sent.ok() ? kOkCount : kFailCount] += 1;
      m->stats[sent.ok() ? kOkNs : kFailNs] += spent;
      if (sent.ok()) {
        int b = 0;
        while (b < kTimeBuckets - 1 && spent > kTimeBoundsNs[b]) ++b;
        m->ok_times[b] += 1;
      }
      m->codes[std::min<int>(sent.error_code(), 16)] += 1;
    }
    if (c->local) {
      // Notified under the lock: once done is seen, fv_submit returns and its Local (on its stack) is gone.
      Local* l = c->local;
      std::lock_guard lock(l->mu);
      l->status = sent;
      l->response = std::move(body);
      l->done = true;
      l->cv.notify_one();
    } else {
      c->reactor->Finish(sent);
    }
    delete c;
  }
};

// Whether the caller's W3C traceparent ('00-<32 hex>-<16 hex>-<2 hex flags>', 55 characters in version 00)
// asks for this call to be traced: flags bit 0 of the last value sent. Python parses it again and traces.
bool sampled(const grpc::CallbackServerContext* ctx) {
  auto range = ctx->client_metadata().equal_range("traceparent");
  if (range.first == range.second) return false;
  std::string tp;
  for (auto it = range.first; it != range.second; ++it) tp.assign(it->second.data(), it->second.size());
  if (tp.size() < 55 || tp.size() > 128) return false;
  if (tp[2] != '-' || tp[35] != '-' || tp[52] != '-' || (tp.size() > 55 && tp[55] != '-')) return false;
  char c = tp[54];
  int low = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
  return low >= 0 && (low & 1);
}

Status enqueue(Model* m, Call* call);

// One input, BYTES, its data in typed contents or in one raw_input_contents entry: encoded images. Whether
// its model takes images, and everything else about them, the decode threads say (worker/decoding.py).
bool images_call(const ModelInferRequest& req) {
  return req.inputs_size() == 1 && req.inputs(0).datatype() == "BYTES" && req.raw_input_contents_size() <= 1;
}

grpc::ServerUnaryReactor* Service::ModelInfer(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* bytes,
                                              grpc::ByteBuffer* out) {
  auto* reactor = ctx->DefaultReactor();
  int64_t t0 = now_ns();
  auto reject = [&](StatusCode code, const std::string& msg) {
    front_->codes[std::min<int>(code, 16)] += 1;
    // Every UNAVAILABLE here is a refusal before any work: a gateway may send the call elsewhere,
    // which it must not do for a call that dropped while it ran (it could kill the next worker too).
    if (code == StatusCode::UNAVAILABLE) ctx->AddTrailingMetadata(kUnserved, "1");
    reactor->Finish(Status(code, msg));
    return reactor;
  };
  Status auth = fovea::authenticate(*ctx, front_->tokens);
  if (!auth.ok()) return reject(auth.error_code(), auth.error_message());
  // The relay sends Python the bytes as they came: a copy that shares their slices (no data is copied).
  grpc::ByteBuffer original(*bytes);
  // The bytes are parsed as gRPC's typed handler parses them (the same call, which also frees them; the
  // handler owns the buffer, and nothing reads it after this), but after authentication, and bytes that
  // are no ModelInferRequest get the Python server's answer.
  std::unique_ptr<Call> owned(new Call);
  if (!grpc::SerializationTraits<ModelInferRequest>::Deserialize(const_cast<grpc::ByteBuffer*>(bytes), &owned->request).ok())
    return reject(StatusCode::INVALID_ARGUMENT, "the request is not a valid protobuf message for this method");
  if (!front_->accepting) return reject(StatusCode::UNAVAILABLE, "worker is draining; retry on another worker");
  // Typed contents become raw tensors here, for every call: the Python server never reads them.
  bool read = false;
  Status contents = fovea::read_contents(&owned->request, &read);
  if (!contents.ok()) return reject(contents.error_code(), contents.error_message());
  const ModelInferRequest* req = owned->req;

  // Encoded images (one BYTES input) for a version this front holds go to the decode threads, which hand
  // back a tensor that takes the same path as any other. Typed contents, versions this front does not hold
  // (loading, not ready, not loaded, too many inputs for it) and calls to trace are Python's server's: it
  // reads them, or says why not.
  std::shared_ptr<Model> m;
  const bool traced = front_->trace_sampled && sampled(ctx);
  if (!traced && images_call(*req) && front_->lookup(req->model_name(), req->model_version(), &m).ok() &&
      m->inputs.size() == 1) {
    Call* call = front_->adopt(std::move(owned), ctx, out, reactor);
    call->arrived_ns = t0;
    Status st = front_->queue_images(m, call);
    if (!st.ok()) return reject(st.error_code(), st.error_message());
    return reactor;
  }
  if (!fovea::raw_tensors(*req) || traced || !front_->lookup(req->model_name(), req->model_version(), &m).ok()) {
    if (read) {  // relayed as read (a call to trace, a version not held here): Python never reads contents
      std::string body;
      owned->request.SerializeToString(&body);
      grpc::Slice slice(body);
      original = grpc::ByteBuffer(&slice, 1);
    }
    front_->relay->unary(ctx, "/inference.GRPCInferenceService/ModelInfer", original, out, reactor);
    return reactor;
  }
  Status st = fovea::validate(*m, *req, owned.get());
  if (!st.ok()) {
    m->stats[kFailCount] += 1;
    return reject(st.error_code(), st.error_message());
  }
  Call* call = front_->adopt(std::move(owned), ctx, out, reactor);
  call->enqueued_ns = t0;
  m->stats[kInputNs] += now_ns() - t0;
  st = enqueue(m.get(), call);
  if (!st.ok()) return reject(st.error_code(), st.error_message());
  return reactor;
}

// Queues a validated call, or says why not (and frees it).
Status enqueue(Model* m, Call* call) {
  {
    std::lock_guard lock(m->mu);
    if (!m->accepting) {
      delete call;
      return Status(StatusCode::UNAVAILABLE, "model " + m->name + " v" + m->version + " is unloading; retry");
    }
    if (m->queue.size() >= m->max_queue) {
      delete call;
      m->stats[kFailCount] += 1;
      return Status(StatusCode::RESOURCE_EXHAUSTED, "queue of model " + m->name + ":" + m->version + " is full (" +
                                                        std::to_string(m->max_queue) + " requests); retry later");
    }
    m->queue.push_back(call);
  }
  m->cv.notify_one();
  return Status::OK;
}

// libprotobuf logs an ERROR for every string field that is not UTF-8 (and the parse fails, which the
// caller is told): any caller could flood the worker's log with them at no cost. Its log goes here
// instead: at most one line a minute, with a count of those left out; FATAL ones always.
void protobuf_log(google::protobuf::LogLevel level, const char* file, int line, const std::string& message) {
  static std::atomic<int64_t> next_ns{0}, left_out{0};
  constexpr int64_t kEveryNs = 60'000'000'000;
  if (level < google::protobuf::LOGLEVEL_FATAL) {
    int64_t now = now_ns(), next = next_ns.load();
    if (now < next || !next_ns.compare_exchange_strong(next, now + kEveryNs)) {
      left_out += 1;
      return;
    }
  }
  static const char* const kLevels[] = {"INFO", "WARNING", "ERROR", "FATAL"};
  const int64_t n = left_out.exchange(0);
  std::string more = n ? " (" + std::to_string(n) + " more since the last line shown were left out)" : "";
  std::fprintf(stderr, "[libprotobuf %s %s:%d] %s%s\n", kLevels[std::clamp<int>(level, 0, 3)], file, line,
               message.c_str(), more.c_str());
}

// The handle Python holds is the Front itself.
Front* of(fv_front* fp) { return reinterpret_cast<Front*>(fp); }

// The first n strings of an array that may be NULL when n is 0; NULL entries read as "".
std::string at(const char* const* items, int i) { return items && items[i] ? items[i] : ""; }

// Times from Python are added to clock readings in ns: past a year they could overflow, and mean nothing.
constexpr int64_t kMaxMs = int64_t(366) * 24 * 3600 * 1000;
int64_t bounded_ms(int64_t ms) { return std::clamp<int64_t>(ms, 0, kMaxMs); }

}  // namespace

extern "C" {
#pragma GCC visibility push(default)

static void answer(Batch* b);

// Starts the worker's public port (api.h); NULL on failure (the port taken, say).
fv_front* fv_start(const fv_front_options* options, int32_t* port_out) {
  const fv_front_options& o = *options;
  if (!o.address || !o.upstream || o.ntokens < 0 || o.max_message_bytes < 0) return nullptr;
  // Keep freed buffers in the heap: gRPC allocates a fresh buffer for every large message, and
  // returning each to the kernel costs a page fault and a zeroed page per 4 KiB on the next one.
  // Only when the environment did not set them.
  if (!getenv("MALLOC_MMAP_THRESHOLD_")) mallopt(M_MMAP_THRESHOLD, 32 << 20);
  if (!getenv("MALLOC_TRIM_THRESHOLD_")) mallopt(M_TRIM_THRESHOLD, 128 << 20);
  // Debian builds Abseil with mutex deadlock detection on: a cycle check on every lock gRPC takes.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  static std::once_flag log_once;  // SetLogHandler is not thread-safe
  std::call_once(log_once, [] { google::protobuf::SetLogHandler(protobuf_log); });
  auto* f = new Front();
  for (int i = 0; i < o.ntokens; ++i)
    if (!at(o.tokens, i).empty()) f->tokens.push_back(at(o.tokens, i));
  f->default_deadline_ms = bounded_ms(o.default_deadline_ms);
  const char* cert_pem = o.cert_pem;
  const char* key_pem = o.key_pem;
  const char* client_ca_pem = o.client_ca_pem;
  f->service = std::make_unique<Service>(f);
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (cert_pem && *cert_pem) {
    const bool mutual = client_ca_pem && *client_ca_pem;
    grpc::SslServerCredentialsOptions ssl(mutual ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                                 : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    ssl.pem_key_cert_pairs.push_back({key_pem ? key_pem : "", cert_pem});
    if (mutual) ssl.pem_root_certs = client_ca_pem;
    creds = grpc::SslServerCredentials(ssl);
  }
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(o.address, creds, &port);
  builder.SetMaxReceiveMessageSize(o.max_message_bytes);
  builder.SetMaxSendMessageSize(o.max_message_bytes);
  // Let a peer send a whole tensor in big frames without waiting for window updates.
  builder.AddChannelArgument("grpc.http2.max_frame_size", 1 << 20);
  builder.AddChannelArgument("grpc.http2.lookahead_bytes", 8 << 20);
  // Accept the gateways' keepalive pings (fovea/config.py channel_options: every 10 s, even when idle);
  // the default policy answers them with GOAWAY "too_many_pings" and drops the connection.
  builder.AddChannelArgument("grpc.keepalive_permit_without_calls", 1);
  builder.AddChannelArgument("grpc.http2.min_recv_ping_interval_without_data_ms", 5000);
  builder.AddChannelArgument("grpc.http2.max_ping_strikes", 0);
  builder.AddChannelArgument("grpc.so_reuseport", 0);
  builder.RegisterService(f->service.get());
  f->relay = std::make_unique<fovea::Relay>(&builder, o.upstream, o.max_message_bytes, f->tokens);
  f->server = builder.BuildAndStart();
  *port_out = port;
  if (!f->server || port == 0) {
    f->server.reset();
    f->relay->stop();
    delete f;
    return nullptr;
  }
  f->relay->start();
  f->answerer = std::thread([f] {
    std::unique_lock lock(f->answers_mu);
    while (true) {
      f->answers_cv.wait(lock, [f] { return f->stopping || !f->answers.empty(); });
      if (f->answers.empty()) return;
      auto b = std::move(f->answers.front());
      f->answers.pop_front();
      lock.unlock();
      answer(b.get());
      lock.lock();
    }
  });
  return reinterpret_cast<fv_front*>(f);
}

// A tensor spec from api.h's, or false when it is out of the front's limits.
static bool tensor_spec(const fv_tensor_spec& t, int min_rank, fovea::TensorSpec* out) {
  if (!t.name || !t.dtype || t.rank < min_rank || t.rank > kMaxRank) return false;
  *out = fovea::TensorSpec{t.name, t.dtype, std::vector<int64_t>(t.dims, t.dims + t.rank), dtype_size(t.dtype)};
  return true;
}

// Adds a model version (api.h). Returns its slot, or -1.
int32_t fv_add_model(fv_front* fp, const fv_model_spec* spec) {
  auto* f = of(fp);
  const fv_model_spec& sp = *spec;
  if (!sp.name || !sp.version || sp.ninputs < 1 || sp.ninputs > kMaxTensors || sp.noutputs < 1 ||
      sp.noutputs > kMaxTensors || sp.max_batch < 1 || sp.max_queue < 0 || sp.max_queue_delay_us < 0 || sp.max_queue_delay_us > kMaxMs * 1000 ||
      sp.npreferred < 0 || sp.nlabels < 0 || (sp.npreferred > 0 && !sp.preferred) || !sp.inputs || !sp.outputs)
    return -1;
  auto m = std::make_shared<Model>();
  m->name = sp.name;
  m->version = sp.version;
  m->max_batch = sp.max_batch;
  m->max_queue = size_t(sp.max_queue);
  m->max_queue_delay_us = sp.max_queue_delay_us;
  if (sp.npreferred > 0) m->preferred.insert(sp.preferred, sp.preferred + sp.npreferred);
  m->probabilities = sp.probabilities != 0;
  for (int i = 0; i < sp.ninputs; ++i) {
    fovea::TensorSpec s;
    if (!tensor_spec(sp.inputs[i], 1, &s) || s.elem == 0) return -1;
    m->inputs.push_back(std::move(s));
  }
  // Outputs as the model declares them: validate bounds a classification k by their width.
  for (int i = 0; i < sp.noutputs; ++i) {
    fovea::TensorSpec s;
    if (!tensor_spec(sp.outputs[i], 0, &s)) return -1;
    m->outputs.push_back(std::move(s));
  }
  for (int i = 0; i < sp.nlabels; ++i) m->labels.push_back(at(sp.labels, i));
  m->codes = f->codes;
  std::unique_lock lock(f->routes_mu);
  int slot = f->next_slot++;
  m->slot = slot;
  f->slots[slot] = m;
  f->by_version[m->name + "\n" + m->version] = m;
  return slot;
}

// Where calls without a version go: slots with weights (a canary splits by weight).
int32_t fv_route(fv_front* fp, const char* name, int32_t ntargets, const fv_route_target* targets_in) {
  auto* f = of(fp);
  if (!name || ntargets < 0 || (ntargets > 0 && !targets_in)) return -1;
  std::unique_lock lock(f->routes_mu);
  std::vector<std::pair<std::shared_ptr<Model>, int>> targets;
  for (int i = 0; i < ntargets; ++i) {
    auto it = f->slots.find(targets_in[i].slot);
    if (it == f->slots.end() || targets_in[i].weight < 0) return -1;
    targets.emplace_back(it->second, targets_in[i].weight);
  }
  if (targets.empty()) f->by_name.erase(name);
  else f->by_name[name] = std::move(targets);
  return 0;
}

int64_t fv_pick_version(fv_front* fp, const char* name) {
  auto* f = of(fp);
  if (!name) return 0;
  std::shared_lock lock(f->routes_mu);
  std::shared_ptr<Model> m = f->pick(name);
  int64_t v = 0;
  for (char c : m ? m->version : std::string()) {
    if (c < '0' || c > '9' || v >= (int64_t(1) << 58)) return 0;  // Python names versions in decimal: never
    v = v * 10 + (c - '0');
  }
  return v;
}

// Stops taking calls for a slot; queued ones are still handed out, then fv_next_batch returns -1.
void fv_close_model(fv_front* fp, int32_t slot) {
  auto* f = of(fp);
  std::shared_ptr<Model> m;
  {
    std::unique_lock lock(f->routes_mu);
    auto it = f->slots.find(slot);
    if (it == f->slots.end()) return;
    m = it->second;
    auto v = f->by_version.find(m->name + "\n" + m->version);
    if (v != f->by_version.end() && v->second == m) f->by_version.erase(v);
    for (auto& [name, targets] : f->by_name)
      targets.erase(std::remove_if(targets.begin(), targets.end(), [&](auto& t) { return t.first == m; }), targets.end());
  }
  std::lock_guard lock(m->mu);
  m->accepting = false;
  m->cv.notify_all();
}

void fv_release_model(fv_front* fp, int32_t slot) {
  auto* f = of(fp);
  std::unique_lock lock(f->routes_mu);
  f->slots.erase(slot);
}

// Waits up to timeout_ms for calls and hands out a batch (api.h).
int32_t fv_next_batch(fv_front* fp, int32_t slot, int32_t timeout_ms, fv_batch* out, double* waits_s,
                      int32_t waits_cap) {
  auto* f = of(fp);
  std::shared_ptr<Model> m = f->model(slot);
  if (!m) return -1;
  auto batch = std::make_unique<Batch>();
  batch->model = m;
  std::vector<Call*> dropped;
  const int nin = int(m->inputs.size());
  out->expired = out->cancelled = 0;
  {
    std::unique_lock lock(m->mu);
    if (!m->cv.wait_until(lock, Clock::now() + std::chrono::milliseconds(timeout_ms),
                          [&] { return !m->queue.empty() || !m->accepting; }))
      return 0;
    if (m->queue.empty()) return -1;  // closed, and nothing left to answer
    // Takes queued calls while they fit; true once the batch can take no more (full, at a preferred
    // size, or the next call does not fit or has another shape).
    auto collect = [&] {
      auto sys_now = SysClock::now();
      while (!m->queue.empty()) {
        Call* c = m->queue.front();
        if ((c->ctx && c->ctx->IsCancelled()) || c->deadline <= sys_now) {
          m->queue.pop_front();
          dropped.push_back(c);
          continue;
        }
        if (batch->samples + c->n > m->max_batch) return true;
        if (!batch->calls.empty() && !Front::same_shape(batch->calls[0], c, nin)) return true;
        m->queue.pop_front();
        batch->calls.push_back(c);
        batch->samples += c->n;
        if (batch->samples == m->max_batch || m->preferred.count(batch->samples)) return true;
      }
      return false;
    };
    bool full = collect();
    if (!full && !batch->calls.empty() && m->max_queue_delay_us > 0) {
      auto fill_until = Clock::now() + std::chrono::microseconds(m->max_queue_delay_us);
      while (!full && m->cv.wait_until(lock, fill_until, [&] { return !m->queue.empty(); })) full = collect();
    }
    if (!batch->calls.empty()) m->busy++;
    out->queued = int32_t(m->queue.size());
  }
  for (Call* c : dropped) {
    bool cancelled = c->ctx && c->ctx->IsCancelled();
    (cancelled ? out->cancelled : out->expired) += 1;
    Front::finish(c, cancelled ? Status(StatusCode::CANCELLED, "cancelled by the caller before compute")
                               : Status(StatusCode::DEADLINE_EXCEEDED, "deadline passed while queued; not computed"),
                  m.get());
  }
  if (batch->calls.empty()) return 0;
  int64_t t = now_ns();
  out->samples = batch->samples;
  out->calls = int32_t(batch->calls.size());
  out->ninputs = nin;
  for (size_t i = 0; i < batch->calls.size(); ++i) {
    Call* c = batch->calls[i];
    c->started_ns = t;
    if (int(i) < waits_cap) waits_s[i] = double(t - c->enqueued_ns) / 1e9;
    m->stats[kQueueCount] += 1;
    m->stats[kQueueNs] += t - c->enqueued_ns;
  }
  const Call* first = batch->calls[0];
  batch->buffers.resize(batch->calls.size() > 1 ? nin : 0);
  for (int s = 0; s < nin; ++s) {
    const auto& shape = first->req->inputs(first->order[s]).shape();
    out->rank[s] = shape.size();
    out->dims[s][0] = batch->samples;
    for (int d = 1; d < shape.size(); ++d) out->dims[s][d] = shape[d];
    if (batch->calls.size() == 1) {
      const std::string& raw = first->req->raw_input_contents(first->order[s]);
      out->data[s] = raw.data();
      out->nbytes[s] = int64_t(raw.size());
    } else {
      std::string& buf = batch->buffers[s];
      size_t total = 0;
      for (Call* c : batch->calls) total += c->req->raw_input_contents(c->order[s]).size();
      buf.resize(total);
      size_t off = 0;
      for (Call* c : batch->calls) {
        const std::string& raw = c->req->raw_input_contents(c->order[s]);
        std::memcpy(&buf[off], raw.data(), raw.size());
        off += raw.size();
      }
      out->data[s] = buf.data();
      out->nbytes[s] = int64_t(total);
    }
  }
  std::lock_guard lock(f->batches_mu);
  out->id = f->next_batch++;
  batch->id = out->id;
  f->batches[out->id] = std::move(batch);
  return 1;
}

static std::unique_ptr<Batch> take_batch(Front* f, int64_t id) {
  std::lock_guard lock(f->batches_mu);
  auto it = f->batches.find(id);
  if (it == f->batches.end()) return nullptr;
  auto b = std::move(it->second);
  f->batches.erase(it);
  return b;
}

// No notify: nothing waits on busy, and waking the idle batch threads cost each a context switch per batch.
static void batch_done(Batch* b) {
  std::lock_guard lock(b->model->mu);
  b->model->busy--;
}

// Answers a batch's calls with outputs in the model's output order (C-contiguous, dimension 0 = samples).
int32_t fv_complete(fv_front* fp, int64_t id, int64_t compute_ns, int32_t noutputs, const fv_output* outputs) {
  auto* f = of(fp);
  auto b = take_batch(f, id);
  if (!b) return -1;
  Model* m = b->model.get();
  int64_t t0 = now_ns();
  b->computed_ns = t0;
  m->stats[kInferCount] += 1;
  m->stats[kInferNs] += compute_ns;
  m->stats[kSamples] += b->samples;
  m->stats[kLastMs] = std::chrono::duration_cast<std::chrono::milliseconds>(SysClock::now().time_since_epoch()).count();
  {
    std::lock_guard lock(m->mu);
    auto& cn = m->by_batch[b->samples];
    cn.first += 1;
    cn.second += compute_ns;
  }
  bool ok = noutputs == int(m->outputs.size()) && outputs;
  for (int o = 0; ok && o < noutputs; ++o) {
    const fv_output& out = outputs[o];
    ok = out.dtype && out.data && out.rank >= 1 && out.rank <= kMaxRank && out.dims[0] == b->samples;
    // A row's bytes, each factor checked so that the product cannot overflow (nor a dimension be negative).
    uint64_t bytes = ok ? dtype_size(out.dtype) : 0;
    for (int k = 1; ok && k < out.rank; ++k) {
      ok = out.dims[k] >= 0 && (out.dims[k] == 0 || bytes <= (uint64_t(1) << 40) / uint64_t(out.dims[k]));
      bytes *= uint64_t(out.dims[k]);
    }
    ok = ok && bytes > 0 && bytes <= (uint64_t(1) << 40) / uint64_t(b->samples);
    if (!ok) break;
    b->shapes.emplace_back(out.dims, out.dims + out.rank);
    b->row_bytes.push_back(size_t(bytes));
    b->dtypes.push_back(out.dtype);
    b->outputs.emplace_back(static_cast<const char*>(out.data), size_t(bytes) * size_t(b->samples));
  }
  if (!ok) {
    for (Call* c : b->calls)
      Front::finish(c, Status(StatusCode::INTERNAL, "model " + m->name + " returned outputs that do not match its batch"), m);
    batch_done(b.get());
    return -2;
  }
  m->stats[kOutputNs] += now_ns() - t0;
  // Answering takes gRPC work per call; a thread of its own does it, so the caller's next batch
  // starts computing at once instead of waiting for the writes.
  bool idle;
  {
    std::lock_guard lock(m->mu);
    idle = m->queue.empty();
  }
  if (idle) {  // nothing waits to be computed: answering here saves a thread wake-up
    answer(b.get());
    return 0;
  }
  {
    std::lock_guard lock(f->answers_mu);
    f->answers.push_back(std::move(b));
  }
  f->answers_cv.notify_one();
  return 0;
}

static void answer(Batch* b) {
  Model* m = b->model.get();
  const int noutputs = int(b->outputs.size());
  int64_t offset = 0, built_ns = 0;  // building the answers, not sending them (each call's success time does)
  for (Call* c : b->calls) {
    const int64_t t0 = now_ns();
    auto* resp = c->resp;
    resp->set_model_name(m->name);
    resp->set_model_version(m->version);
    resp->set_id(c->req->id());
    Status st = Status::OK;
    auto emit = [&](int o, const inference::ModelInferRequest::InferRequestedOutputTensor* want) {
      const char* base = b->outputs[o].data() + size_t(offset) * b->row_bytes[o];
      const int64_t k = want ? fovea::requested_k(*want) : 0;
      auto* t = resp->add_outputs();
      t->set_name(m->outputs[o].name);
      if (k > 0) {
        // validate checked k against the model's declared output; classify checks it again, as an
        // int64, against the computed one (narrower where a dimension is dynamic).
        if (b->dtypes[o] != "FP32") {
          st = Status(StatusCode::INVALID_ARGUMENT, "classification needs an FP32 output; '" + m->outputs[o].name + "' is " + b->dtypes[o]);
          return;
        }
        st = fovea::classify(reinterpret_cast<const float*>(base), c->n, int64_t(b->row_bytes[o] / 4), k,
                             m->probabilities, m->labels, m->outputs[o].name, resp->add_raw_output_contents());
        if (!st.ok()) return;
        t->set_datatype("BYTES");
        t->add_shape(c->n);
        t->add_shape(k);
        return;
      }
      t->set_datatype(b->dtypes[o]);
      t->add_shape(c->n);
      for (size_t x = 1; x < b->shapes[o].size(); ++x) t->add_shape(b->shapes[o][x]);
      resp->add_raw_output_contents()->assign(base, b->row_bytes[o] * size_t(c->n));
    };
    if (c->req->outputs_size() == 0) {
      for (int o = 0; o < noutputs; ++o) emit(o, nullptr);
    } else {
      for (const auto& want : c->req->outputs())
        for (int o = 0; o < noutputs; ++o)
          if (m->outputs[o].name == want.name()) emit(o, &want);
    }
    offset += c->n;
    if (c->local) {  // for Python's trace of the call (finish frees c)
      c->local->timing =
          fv_call_timing{c->enqueued_ns, c->started_ns, b->computed_ns, b->samples, int64_t(b->calls.size()), b->id};
    }
    built_ns += now_ns() - t0;
    Front::finish(c, st, m);
  }
  m->stats[kOutputNs] += built_ns;
  batch_done(b);
}

// Fails a batch's calls (the model raised): only this batch's requests fail.
int32_t fv_fail(fv_front* fp, int64_t id, int32_t code, const char* message) {
  auto* f = of(fp);
  auto b = take_batch(f, id);
  if (!b) return -1;
  // OK would tell the callers their call succeeded with no answer: anything outside the errors is UNKNOWN.
  const StatusCode st = code > 0 && code < FV_STATUS_CODES ? StatusCode(code) : StatusCode::UNKNOWN;
  for (Call* c : b->calls) Front::finish(c, Status(st, message ? message : ""), b->model.get());
  batch_done(b.get());
  return 0;
}

// Queued calls and batches in compute for a slot (for draining and heartbeats).
int32_t fv_depth(fv_front* fp, int32_t slot, fv_queue_depth* out) {
  auto* f = of(fp);
  std::shared_ptr<Model> m = f->model(slot);
  if (!m) return -1;
  std::lock_guard lock(m->mu);
  out->queued = int32_t(m->queue.size()) + m->decoding;
  out->busy = m->busy;
  return 0;
}

// A slot's ModelStatistics, serialized into buf; returns its length, or -1 (no such slot, or buf too small).
int32_t fv_statistics(fv_front* fp, int32_t slot, char* buf, int32_t cap) {
  auto* f = of(fp);
  std::shared_ptr<Model> m = f->model(slot);
  if (!m) return -1;
  std::string out = m->statistics().SerializeAsString();
  if (int(out.size()) > cap) return -1;
  std::memcpy(buf, out.data(), out.size());
  return int(out.size());
}

// A slot's successful calls by total time (api.h).
int32_t fv_request_times(fv_front* fp, int32_t slot, fv_time_buckets* out) {
  std::shared_ptr<Model> m = of(fp)->model(slot);
  if (!m) return -1;
  for (int b = 0; b < kTimeBuckets; ++b) {
    if (b < kTimeBuckets - 1) out->bounds_ns[b] = kTimeBoundsNs[b];
    out->counts[b] = m->ok_times[b].load();
  }
  out->sum_ns = m->stats[kOkNs].load();
  return 0;
}

// ModelInfer calls answered so far, by status code.
void fv_codes(fv_front* fp, fv_status_counts* out) {
  auto* f = of(fp);
  for (int i = 0; i < FV_STATUS_CODES; ++i) out->by_code[i] = f->codes[i].load();
}

// A ModelInfer the worker's Python server made (a call it traces, its images decoded, as
// raw_input_contents) for the version in slot: validated, queued and batched with the calls this front takes
// itself, and answered by the same code. Blocks until answered (the binding releases the GIL meanwhile).
// Returns the gRPC status code; on OK, answer->response holds the serialized ModelInferResponse (free it
// with fv_free_buffer), otherwise answer->message gets the reason.
int32_t fv_submit(fv_front* fp, int32_t slot, const char* request, int64_t len, int64_t timeout_ms,
                  fv_answer* answer) {
  auto* f = of(fp);
  int64_t t0 = now_ns();
  answer->response = nullptr;
  answer->response_len = 0;
  answer->message[0] = 0;
  auto fail = [&](const Status& st) {
    std::snprintf(answer->message, sizeof answer->message, "%s", st.error_message().c_str());
    return int(st.error_code());
  };
  std::shared_ptr<Model> m = f->model(slot);
  if (!m) return fail(Status(StatusCode::UNAVAILABLE, "this model version is unloading; retry"));
  std::unique_ptr<Call> owned(new Call);
  if (len < 0 || len > INT32_MAX || !owned->request.ParseFromArray(request, int(len)))
    return fail(Status(StatusCode::INVALID_ARGUMENT, "the request is not a valid protobuf message for this method"));
  Status st = fovea::validate(*m, owned->request, owned.get());
  if (!st.ok()) {
    m->stats[kFailCount] += 1;
    return fail(st);
  }
  Local local;
  Call* call = owned.release();
  call->local = &local;
  call->deadline = SysClock::now() + std::chrono::milliseconds(bounded_ms(timeout_ms));
  call->enqueued_ns = t0;
  m->stats[kInputNs] += now_ns() - t0;
  st = enqueue(m.get(), call);
  if (!st.ok()) return fail(st);
  std::unique_lock lock(local.mu);
  local.cv.wait(lock, [&] { return local.done; });
  if (!local.status.ok()) return fail(local.status);
  answer->response = static_cast<char*>(std::malloc(std::max<size_t>(local.response.size(), 1)));
  if (!answer->response) return fail(Status(StatusCode::RESOURCE_EXHAUSTED, "no memory for the answer"));
  std::memcpy(answer->response, local.response.data(), local.response.size());
  answer->response_len = int64_t(local.response.size());
  answer->timing = local.timing;
  return 0;
}

void fv_free_buffer(char* buffer) { std::free(buffer); }

// Hands a decode thread the next image call (api.h); drops those whose caller left or whose deadline passed.
int32_t fv_next_images(fv_front* fp, int32_t timeout_ms, fv_image_job* out) {
  auto* f = of(fp);
  std::vector<std::unique_ptr<ImageJob>> dropped;
  ImageJob* job = nullptr;
  bool closed = false;
  {
    std::unique_lock lock(f->jobs_mu);
    const auto until = Clock::now() + std::chrono::milliseconds(std::clamp<int32_t>(timeout_ms, 0, 60'000));
    while (!job) {
      if (!f->jobs.empty()) {
        auto j = std::move(f->jobs.front());
        f->jobs.pop_front();
        const Call* c = j->call;
        if (c->ctx->IsCancelled() || c->deadline <= SysClock::now()) {
          dropped.push_back(std::move(j));
          continue;
        }
        job = j.get();
        f->taken[j->id] = std::move(j);
        break;
      }
      closed = f->jobs_closed;
      if (closed || !dropped.empty()) break;  // the dropped are answered at once, not after the wait
      if (f->jobs_cv.wait_until(lock, until) == std::cv_status::timeout && f->jobs.empty()) break;
    }
    if (job) {
      const auto& raw = job->call->request.raw_input_contents();
      out->id = job->id;
      out->slot = job->model->slot;
      out->tensor = job->tensor.data();
      out->tensor_len = int64_t(job->tensor.size());
      out->has_raw = raw.empty() ? 0 : 1;
      out->raw = raw.empty() ? nullptr : raw[0].data();
      out->raw_len = raw.empty() ? 0 : int64_t(raw[0].size());
    }
  }
  for (auto& j : dropped) {
    Front::images_settled(j->model.get());
    const bool cancelled = j->call->ctx->IsCancelled();
    Front::finish(j->call, cancelled ? Status(StatusCode::CANCELLED, "cancelled by the caller before decoding")
                                     : Status(StatusCode::DEADLINE_EXCEEDED, "deadline passed before the images were decoded"),
                  j->model.get());
  }
  return job ? 1 : closed ? -1 : 0;
}

// An image call's tensor (api.h): checked by the one validator, then queued like any other call.
int32_t fv_images_done(fv_front* fp, int64_t id, const fv_output* t) {
  auto* f = of(fp);
  auto job = f->take_job(id);
  if (!job) return -1;
  Model* m = job->model.get();
  Call* c = job->call;
  Front::images_settled(m);
  // The tensor's bytes, each factor checked so that the product cannot overflow.
  uint64_t bytes = t && t->dtype && t->data && t->rank >= 1 && t->rank <= kMaxRank ? dtype_size(t->dtype) : 0;
  for (int k = 0; bytes > 0 && k < t->rank; ++k) {
    const int64_t d = t->dims[k];
    bytes = d < 0 || (d > 0 && bytes > (uint64_t(1) << 40) / uint64_t(d)) ? 0 : bytes * uint64_t(d);
  }
  if (bytes == 0) {
    Front::finish(c, Status(StatusCode::INTERNAL, "the decoded images do not form a tensor"), m);
    return 0;
  }
  auto* in = c->request.mutable_inputs(0);
  in->set_name(m->inputs[0].name);
  in->set_datatype(t->dtype);
  in->clear_shape();
  for (int k = 0; k < t->rank; ++k) in->add_shape(t->dims[k]);
  in->clear_contents();
  in->clear_parameters();
  c->request.clear_raw_input_contents();
  c->request.add_raw_input_contents()->assign(static_cast<const char*>(t->data), size_t(bytes));
  Status st = fovea::validate(*m, c->request, c);
  if (!st.ok()) {
    Front::finish(c, st, m);
    return 0;
  }
  const int64_t now = now_ns();
  m->stats[kInputNs] += now - c->arrived_ns;
  c->enqueued_ns = now;
  auto* reactor = c->reactor;
  st = enqueue(m, c);  // frees c when it refuses
  if (!st.ok()) {
    f->codes[std::min<int>(st.error_code(), 16)] += 1;
    reactor->Finish(st);
  }
  return 0;
}

// Answers an image call that could not become a tensor (api.h).
int32_t fv_images_fail(fv_front* fp, int64_t id, int32_t code, const char* message) {
  auto job = of(fp)->take_job(id);
  if (!job) return -1;
  Front::images_settled(job->model.get());
  const StatusCode st = code > 0 && code < FV_STATUS_CODES ? StatusCode(code) : StatusCode::UNKNOWN;
  Front::finish(job->call, Status(st, message ? message : ""), job->model.get());
  return 0;
}

// Whether calls with a sampled traceparent go to Python, which traces them: on when the worker's tracing is
// (fovea/tracing.py); set before the first call.
void fv_set_trace_sampled(fv_front* fp, int32_t on) { of(fp)->trace_sampled = on != 0; }

void fv_set_accepting(fv_front* fp, int32_t accepting) { of(fp)->accepting = accepting != 0; }

void fv_trim_heap(void) { malloc_trim(0); }

// Closes the port: calls still open after grace_s are cancelled. Batches must keep being served
// meanwhile, since the server waits for every call it accepted to be answered.
void fv_shutdown(fv_front* fp, double grace_s) {
  auto* f = of(fp);
  if (f->stopped) return;
  f->stopped = true;
  f->accepting = false;
  // Returns once every call is answered, or at the deadline, when gRPC cancels the calls still open.
  f->server->Shutdown(SysClock::now() + std::chrono::microseconds(int64_t(grace_s * 1e6)));
  f->relay->cancel_all();  // a relayed ModelInfer still open upstream ends with its call
  // Image calls still queued are answered; those being decoded are answered by their decode threads, which
  // then end (fv_next_images returns -1).
  std::deque<std::unique_ptr<ImageJob>> left;
  {
    std::lock_guard lock(f->jobs_mu);
    f->jobs_closed = true;
    left.swap(f->jobs);
    f->jobs_cv.notify_all();
  }
  for (auto& j : left) {
    Front::images_settled(j->model.get());
    j->call->ctx->AddTrailingMetadata(kUnserved, "1");  // never decoded: a gateway may send it elsewhere
    Front::finish(j->call, Status(StatusCode::UNAVAILABLE, "worker shut down before the images were decoded"),
                  j->model.get());
  }
  f->server->Wait();
  f->relay->stop();
}

void fv_free(fv_front* fp) {
  auto* f = of(fp);
  fv_shutdown(fp, 0);
  if (f->answerer.joinable()) {
    {
      std::lock_guard lock(f->answers_mu);
      f->stopping = true;
    }
    f->answers_cv.notify_all();
    f->answerer.join();
  }
  f->server.reset();  // before the service it calls into
  delete f;
}

#pragma GCC visibility pop
}  // extern "C"
