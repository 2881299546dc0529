// The gateway's native front, the server of its one public gRPC port: it answers the hot call, ModelInfer
// with an API key the Python gateway has already verified, by forwarding the request's bytes as they
// came to a worker. Everything else (unknown or limited keys, errors, other methods) goes, bytes and
// metadata unchanged, to the gateway's Python server over a unix socket in a private directory (it has
// no TCP port), which answers as it always does. So every call works on this port, and the common one
// never enters Python.
//
// Python keeps the tables current: verified unlimited keys (by SHA-256 of the secret, never the
// secret), production aliases and which workers serve which version (from the registry's watches).
//
// Its parts, each one job, included below: keys.h (the keys and what each may do), router.h (the routing
// table: canary pick, worker choice, ejection), request.h (ModelInferRequest's wire format and rules),
// classify.h (Classify's). This file holds the calls' life and the C entries of api.h.

#include "api.h"

#include <fnmatch.h>
#include <malloc.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <shared_mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <absl/synchronization/mutex.h>
#include <grpcpp/alarm.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "canary.h"
#include "classify.h"
#include "oip_dtypes.h"

using grpc::ByteBuffer;
using grpc::Status;
using grpc::StatusCode;
using SysClock = std::chrono::system_clock;

namespace {

const std::string kModelInfer = "/inference.GRPCInferenceService/ModelInfer";
const std::string kClassify = "/fovea.v1.ImageService/Classify";
const std::set<std::string> kStreams = {
    "/inference.GRPCInferenceService/ModelStreamInfer", "/fovea.v1.ImageService/ClassifyStream",
    "/grpc.health.v1.Health/Watch", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"};

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(SysClock::now().time_since_epoch()).count();
}

std::mt19937_64& rng() {
  thread_local std::mt19937_64 g{std::random_device{}()};
  return g;
}

// SHA-256 with the digest fetched once: OpenSSL 3's one-shot SHA256() looks the algorithm up every call.
std::string sha256(const std::string& data) {
  static EVP_MD* md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  thread_local std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  unsigned char out[SHA256_DIGEST_LENGTH];
  unsigned int n = 0;
  EVP_DigestInit_ex(ctx.get(), md, nullptr);
  EVP_DigestUpdate(ctx.get(), data.data(), data.size());
  EVP_DigestFinal_ex(ctx.get(), out, &n);
  return std::string(reinterpret_cast<char*>(out), sizeof out);
}

// A finished native call, until Python drains it (fg_drain_log).
struct LogEntry {
  double epoch_s = 0, seconds = 0;
  int code = 0;
  int64_t version = 0;
  std::string request_id, model, worker;
  const char* method = "";
};

#include "keys.h"     // API keys and what each may do here
#include "request.h"  // the wire reader and the request rules
#include "router.h"   // the routing table: canary pick, worker choice, ejection

std::string header(const grpc::GenericServerContext& ctx, const char* name) {
  auto it = ctx.client_metadata().find(name);
  return it == ctx.client_metadata().end() ? std::string() : std::string(it->second.data(), it->second.size());
}

// The last value of a header sent more than once, as the Python server reads metadata (a dict of them).
bool last_header(const grpc::GenericServerContext& ctx, const char* name, std::string* out) {
  auto range = ctx.client_metadata().equal_range(name);
  if (range.first == range.second) return false;
  for (auto it = range.first; it != range.second; ++it) out->assign(it->second.data(), it->second.size());
  return true;
}

// The caller's API key from 'authorization: Bearer <key>', or why it cannot be one. The messages are the
// Python server's (fovea/rpc.py bearer_token, gateway/auth.py KeyCache.check): checked here from the metadata
// alone, so an unauthenticated call is answered before its body is read.
std::string credentials_problem(const grpc::GenericServerContext& ctx, std::string* secret) {
  std::string value;
  if (!last_header(ctx, "authorization", &value))
    return "missing credentials: send metadata 'authorization: Bearer <api key>'";
  auto first = value.find_first_not_of(" \t"), last = value.find_last_not_of(" \t");
  value = first == std::string::npos ? std::string() : value.substr(first, last - first + 1);
  auto space = value.find(' ');
  std::string scheme = value.substr(0, space), token;
  if (space != std::string::npos) {
    token = value.substr(space + 1);
    auto b = token.find_first_not_of(" \t"), e = token.find_last_not_of(" \t");
    token = b == std::string::npos ? std::string() : token.substr(b, e - b + 1);
  }
  if (strcasecmp(scheme.c_str(), "bearer") != 0 || token.empty())
    return "malformed credentials: expected 'authorization: Bearer <api key>'";
  if (token.rfind("fv_", 0) != 0 || token.size() > 200)
    return "malformed API key: expected 'authorization: Bearer fv_...'";
  *secret = token;
  return "";
}

// Whether the caller's W3C traceparent ('00-<32 hex>-<16 hex>-<2 hex flags>', 55 characters in version 00)
// asks for this call to be traced: flags bit 0. Only well-formed values count; Python parses them again.
bool sampled(const grpc::GenericServerContext& ctx) {
  std::string tp;
  if (!last_header(ctx, "traceparent", &tp) || tp.size() < 55 || tp.size() > 128) return false;
  if (tp[2] != '-' || tp[35] != '-' || tp[52] != '-' || (tp.size() > 55 && tp[55] != '-')) return false;
  char c = tp[54];
  int low = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
  return low >= 0 && (low & 1);
}

// Methods the Python server serves without a key.
bool open_method(const std::string& m) {
  return m.rfind("/grpc.health.v1.", 0) == 0 || m.rfind("/grpc.reflection.", 0) == 0;
}

bool reserved(const std::string& k) {
  return k.empty() || k[0] == ':' || k.rfind("grpc-", 0) == 0 || k == "te" || k == "content-type" ||
         k == "user-agent";
}

// The answer to a call sent to a worker and lost with its connection (gateway/routing.py says the same).
std::string dropped_message(const std::string& address, const std::string& details) {
  return "worker at " + address +
         " dropped the connection while running this call; it was not retried because it may have caused "
         "the failure (" + details + ")";
}

std::string new_request_id() {
  static const char* hex = "0123456789abcdef";
  std::string s(32, '0');
  uint64_t a = rng()(), b = rng()();
  for (int i = 0; i < 16; ++i) s[i] = hex[(a >> (4 * i)) & 15], s[16 + i] = hex[(b >> (4 * i)) & 15];
  return s;
}

// The caller's request id when it is one (1 to 128 printable bytes), else a new one.
std::string request_id(const std::string& given) {
  bool printable = !given.empty() && given.size() <= 128;
  for (char c : given) printable &= c >= 0x20 && c < 0x7f;
  return printable ? given : new_request_id();
}

// A Classify's images as the one BYTES ModelInfer a worker's main port takes. Classify's top_k means "at most":
// k never passes the output's width, which the classification extension needs.
ByteBuffer classify_request(const std::string& model, int64_t version, const ImageModel& m,
                            const std::vector<classify::Image>& images, uint64_t top_k) {
  uint64_t k = m.width > 0 ? std::min(top_k, uint64_t(m.width)) : top_k;
  std::string fwd = classify::infer_request(model, version, m.input, m.output, images, k);
  grpc::Slice slice(fwd.data(), fwd.size());
  return ByteBuffer(&slice, 1);
}

// A worker's answer to classify_request as the serialized ClassifyResponse; false when it cannot be read.
bool classify_response(const ByteBuffer& answer, const std::string& model, int64_t version,
                       const std::vector<std::string>& ids, std::string* out) {
  std::vector<grpc::Slice> slices;
  if (!answer.Dump(&slices).ok()) return false;
  std::string flat;
  for (const auto& s : slices) flat.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return classify::classify_response(flat, model, version, ids, out);
}

class Front;

// An event on one of the front's completion queues: a Call's operation, or a Forward's worker answer. Each queue's
// one thread runs both, so the Python server's routed calls add no thread (and no poller) of their own.
struct Op {
  virtual void done(bool ok) = 0;

 protected:
  ~Op() = default;
};

// One call's way to a worker, for the front's own calls (Call) and for those Python routes through it (Forward):
// the power of two choices, the deadline, the retry of a call no worker ran, and the count that ejects a worker.
// Only one thread touches it at a time: the one running its completion queue.
struct Upstream {
  std::shared_ptr<const Routes> routes;  // kept alive for the workers the call uses
  std::string model, rid;
  int64_t version = 0;
  bool tensors = true;  // only raw numeric tensors (else encoded images or typed contents)
  SysClock::time_point deadline;
  std::vector<std::pair<std::string, std::string>> metadata;  // more for the worker: the trace context
  ByteBuffer request, answer;
  std::shared_ptr<Worker> worker;
  std::string tried;
  int attempt = 0;
  std::unique_ptr<grpc::ClientContext> ctx;  // declared before the reader, so destroyed after it
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> unary;
  Status status;
  bool pending = false;  // sent, its answer not back yet

  // Picks a worker and checks the deadline; false with *st when the call cannot be sent.
  bool choose(Front* f, bool cancelled, Status* st);
  // Sends the call to the worker choose picked; tag reports its answer on cq.
  void send(Front* f, grpc::CompletionQueue* cq, void* tag);
  // After send's tag reported: true when the call is to be tried on another worker (choose and send again),
  // else *st is how it ended (answer holds the worker's answer when it is OK).
  bool retry(Front* f, bool cancelled, Status* st);
  bool never_served() const;
  std::string address() const { return worker ? (tensors ? worker->address : worker->main_address) : std::string(); }
};

// A call the Python server routes through this front (fg_forward_send): a ModelInfer it admitted and resolved, or a
// Classify's images, sent to a worker as the front's own calls are, on one of the front's queues. Python's thread
// starts it and may cancel it; that queue's thread runs the rest. mu guards what both touch.
struct Forward final : Op {
  Front* front = nullptr;
  grpc::CompletionQueue* cq = nullptr;  // the queue its worker calls report to
  void done(bool ok) override;
  uint64_t id = 0;
  Upstream net;
  bool classify = false;
  std::vector<std::string> image_ids;  // a Classify's: its answer names each image
  std::mutex mu;
  bool cancelled = false;
  bool unrouted = false;  // no worker had the version ready: nothing was sent
  int code = 0;
  std::string out;     // the answer (a serialized message) when code is 0, else the error message
  std::string worker;  // the address of the last worker tried
};

// One call on the front, from its arrival to its end, driven by the completion queue it was
// requested on: every operation it starts, on its own side or upstream, reports to that queue, and
// only that queue's thread runs it, so it needs no lock. A unary call is answered natively or passed
// to the Python server; a streaming call is relayed message by message to the Python server in both
// directions (one message in flight each way, so flow control reaches from the client to Python and back).
class Call {
 public:
  enum Event { kNew, kRead, kUp, kFinish, kDone, kUpStart, kUpRead, kUpWrite, kUpWritesDone, kUpFinish, kWrite,
               kBodyTimer, kEvents };
  struct Tag final : Op {
    Call* call = nullptr;
    Event event = kNew;
    void done(bool ok) override { Call::run(this, ok); }
  };

  Call(Front* f, grpc::ServerCompletionQueue* cq);
  // Runs one event, then frees the call once no operation of it is outstanding.
  static void run(Tag* tag, bool ok) {
    Call* c = tag->call;
    c->ops_--;
    c->on(tag->event, ok);
    if (c->ops_ == 0) delete c;
  }
  ~Call();

 private:
  void* start(Event e) {  // an operation reports e when it completes
    ops_++;
    return static_cast<Op*>(&tags_[e]);  // serve() reads every tag as an Op
  }
  void on(Event e, bool ok);
  void arrived();
  void proceed();
  bool take_key_slot();
  void read_body();
  void body_late(bool ok);
  void verify();
  void verified();
  void handle();
  bool infer_native(std::vector<grpc::Slice>& slices);
  void refuse(const std::string& message);
  void forward_native(const Head& head, std::vector<grpc::Slice>& slices);
  bool classify_native(const std::vector<grpc::Slice>& slices);
  bool classify_sizes_ok(const std::vector<grpc::Slice>& slices);
  void start_native();
  void attempt();
  void forward_slow();
  void start_slow();
  void up_answered();
  void slow_answered();
  bool classify_answer();
  void done(const Status& st);
  void finish(const Status& st);
  void copy_upstream_metadata(bool trailing);
  // the streaming relay
  void relay();
  void relay_event(Event e, bool ok);

  Front* f_;
  grpc::ServerCompletionQueue* cq_;
  Tag tags_[kEvents];
  int ops_ = 0;  // operations started whose event has not come back yet
  grpc::GenericServerContext ctx_;
  grpc::GenericServerAsyncReaderWriter stream_{&ctx_};
  ByteBuffer req_, resp_;
  Upstream net_;  // a native call's way to a worker
  std::unique_ptr<grpc::ClientContext> up_;  // to the Python server; declared before the readers, so destroyed after them
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> unary_;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> bidi_;
  Status up_status_;
  bool up_pending_ = false;  // an upstream call is in flight (cancel it if the caller goes)
  bool cancelled_ = false;
  bool finishing_ = false;
  bool streaming_ = false;
  bool verifying_ = false;  // asking the Python server whether an unknown key is valid, before reading the body
  bool up_closed_ = false;  // the relay's upstream sent its last message
  bool initial_copied_ = false;
  std::string secret_;
  std::string digest_;  // the SHA-256 of secret_ (of "" for calls without a key), computed once
  const char* method_ = "ModelInfer";  // for the access log and metrics of native calls
  std::vector<std::string> image_ids_;  // a native Classify's: its answer names each image
  bool classify_ = false;
  bool counted_ = false;  // holds one of the front's pending-call slots
  std::string key_slot_;  // the digest of the key whose per-key slot this call holds; empty: none
  grpc::Alarm body_timer_;  // ends a unary call whose message does not come within its deadline
  bool awaiting_body_ = false;
  std::chrono::steady_clock::time_point start_;
};

class Front {
 public:
  grpc::AsyncGenericService service;
  std::unique_ptr<grpc::Server> server;
  // One thread per completion queue runs every call on it, both sides: with one queue (the default) a
  // call passes between no threads inside the front, which is what its latency at low load is made of.
  std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> cqs;
  std::vector<std::thread> threads;
  static constexpr int kRequested = 16;  // calls each queue waits for at a time
  bool stopped = false;
  void serve(grpc::ServerCompletionQueue* cq);
  std::unique_ptr<grpc::GenericStub> slow;
  std::string internal_auth;
  int max_message_bytes = 0;
  int64_t default_deadline_ms = 30000, max_deadline_ms = 300000, max_samples = 64, max_top_k = 100;
  // Classify's limits (gateway/config.py); a call past one goes to the Python server, which says which.
  int64_t default_top_k = 5, max_images_per_forward = 32, max_image_bytes = 20 << 20, max_image_pixels = 40000000;
  classify::Limits classify_limits() const {
    return {max_samples, default_top_k, max_top_k, max_image_bytes, max_image_pixels};
  }
  bool trace_sampled = false;  // pass calls with a sampled traceparent to Python, which traces them
  std::atomic<bool> accepting{true};
  int64_t max_pending = 4096;
  std::atomic<int64_t> pending{0};
  std::atomic<int64_t> live_calls{0};  // Call objects: those in progress and those waiting for a call
  // Finished native calls, for Python's access log and metrics (calls passed to Python are logged there).
  std::mutex log_mu;
  std::deque<LogEntry> log;
  int64_t log_dropped = 0;
  static constexpr size_t kMaxLogLines = 100000;
  std::atomic<int64_t> codes[FG_STATUS_CODES] = {};
  std::atomic<int64_t> native_calls{0}, slow_calls{0}, retries{0};
  // Calls Python routes through the front (fg_forward_send), on the calls' queues and threads.
  std::atomic<uint64_t> forward_turn{0};  // the queue of the next one
  std::mutex forward_mu;
  bool forward_closed = false;                       // shut down: fg_forward_send refuses
  std::unordered_map<uint64_t, Forward*> forwarding;  // sent, not answered (by Python's id)
  std::deque<Forward*> forwarded;                    // answered, until Python takes them (fg_forward_take)
  int forward_fd = -1;                               // an eventfd, written when a call joins forwarded
  void forward_answered(Forward* fw);
  void forward_done(Forward* fw);
  void post_ended(Forward* fw);

  Keys keys;
  Router router;
};

bool Upstream::choose(Front* f, bool cancelled, Status* st) {
  worker = f->router.choose(*routes, model, version, tried);
  if (!worker) {
    *st = Status(StatusCode::UNAVAILABLE,
                 "no healthy worker has " + model + " v" + std::to_string(version) + " ready; retry shortly");
    return false;
  }
  if (cancelled) {
    *st = Status(StatusCode::CANCELLED, "cancelled by the caller");
    return false;
  }
  if (SysClock::now() >= deadline) {
    *st = Status(StatusCode::DEADLINE_EXCEEDED, "deadline passed before a worker could answer");
    return false;
  }
  return true;
}

void Upstream::send(Front* f, grpc::CompletionQueue* cq, void* tag) {
  unary.reset();  // a retry: the last attempt's reader lives in its call's arena, freed with its context
  ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(deadline);
  ctx->AddMetadata("authorization", f->internal_auth);
  ctx->AddMetadata("x-request-id", rid);
  for (const auto& [k, v] : metadata) ctx->AddMetadata(k, v);
  worker->in_flight++;
  grpc::GenericStub* stub = tensors ? worker->stub.get() : worker->main.get();
  unary = stub->PrepareUnaryCall(ctx.get(), kModelInfer, request, cq);  // Classify too: a BYTES ModelInfer
  unary->StartCall();
  pending = true;
  unary->Finish(&answer, &status, tag);
}

bool Upstream::retry(Front* f, bool cancelled, Status* st) {
  pending = false;
  worker->in_flight--;
  bool unavailable = status.error_code() == StatusCode::UNAVAILABLE;
  f->router.record(*worker, !unavailable);
  if (unavailable && !never_served()) {  // it may have run when the connection dropped: a poison call?
    *st = Status(StatusCode::UNAVAILABLE, dropped_message(address(), status.error_message()));
    return false;
  }
  if (unavailable && attempt == 0 && !cancelled && SysClock::now() + std::chrono::milliseconds(1) < deadline) {
    attempt = 1;
    tried = worker->address;
    f->retries++;
    answer.Clear();
    return true;
  }
  *st = status;
  return false;
}

// Whether the worker certainly never ran the call that failed with UNAVAILABLE, so another may take it: it
// refused it deliberately (trailing 'fovea-unserved: 1'), or no connection to it could be made. gRPC's API
// tells neither whether the call reached a transport nor (from the channel's state) a refused connection from
// one that dropped mid-call, so its text for "never connected" marks it.
bool Upstream::never_served() const {
  const auto& md = ctx->GetServerTrailingMetadata();
  auto it = md.find("fovea-unserved");
  if (it != md.end() && it->second == "1") return true;
  return status.error_message().find("failed to connect to all addresses") != std::string::npos;
}

void Forward::done(bool) { front->forward_answered(this); }

// A worker answered a Forward (on its queue's thread): try another worker, or end it for Python to take.
void Front::forward_answered(Forward* fw) {
  bool ended = false;
  {
    std::lock_guard lock(fw->mu);
    Status st;
    bool again = fw->net.retry(this, fw->cancelled, &st) && fw->net.choose(this, fw->cancelled, &st);
    if (again) {
      fw->net.send(this, fw->cq, static_cast<Op*>(fw));
    } else {
      ended = true;
      fw->worker = fw->net.address();
      fw->code = int(st.error_code());
      if (!st.ok()) {
        fw->out = st.error_message();
      } else if (fw->classify) {
        if (!classify_response(fw->net.answer, fw->net.model, fw->net.version, fw->image_ids, &fw->out)) {
          fw->code = int(StatusCode::INTERNAL);
          fw->out = "worker at " + fw->worker + " answered a classification the gateway cannot read";
        }
      } else {
        std::vector<grpc::Slice> slices;
        if (fw->net.answer.Dump(&slices).ok())
          for (const auto& s : slices) fw->out.append(reinterpret_cast<const char*>(s.begin()), s.size());
      }
      fw->net.answer.Clear();
      fw->net.request.Clear();  // the request's bytes are not needed while the answer waits for Python
    }
  }
  if (ended) forward_done(fw);  // after fw->mu: fg_forward_cancel takes forward_mu, then fw->mu
}

void Front::forward_done(Forward* fw) {
  std::lock_guard lock(forward_mu);
  forwarding.erase(fw->id);
  post_ended(fw);
}

// With forward_mu held: an ended call joins those Python takes, and the eventfd says so.
void Front::post_ended(Forward* fw) {
  forwarded.push_back(fw);
  uint64_t one = 1;
  if (forward_fd >= 0 && write(forward_fd, &one, sizeof one) < 0) {
    // an eventfd only fails a write at 2^64 - 2 unread: Python has not read it in ages, and will find the calls
  }
}

Call::Call(Front* f, grpc::ServerCompletionQueue* cq) : f_(f), cq_(cq) {
  for (int e = 0; e < kEvents; ++e) {
    tags_[e].call = this;
    tags_[e].event = Event(e);
  }
  f->live_calls++;
  // Before the call starts, or gRPC never reports its end; it reports it only for a call that started.
  ctx_.AsyncNotifyWhenDone(static_cast<Op*>(&tags_[kDone]));
  f->service.RequestCall(&ctx_, &stream_, cq, cq, start(kNew));
}

Call::~Call() {
  if (counted_) f_->pending--;
  if (!key_slot_.empty()) f_->keys.give_slot(key_slot_);
  f_->live_calls--;
}

void Call::on(Event e, bool ok) {
  switch (e) {
    case kNew:
      if (ok) arrived();  // else the server is shutting down: nothing to do
      return;
    case kDone:
      // The call ended; if the caller cancelled it, so is its upstream call.
      cancelled_ = ctx_.IsCancelled();
      if (cancelled_ && up_pending_) up_->TryCancel();
      if (cancelled_ && net_.pending) net_.ctx->TryCancel();
      return;
    case kFinish:
      return;
    case kBodyTimer:
      body_late(ok);
      return;
    default:
      break;
  }
  if (streaming_) {
    relay_event(e, ok);
  } else if (e == kRead) {
    awaiting_body_ = false;
    body_timer_.Cancel();
    if (finishing_) return;  // the timer ended the call first
    if (ok) {
      handle();
    } else {
      finish(Status(StatusCode::INVALID_ARGUMENT, "no request message"));
    }
  } else if (e == kUp) {
    if (net_.pending) {
      up_answered();
    } else if (verifying_) {
      verified();
    } else {
      slow_answered();
    }
  }
}

void Call::arrived() {
  start_ = std::chrono::steady_clock::now();
  ops_++;  // the end of the call (kDone), asked for in the constructor
  new Call(f_, cq_);  // the next call this queue will take
  if (!f_->accepting) {
    finish(Status(StatusCode::UNAVAILABLE, "gateway is draining; retry on another replica"));
    return;
  }
  if (++f_->pending > f_->max_pending) {  // streams too: each holds a call's worth of the front
    f_->pending--;
    finish(Status(StatusCode::RESOURCE_EXHAUSTED, "gateway is at its limit of " + std::to_string(f_->max_pending) +
                                                      " calls in progress; retry shortly"));
    return;
  }
  counted_ = true;
  if (open_method(ctx_.method())) {
    // Calls without a key (health, reflection) share one key's limit: a health Watch never ends.
    digest_ = sha256(secret_);
    if (take_key_slot()) proceed();
    return;
  }
  // Credentials before the body: an unauthenticated call costs no more than its metadata here.
  std::string problem = credentials_problem(ctx_, &secret_);
  if (!problem.empty()) {
    finish(Status(StatusCode::UNAUTHENTICATED, problem));
    return;
  }
  digest_ = sha256(secret_);
  if (!take_key_slot()) return;
  if (f_->keys.known(digest_)) {
    proceed();
  } else {
    verify();
  }
}

void Call::proceed() {
  if (kStreams.count(ctx_.method())) {
    relay();
  } else {
    read_body();
  }
}

// gRPC ends a call at the deadline its caller set, but a call without one (or with one of years) would wait for
// its message forever, holding one of the front's pending-call slots: a caller that sends headers and no body
// could fill them all. The message must come within the deadline the gateway would give the call anyway.
void Call::read_body() {
  bool has_deadline = ctx_.deadline() != SysClock::time_point::max();
  auto limit = std::chrono::milliseconds(has_deadline ? f_->max_deadline_ms : f_->default_deadline_ms);
  awaiting_body_ = true;
  body_timer_.Set(cq_, SysClock::now() + limit, start(kBodyTimer));
  stream_.Read(&req_, start(kRead));
}

void Call::body_late(bool ok) {
  if (!ok || !awaiting_body_) return;  // cancelled: the message came, or the call ended
  bool has_deadline = ctx_.deadline() != SysClock::time_point::max();
  std::string limit = has_deadline ? std::to_string(f_->max_deadline_ms) + " ms (the gateway's longest deadline)"
                                   : std::to_string(f_->default_deadline_ms) +
                                         " ms (the gateway's deadline for calls that set none)";
  finish(Status(StatusCode::DEADLINE_EXCEEDED, "the request message did not arrive within " + limit));
}

bool Call::take_key_slot() {
  if (f_->keys.max_per_key <= 0) return true;
  if (!f_->keys.take_slot(digest_)) {
    std::string who = secret_.empty() ? "calls without an API key have " : "this API key has ";
    finish(Status(StatusCode::RESOURCE_EXHAUSTED, who + std::to_string(f_->keys.max_per_key) +
                                                      " calls in progress, the limit (FOVEA_GATEWAY_MAX_CALLS_PER_KEY)"
                                                      "; finish some or retry shortly"));
    return false;
  }
  key_slot_ = digest_;
  return true;
}

// A key this front has not seen: ask the Python server (ServerLive with the caller's metadata, which its
// interceptor authenticates) before reading the body. Python caches the answer and, for a valid key,
// hands it to this front, so a key's later calls skip this.
void Call::verify() {
  static const std::string kServerLive = "/inference.GRPCInferenceService/ServerLive";
  start_slow();
  if (cancelled_) {
    finish(Status(StatusCode::CANCELLED, "cancelled by the caller"));
    return;
  }
  verifying_ = true;
  grpc::Slice empty;
  unary_ = f_->slow->PrepareUnaryCall(up_.get(), kServerLive, ByteBuffer(&empty, 1), cq_);
  unary_->StartCall();
  up_pending_ = true;
  unary_->Finish(&resp_, &up_status_, start(kUp));
}

void Call::verified() {
  verifying_ = false;
  up_pending_ = false;
  if (!up_status_.ok()) {  // refused: its status and metadata, as the Python server answers
    copy_upstream_metadata(false);
    copy_upstream_metadata(true);
    finish(up_status_);
    return;
  }
  resp_.Clear();
  unary_.reset();  // lives in the verification call's arena: freed before its context
  up_.reset();
  if (cancelled_) {
    finish(Status(StatusCode::CANCELLED, "cancelled by the caller"));
    return;
  }
  proceed();
}

void Call::handle() {
  bool traced = f_->trace_sampled && sampled(ctx_);  // the Python server traces it
  std::vector<grpc::Slice> slices;  // digest_ is the key credentials_problem checked (these methods need one)
  if (!traced && ctx_.method() == kModelInfer && req_.Dump(&slices).ok()) {
    if (infer_native(slices)) return;
  } else if (!traced && ctx_.method() == kClassify && req_.Dump(&slices).ok()) {
    if (classify_native(slices)) return;
  }
  forward_slow();
}

// ModelInfer of a key answered here (no rate limits, allowed to infer). A request that breaks a rule is refused
// here with the rule's message, before the key's model access, as the Python server refuses it; then the model
// access (Python words its refusal), the per-call image limit, and the route. False: the Python server answers.
bool Call::infer_native(std::vector<grpc::Slice>& slices) {
  if (!f_->keys.native_key(digest_)) return false;
  Checked c = check_request(slices, f_->max_top_k, f_->max_samples);
  if (!c.rules.empty()) {
    refuse(c.rules);
    return true;
  }
  if (!f_->keys.admit(digest_, c.head.model)) return false;
  if (!c.over_limit.empty()) {
    refuse(c.over_limit);
    return true;
  }
  forward_native(c.head, slices);
  return true;
}

// A native call refused before any worker: counted and logged as the calls sent are (no model resolved).
void Call::refuse(const std::string& message) {
  net_.rid = request_id(header(ctx_, "x-request-id"));
  done(Status(StatusCode::INVALID_ARGUMENT, message));
}

void Call::forward_native(const Head& head, std::vector<grpc::Slice>& slices) {
  net_.routes = f_->router.current();
  net_.model = head.model;
  net_.tensors = head.tensors;
  if (head.version.empty()) {
    net_.version = f_->router.pick_version(*net_.routes, net_.model);
  } else if (!parse_version(head.version, &net_.version)) {
    net_.version = 0;
  }
  if (net_.version == 0 || !f_->router.choose(*net_.routes, net_.model, net_.version, "")) {
    forward_slow();  // no alias, an unknown version, no worker: Python resolves or says why
    return;
  }
  if (head.version.empty()) {  // name the version for the worker: a later field 2 replaces an earlier one
    std::string v = std::to_string(net_.version);
    std::string extra{char(0x12), char(v.size())};
    extra += v;
    slices.emplace_back(extra.data(), extra.size());
  }
  net_.request = ByteBuffer(slices.data(), slices.size());
  start_native();
}

// Classify answered here when the Python server would answer it the same way (gateway/service.py classify): a
// key without limits that may use the model, the production alias or a version this front routes, a model that
// takes images, images within every limit (PNG or JPEG whose header gives the size), no more than one worker
// batch. The images go to a worker's main port as one BYTES ModelInfer; its answer is turned into the
// ClassifyResponse. False: the call goes to Python, which answers, refuses with the reason, or splits it.
bool Call::classify_native(const std::vector<grpc::Slice>& slices) {
  if (!f_->keys.native_key(digest_) || !classify_sizes_ok(slices)) return false;  // before any copy of the body
  std::string body;
  for (const auto& s : slices) body.append(reinterpret_cast<const char*>(s.begin()), s.size());
  classify::Request req;
  if (!classify::read_request(body, &req) || !req.alias.empty() || !valid_name(req.model)) return false;
  // Past a limit: Python refuses it with the same rule's message (fg_check_classify); past one worker batch:
  // Python splits it.
  const classify::Limits limits = f_->classify_limits();
  int64_t n = int64_t(req.images.size());
  uint64_t top_k = 0;
  auto size_of = [&](int64_t i) { return uint64_t(req.images[size_t(i)].size); };
  if (!classify::limits_refusal(limits, n, size_of, req.top_k, &top_k).empty() || n > f_->max_images_per_forward ||
      req.version > (uint64_t(1) << 62))
    return false;
  for (int64_t i = 0; i < n; ++i) {
    const auto& img = req.images[size_t(i)];
    uint64_t w = 0, h = 0;
    if (!classify::image_dims(img.data, img.size, &w, &h) || !classify::pixels_refusal(limits, i, w, h).empty())
      return false;
  }
  if (!f_->keys.admit(digest_, req.model)) return false;
  net_.routes = f_->router.current();
  net_.model = req.model;
  net_.version = req.version ? int64_t(req.version) : f_->router.pick_version(*net_.routes, net_.model);
  auto it = net_.routes->images.find(net_.model + "\n" + std::to_string(net_.version));
  if (net_.version == 0 || it == net_.routes->images.end() || !f_->router.choose(*net_.routes, net_.model, net_.version, ""))
    return false;
  const ImageModel& m = it->second;
  net_.request = classify_request(net_.model, net_.version, m, req.images, top_k);
  for (auto& img : req.images) image_ids_.push_back(std::move(img.id));
  classify_ = true;
  method_ = "Classify";
  net_.tensors = false;  // encoded images: a worker's main port decodes them
  start_native();
  return true;
}

// A Classify's images, counted and sized in place across the request's slices: one over max_image_bytes, or more
// than a worker batch, sends the call to Python before its body is copied (a 21 MiB image costs no second copy).
bool Call::classify_sizes_ok(const std::vector<grpc::Slice>& slices) {
  Reader r(slices);
  int64_t images = 0;
  while (!r.done()) {
    uint64_t tag, len;
    if (!r.varint(&tag)) return false;
    uint32_t field = uint32_t(tag >> 3), wire = uint32_t(tag & 7);
    if (field == 4 && wire == 2) {
      // an Image message: its data, its id (at most 4 KB here) and their tags and lengths
      if (!r.varint(&len) || len > uint64_t(f_->max_image_bytes) + 4096 + 32 || !r.skip(len)) return false;
      if (++images > std::min(f_->max_samples, f_->max_images_per_forward)) return false;
    } else if (!r.skip_field(wire)) {
      return false;
    }
  }
  return true;
}

// The common start of a native call: its request id, its deadline (the caller's, capped; else the default).
void Call::start_native() {
  net_.rid = request_id(header(ctx_, "x-request-id"));
  auto limit = SysClock::now() + std::chrono::milliseconds(f_->max_deadline_ms);
  net_.deadline = ctx_.deadline() == SysClock::time_point::max()
                      ? SysClock::now() + std::chrono::milliseconds(f_->default_deadline_ms)
                      : std::min(ctx_.deadline(), limit);
  f_->native_calls++;
  attempt();
}

void Call::attempt() {
  Status st;
  if (!net_.choose(f_, cancelled_, &st)) {
    done(st);
    return;
  }
  net_.send(f_, cq_, start(kUp));
}

// The upstream context of a call passed to the Python server: the caller's deadline and metadata as they came.
void Call::start_slow() {
  up_ = std::make_unique<grpc::ClientContext>();
  if (ctx_.deadline() != SysClock::time_point::max()) up_->set_deadline(ctx_.deadline());
  for (const auto& [k, v] : ctx_.client_metadata()) {
    std::string key(k.data(), k.size());
    if (!reserved(key)) up_->AddMetadata(key, std::string(v.data(), v.size()));
  }
}

void Call::forward_slow() {
  f_->slow_calls++;
  start_slow();
  if (cancelled_) {
    finish(Status(StatusCode::CANCELLED, "cancelled by the caller"));
    return;
  }
  unary_ = f_->slow->PrepareUnaryCall(up_.get(), ctx_.method(), req_, cq_);
  unary_->StartCall();
  up_pending_ = true;
  unary_->Finish(&resp_, &up_status_, start(kUp));
}

// The Python server answered: its metadata (request id, retry-after hints) goes back as it came.
void Call::slow_answered() {
  up_pending_ = false;
  copy_upstream_metadata(false);
  copy_upstream_metadata(true);
  finish(up_status_);
}

// A worker answered a native call.
void Call::up_answered() {
  Status st;
  if (net_.retry(f_, cancelled_, &st)) {
    attempt();
    return;
  }
  if (st.ok()) resp_ = net_.answer;
  if (st.ok() && classify_ && !classify_answer()) {
    done(Status(StatusCode::INTERNAL, "worker at " + net_.address() + " answered a classification the gateway cannot read"));
    return;
  }
  done(st);
}

// A native Classify's worker answer (a ModelInferResponse) becomes its ClassifyResponse, in resp_.
bool Call::classify_answer() {
  std::string out;
  if (!classify_response(net_.answer, net_.model, net_.version, image_ids_, &out)) return false;
  grpc::Slice slice(out.data(), out.size());
  resp_ = ByteBuffer(&slice, 1);
  return true;
}

void Call::copy_upstream_metadata(bool trailing) {
  const auto& md = trailing ? up_->GetServerTrailingMetadata() : up_->GetServerInitialMetadata();
  for (const auto& [k, v] : md) {
    std::string key(k.data(), k.size());
    if (reserved(key)) continue;
    if (trailing) {
      ctx_.AddTrailingMetadata(key, std::string(v.data(), v.size()));
    } else {
      ctx_.AddInitialMetadata(key, std::string(v.data(), v.size()));
    }
  }
}

void Call::done(const Status& st) {
  int code = int(st.error_code());
  f_->codes[code >= 0 && code < FG_STATUS_CODES ? code : 2]++;
  ctx_.AddTrailingMetadata("x-request-id", net_.rid);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  {
    std::lock_guard lock(f_->log_mu);
    if (f_->log.size() >= Front::kMaxLogLines) {
      f_->log_dropped++;
    } else {
      f_->log.push_back(LogEntry{double(now_ns()) / 1e9, seconds, code, net_.version, net_.rid, net_.model,
                                 net_.worker ? net_.worker->address : std::string(), method_});
    }
  }
  finish(st);
}

void Call::finish(const Status& st) {
  if (finishing_) return;
  finishing_ = true;
  if (st.ok() && !streaming_) {
    stream_.WriteAndFinish(resp_, grpc::WriteOptions(), st, start(kFinish));
  } else {
    stream_.Finish(st, start(kFinish));
  }
}

// The streaming relay. Client side: kRead (a message or its half-close) and kWrite; upstream side:
// kUpStart, kUpWrite, kUpWritesDone, kUpRead and kUpFinish. The upstream's status ends the call.
void Call::relay() {
  streaming_ = true;
  f_->slow_calls++;
  start_slow();
  bidi_ = f_->slow->PrepareCall(up_.get(), ctx_.method(), cq_);
  up_pending_ = true;
  bidi_->StartCall(start(kUpStart));
}

void Call::relay_event(Event e, bool ok) {
  switch (e) {
    case kUpStart:
      if (!ok) {
        bidi_->Finish(&up_status_, start(kUpFinish));
        return;
      }
      bidi_->Read(&resp_, start(kUpRead));
      stream_.Read(&req_, start(kRead));
      return;
    case kRead:  // from the client
      if (up_closed_) return;  // the upstream ended: its status finishes the call
      if (ok) {
        bidi_->Write(req_, start(kUpWrite));  // the next read from the client waits for this write
      } else {
        bidi_->WritesDone(start(kUpWritesDone));  // the client half-closed
      }
      return;
    case kUpWrite:
      if (ok && !up_closed_) stream_.Read(&req_, start(kRead));  // else its status finishes the call
      return;
    case kUpRead:
      if (ok) {
        if (!initial_copied_) copy_upstream_metadata(false);
        initial_copied_ = true;
        stream_.Write(resp_, start(kWrite));
      } else {
        up_closed_ = true;
        bidi_->Finish(&up_status_, start(kUpFinish));
      }
      return;
    case kWrite:
      if (!ok) up_->TryCancel();  // the client is gone; the next read ends the upstream
      bidi_->Read(&resp_, start(kUpRead));
      return;
    case kUpFinish: {
      up_pending_ = false;
      if (!initial_copied_) copy_upstream_metadata(false);
      initial_copied_ = true;
      copy_upstream_metadata(true);
      int code = int(up_status_.error_code());
      f_->codes[code >= 0 && code < FG_STATUS_CODES ? code : 2]++;
      finish(up_status_);
      return;
    }
    default:
      return;
  }
}

void Front::serve(grpc::ServerCompletionQueue* cq) {
  void* tag;
  bool ok;
  while (cq->Next(&tag, &ok)) static_cast<Op*>(tag)->done(ok);
}

// What Python passes in is checked here before it reaches an allocation: a string present and at most max bytes
// before its NUL (strnlen reads no further), a count within FG_MAX_ENTRIES with its array present.
bool bounded(const char* s, size_t max = FG_TEXT_MAX) { return s && strnlen(s, max + 1) <= max; }

bool bounded_array(const void* items, int64_t n) { return n >= 0 && n <= FG_MAX_ENTRIES && (n == 0 || items); }

bool valid_key(const fg_key* k, bool patterns) {
  if (!k || !bounded(k->key_id)) return false;
  if (!patterns) return true;
  if (!bounded_array(k->model_patterns, k->n_model_patterns)) return false;
  for (int64_t i = 0; i < k->n_model_patterns; ++i)
    if (!bounded(k->model_patterns[i])) return false;
  return true;
}

bool valid_entry(const fg_alias_target& a) { return bounded(a.model); }
bool valid_entry(const fg_image_model& m) { return bounded(m.model) && bounded(m.input) && bounded(m.output); }
bool valid_entry(const fg_worker_route& w) {
  return bounded(w.model) && bounded(w.fast_address, FG_ADDRESS_BYTES - 1) && bounded(w.main_address, FG_ADDRESS_BYTES - 1);
}

// The entries of items[0, n) within bounds; *skipped counts the others.
template <typename T>
std::vector<T> valid_entries(const T* items, int64_t n, int64_t* skipped) {
  std::vector<T> out;
  out.reserve(size_t(n));
  for (int64_t i = 0; i < n; ++i) {
    if (valid_entry(items[i])) {
      out.push_back(items[i]);
    } else {
      ++*skipped;
    }
  }
  return out;
}

// Copies s into one of the caller's fixed arrays, NUL-terminated, cut to fit (what goes in is bounded already:
// request ids, valid model names and routed addresses all fit).
template <size_t N>
void copy_text(char (&out)[N], const std::string& s) {
  size_t n = std::min(s.size(), N - 1);
  std::memcpy(out, s.data(), n);
  out[n] = '\0';
}

const char* or_empty(const char* s) { return s ? s : ""; }

// With forward_mu held: the call's answer comes back CANCELLED (or as it was, when it came first).
void cancel_forward(Forward* fw) {
  std::lock_guard lock(fw->mu);
  fw->cancelled = true;
  if (fw->net.pending) fw->net.ctx->TryCancel();
}

// Whether a routed call's extra metadata may go on a call as it is: gRPC refuses (or aborts on) a malformed name.
bool valid_metadata(const char* const* md, int64_t n) {
  if (n < 0 || n > FG_MAX_METADATA || (n > 0 && !md)) return false;
  for (int64_t i = 0; i < 2 * n; ++i) {
    if (!bounded(md[i])) return false;
    size_t len = strlen(md[i]);
    for (size_t j = 0; j < len; ++j) {
      char c = md[i][j];
      bool ok = i % 2 ? c >= 0x20 && c < 0x7f
                      : (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
      if (!ok) return false;
    }
    // names gRPC or the front sets itself are not Python's to add
    if (i % 2 == 0 && (reserved(md[i]) || !strcmp(md[i], "authorization") || !strcmp(md[i], "x-request-id")))
      return false;
  }
  return true;
}

}  // namespace

extern "C" {
#pragma GCC visibility push(default)

// Starts the front on config->address; *port gets the bound port. python_address is the Python server's
// (plaintext: "unix:PATH", a socket in a directory only this user may enter). With tls_cert_pem and tls_key_pem
// it serves TLS; with tls_client_ca_pem too, it requires client certificates.
void* fg_start(const fg_config* config, int* port) {
  if (!config || !port || !config->address || !config->python_address || config->max_message_bytes <= 0 ||
      config->fast_threads > FG_MAX_THREADS || config->unread_window_bytes < 0 ||
      config->unread_window_bytes > INT32_MAX || config->reconnect_min_ms < 0 ||
      config->reconnect_max_ms < config->reconnect_min_ms || config->reconnect_max_ms > FG_MAX_RECONNECT_MS)
    return nullptr;
  const char* cert_pem = or_empty(config->tls_cert_pem);
  const char* key_pem = or_empty(config->tls_key_pem);
  const char* client_ca_pem = or_empty(config->tls_client_ca_pem);
  // Keep freed buffers in the heap: gRPC allocates a fresh buffer for every large message, and
  // returning each to the kernel costs a page fault and a zeroed page per 4 KiB on the next one
  // (about 15% of this front's CPU with 600 KB tensors). Only when the environment did not set them.
  if (!getenv("MALLOC_MMAP_THRESHOLD_")) mallopt(M_MMAP_THRESHOLD, 32 << 20);
  if (!getenv("MALLOC_TRIM_THRESHOLD_")) mallopt(M_TRIM_THRESHOLD, 128 << 20);
  // Debian builds Abseil with mutex deadlock detection on: a cycle check per lock, 3% of this front's CPU.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  auto* f = new Front();
  f->max_pending = config->max_pending_calls > 0 ? config->max_pending_calls : f->max_pending;
  f->keys.max_per_key = config->max_calls_per_key;
  f->max_message_bytes = f->router.max_message_bytes = config->max_message_bytes;
  f->router.reconnect_ms = {config->reconnect_min_ms, config->reconnect_max_ms};
  f->internal_auth = std::string("Bearer ") + or_empty(config->worker_token);
  f->default_deadline_ms = config->default_deadline_ms;
  f->max_deadline_ms = config->max_deadline_ms;
  f->max_samples = config->max_images_per_call;
  f->router.eject_after = config->eject_after_failures;
  if (*or_empty(config->worker_ca_pem)) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = config->worker_ca_pem;
    ssl.pem_cert_chain = or_empty(config->worker_cert_pem);
    ssl.pem_private_key = or_empty(config->worker_key_pem);
    f->router.worker_creds = grpc::SslCredentials(ssl);
  }
  f->slow = std::make_unique<grpc::GenericStub>(grpc::CreateCustomChannel(
      config->python_address, grpc::InsecureChannelCredentials(),
      channel_args(config->max_message_bytes, f->router.reconnect_ms)));
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (*cert_pem) {
    grpc::SslServerCredentialsOptions ssl(*client_ca_pem ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                                         : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    ssl.pem_key_cert_pairs.push_back({key_pem, cert_pem});
    if (*client_ca_pem) ssl.pem_root_certs = client_ca_pem;
    creds = grpc::SslServerCredentials(ssl);
  }
  *port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort(config->address, creds, port);
  builder.SetMaxReceiveMessageSize(config->max_message_bytes);
  builder.SetMaxSendMessageSize(config->max_message_bytes);
  builder.AddChannelArgument("grpc.http2.max_frame_size", 1 << 20);
  // What a caller may send before the front asks for a call's body, which it does only after checking the
  // credentials: a fixed HTTP/2 stream window (bandwidth probing grows it to megabytes on a fast link).
  builder.AddChannelArgument("grpc.http2.bdp_probe", 0);
  builder.AddChannelArgument("grpc.http2.lookahead_bytes", int(config->unread_window_bytes));
  // No compressed messages: gRPC inflates one whole before it checks its size against the limit, so a 1 MB
  // gzip message of zeros cost the gateway 1 GB. A compressed call gets UNIMPLEMENTED from its headers.
  builder.SetCompressionAlgorithmSupportStatus(GRPC_COMPRESS_DEFLATE, false);
  builder.SetCompressionAlgorithmSupportStatus(GRPC_COMPRESS_GZIP, false);
  builder.RegisterAsyncGenericService(&f->service);
  for (int i = 0; i < std::max(config->fast_threads, 1); ++i) f->cqs.push_back(builder.AddCompletionQueue());
  f->server = builder.BuildAndStart();
  if (!f->server || *port == 0) {
    f->server.reset();
    for (auto& cq : f->cqs) cq->Shutdown();
    void* tag;
    bool ok;
    for (auto& cq : f->cqs)
      while (cq->Next(&tag, &ok)) {
      }
    delete f;
    return nullptr;
  }
  // The first calls are asked for here, not on the queues' threads: a shutdown right after the start then finds
  // them (live_calls), and waits for them, before it closes the queues they were asked on.
  for (auto& cq : f->cqs)
    for (int i = 0; i < Front::kRequested; ++i) new Call(f, cq.get());
  for (auto& cq : f->cqs) f->threads.emplace_back([f, q = cq.get()] { f->serve(q); });
  f->forward_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  return f;
}

// A verified key: its digest (never the secret), id, role, model patterns (empty ones ignored), and when to stop
// answering for it here, after which its calls go through Python again.
int fg_put_key(void* fp, const fg_key* key) {
  auto* f = static_cast<Front*>(fp);
  if (!valid_key(key, true)) return -1;
  Key k;
  k.key_id = key->key_id;
  k.role = key->role;
  k.expires_ns = key->expires_ns;
  for (int64_t i = 0; i < key->n_model_patterns; ++i)
    if (*key->model_patterns[i]) k.patterns.emplace_back(key->model_patterns[i]);
  std::string digest(reinterpret_cast<const char*>(key->digest), FG_DIGEST_BYTES);
  f->keys.put(digest, std::move(k));
  return 0;
}

// A verified key with rate limits: its calls' bodies may be read here, and they go to the Python server, which
// charges the limits. Until expires_ns, like fg_put_key's.
int fg_put_limited_key(void* fp, const fg_key* key) {
  auto* f = static_cast<Front*>(fp);
  if (!valid_key(key, false)) return -1;
  Key k;
  k.key_id = key->key_id;
  k.expires_ns = key->expires_ns;
  k.native = false;
  std::string digest(reinterpret_cast<const char*>(key->digest), FG_DIGEST_BYTES);
  f->keys.put(digest, std::move(k));
  return 0;
}

// The most classes a request's classification parameter may ask for (gateway/config.py max_top_k); set
// before the first call.
void fg_set_max_top_k(void* fp, int64_t k) { static_cast<Front*>(fp)->max_top_k = k; }

namespace {
constexpr int64_t kMaxCheckBytes = (int64_t(1) << 31) - 1;  // gRPC's largest message

void copy_text(const std::string& text, char (&out)[FG_MESSAGE_BYTES]) {
  size_t n = std::min(text.size(), sizeof out - 1);
  memcpy(out, text.data(), n);
  out[n] = 0;
}

// The caller's bytes as one slice, not copied: only read during the call.
void caller_bytes(const uint8_t* data, int64_t bytes, std::vector<grpc::Slice>* slices) {
  if (bytes > 0) slices->emplace_back(data, size_t(bytes), grpc::Slice::STATIC_SLICE);
}
}  // namespace

int fg_check_infer(void* fp, const uint8_t* request, int64_t bytes, struct fg_check* out) {
  if (!fp || !out || bytes < 0 || bytes > kMaxCheckBytes || (!request && bytes > 0)) return -1;
  auto* f = static_cast<Front*>(fp);
  std::vector<grpc::Slice> slices;
  caller_bytes(request, bytes, &slices);
  Checked c = check_request(slices, f->max_top_k, f->max_samples);
  out->valid = c.rules.empty();
  out->images = c.images;
  out->elements = 0;
  out->version = 0;
  if (out->valid && !c.head.version.empty()) parse_version(c.head.version, &out->version);
  out->tensors = out->valid && c.head.tensors;
  snprintf(out->model, sizeof out->model, "%s", out->valid ? c.head.model.c_str() : "");
  copy_text(c.rules, out->message);
  copy_text(c.over_limit, out->over_limit);
  return 0;
}

int fg_check_tensor(const uint8_t* tensor, int64_t bytes, struct fg_check* out) {
  if (!out || bytes < 0 || bytes > kMaxCheckBytes || (!tensor && bytes > 0)) return -1;
  check::Input in;
  std::string message;
  uint64_t elements = 0;
  std::vector<grpc::Slice> slices;
  caller_bytes(tensor, bytes, &slices);
  Reader r(slices);
  if (!check::input(r, &in)) {
    message = "the tensor is not a valid InferInputTensor message";
  } else {
    message = check::check_tensor(in, &elements);
  }
  out->valid = message.empty();
  out->images = out->version = 0;
  out->tensors = 0;
  out->model[0] = 0;
  out->elements = message.empty() ? int64_t(elements) : 0;
  copy_text(message, out->message);
  out->over_limit[0] = 0;
  return 0;
}

// Classify's limits (gateway/config.py default_top_k, max_images_per_forward, max_image_bytes, max_image_pixels);
// set before the first call. A call past one goes to the Python server.
void fg_set_classify_limits(void* fp, int64_t default_top_k, int64_t per_forward, int64_t image_bytes,
                            int64_t image_pixels) {
  auto* f = static_cast<Front*>(fp);
  f->default_top_k = default_top_k;
  f->max_images_per_forward = per_forward;
  f->max_image_bytes = image_bytes;
  f->max_image_pixels = image_pixels;
}

// Whether calls with a sampled traceparent go to the Python server, which traces them (this front does not):
// on when the gateway's tracing is (fovea/tracing.py); set before the first call.
void fg_set_trace_sampled(void* fp, int on) { static_cast<Front*>(fp)->trace_sampled = on != 0; }

// Forgets a key (revoked, changed or deleted): its next call goes through Python again.
void fg_drop_key(void* fp, const char* key_id) {
  auto* f = static_cast<Front*>(fp);
  f->keys.drop(key_id);
}

void fg_clear_keys(void* fp) {
  auto* f = static_cast<Front*>(fp);
  f->keys.clear();
}

// Replaces the routing table: production alias targets with their weights, the versions that take images, and
// which workers have which version ready. Entries with a string out of bounds are left out and counted.
int64_t fg_set_routes(void* fp, const fg_routes* routes) {
  if (!routes || !bounded_array(routes->aliases, routes->n_aliases) ||
      !bounded_array(routes->images, routes->n_images) || !bounded_array(routes->workers, routes->n_workers))
    return -1;
  int64_t skipped = 0;
  auto aliases = valid_entries(routes->aliases, routes->n_aliases, &skipped);
  auto images = valid_entries(routes->images, routes->n_images, &skipped);
  auto workers = valid_entries(routes->workers, routes->n_workers, &skipped);
  fg_routes checked{aliases.data(), int64_t(aliases.size()), images.data(), int64_t(images.size()),
                    workers.data(), int64_t(workers.size())};
  static_cast<Front*>(fp)->router.set_routes(checked);
  return skipped;
}

void fg_counts(void* fp, fg_counters* out) {
  auto* f = static_cast<Front*>(fp);
  for (int i = 0; i < FG_STATUS_CODES; ++i) out->codes[i] = f->codes[i].load();
  out->native_calls = f->native_calls.load();
  out->python_calls = f->slow_calls.load();
  out->retries = f->retries.load();
  out->pending_calls = f->pending.load();
  out->call_objects = f->live_calls.load();
}

int64_t fg_drain_log(void* fp, fg_log_record* out, int64_t cap, int64_t* dropped) {
  auto* f = static_cast<Front*>(fp);
  std::lock_guard lock(f->log_mu);
  *dropped = f->log_dropped;
  f->log_dropped = 0;
  if (cap <= 0 || !out) return 0;
  int64_t n = std::min(cap, int64_t(f->log.size()));
  for (int64_t i = 0; i < n; ++i) {
    const LogEntry& e = f->log[size_t(i)];
    fg_log_record& r = out[i];
    r.epoch_s = e.epoch_s;
    r.seconds = e.seconds;
    r.version = e.version;
    r.code = e.code;
    copy_text(r.request_id, e.request_id);
    copy_text(r.model, e.model);
    copy_text(r.worker, e.worker);
    copy_text(r.method, e.method);
  }
  f->log.erase(f->log.begin(), f->log.begin() + n);
  return n;
}

int64_t fg_take_ejected(void* fp, fg_address* out, int64_t cap) {
  auto* f = static_cast<Front*>(fp);
  if (cap <= 0 || !out) return 0;
  auto taken = f->router.take_ejected(size_t(cap));
  for (size_t i = 0; i < taken.size(); ++i) copy_text(out[i].text, taken[i]);
  return int64_t(taken.size());
}

// A worker (by fast address) passed its probe: route to it again.
void fg_readmit(void* fp, const char* address) { static_cast<Front*>(fp)->router.readmit(address); }

int64_t fg_pick_version(void* fp, const char* model) {
  if (!fp || !model) return 0;
  auto* f = static_cast<Front*>(fp);
  return f->router.pick_version(*f->router.current(), model);
}

int64_t fg_check_classify(void* fp, int64_t nimages, const int64_t* sizes, int64_t top_k, char* refusal,
                          int32_t cap) {
  if (!fp || !refusal || cap < 1) return 0;
  refusal[0] = 0;
  if (nimages > 0 && !sizes) return 0;
  auto* f = static_cast<Front*>(fp);
  uint64_t k = 0;
  auto size_of = [&](int64_t i) { return sizes[i] < 0 ? uint64_t(0) : uint64_t(sizes[i]); };
  std::string message = classify::limits_refusal(f->classify_limits(), nimages, size_of, top_k < 0 ? 0 : uint64_t(top_k), &k);
  std::snprintf(refusal, size_t(cap), "%s", message.c_str());
  return int64_t(k);
}

void fg_check_pixels(void* fp, int64_t i, int64_t width, int64_t height, char* refusal, int32_t cap) {
  if (!fp || !refusal || cap < 1) return;
  refusal[0] = 0;
  if (width < 0 || height < 0 || width >= (int64_t(1) << 31) || height >= (int64_t(1) << 31)) {
    std::snprintf(refusal, size_t(cap), "image %lld has no sensible size", static_cast<long long>(i));
    return;
  }
  auto* f = static_cast<Front*>(fp);
  std::string message = classify::pixels_refusal(f->classify_limits(), i, uint64_t(width), uint64_t(height));
  std::snprintf(refusal, size_t(cap), "%s", message.c_str());
}

int32_t fg_canary_pick(const int32_t* weights, int32_t n) {
  if (!weights || n < 1 || n > 1024) return -1;
  std::vector<int32_t> w(weights, weights + n);
  for (int32_t x : w)
    if (x < 0 || x > 100) return -1;
  double unit = std::uniform_real_distribution<double>(0, 1)(rng());
  return int32_t(fovea::canary::pick(w, [](int32_t x) { return x; }, unit));
}

int32_t fg_model_allowed(const char* const* patterns, int32_t n, const char* model) {
  if (!model || n < 0 || n > 1024 || (n > 0 && !patterns)) return 0;
  std::vector<std::string> p;
  for (int32_t i = 0; i < n; ++i) {
    if (!patterns[i]) return 0;
    p.emplace_back(patterns[i]);
  }
  return model_allowed(p, model) ? 1 : 0;
}

int fg_choose(void* fp, const char* model, int64_t version, fg_address* out) {
  if (!fp || !model || !out) return 0;
  auto* f = static_cast<Front*>(fp);
  auto w = f->router.choose(*f->router.current(), model, version, "");
  if (!w) return 0;
  copy_text(out->text, w->address);
  return 1;
}

int fg_forward_fd(void* fp) { return static_cast<Front*>(fp)->forward_fd; }

int fg_forward_send(void* fp, const fg_forward* call) {
  auto* f = static_cast<Front*>(fp);
  if (!call || !call->model || !valid_name(call->model) || call->version <= 0 || call->version > (int64_t(1) << 62) ||
      call->request_bytes < 0 || call->request_bytes > f->max_message_bytes || (call->request_bytes && !call->request) ||
      call->timeout_ms < 0 || (call->request_id && !bounded(call->request_id)) ||
      !valid_metadata(call->metadata, call->n_metadata) ||
      (call->kind != FG_FORWARD_INFER && call->kind != FG_FORWARD_CLASSIFY))
    return -1;
  auto fw = std::make_unique<Forward>();
  fw->id = call->id;
  fw->front = f;
  fw->cq = f->cqs[f->forward_turn++ % f->cqs.size()].get();
  Upstream& net = fw->net;
  net.model = call->model;
  net.version = call->version;
  net.rid = request_id(or_empty(call->request_id));
  net.deadline = SysClock::now() + std::chrono::milliseconds(std::min(call->timeout_ms, f->max_deadline_ms));
  for (int64_t i = 0; i < call->n_metadata; ++i) net.metadata.emplace_back(call->metadata[2 * i], call->metadata[2 * i + 1]);
  const char* bytes = reinterpret_cast<const char*>(call->request);
  if (call->kind == FG_FORWARD_CLASSIFY) {
    if (!bounded(call->input) || !bounded(call->output) || call->width < 0 || call->top_k < 1 ||
        call->top_k > f->max_top_k)
      return -1;
    std::string body(bytes ? bytes : "", size_t(call->request_bytes));
    classify::Request req;
    if (!classify::read_request(body, &req) || req.images.empty() || int64_t(req.images.size()) > f->max_samples)
      return -1;
    ImageModel m{call->input, call->output, call->width};
    net.request = classify_request(net.model, net.version, m, req.images, uint64_t(call->top_k));
    for (auto& img : req.images) fw->image_ids.push_back(std::move(img.id));
    fw->classify = true;
    net.tensors = false;
  } else {
    grpc::Slice slice(bytes ? bytes : "", size_t(call->request_bytes));
    net.request = ByteBuffer(&slice, 1);
    net.tensors = call->tensors != 0;
  }
  net.routes = f->router.current();
  std::lock_guard lock(f->forward_mu);
  if (f->forward_closed) return -2;
  if (f->forwarding.count(fw->id)) return -1;
  Forward* p = fw.release();
  std::lock_guard call_lock(p->mu);
  Status st;
  if (!p->net.choose(f, false, &st)) {  // answered at once: no worker has the version, or no time is left
    p->unrouted = !p->net.worker;
    p->code = int(st.error_code());
    p->out = st.error_message();
    f->post_ended(p);
    return 0;
  }
  f->forwarding[p->id] = p;
  p->net.send(f, p->cq, static_cast<Op*>(p));  // serve() reads every tag as an Op
  return 0;
}

int64_t fg_forward_take(void* fp, fg_forward_result* out, int64_t cap) {
  auto* f = static_cast<Front*>(fp);
  if (cap <= 0 || !out) return 0;
  std::lock_guard lock(f->forward_mu);
  int64_t n = std::min(cap, int64_t(f->forwarded.size()));
  for (int64_t i = 0; i < n; ++i) {
    Forward* fw = f->forwarded.front();
    f->forwarded.pop_front();
    fg_forward_result& r = out[i];
    r.id = fw->id;
    r.code = fw->code;
    r.unrouted = fw->unrouted ? 1 : 0;
    r.data = reinterpret_cast<const uint8_t*>(fw->out.data());
    r.size = int64_t(fw->out.size());
    copy_text(r.worker, fw->worker);
    r.owner = fw;
  }
  return n;
}

void fg_forward_release(void*, fg_forward_result* results, int64_t n) {
  if (!results) return;
  for (int64_t i = 0; i < n; ++i) {
    delete static_cast<Forward*>(results[i].owner);
    results[i].owner = nullptr;
    results[i].data = nullptr;
  }
}

void fg_forward_cancel(void* fp, uint64_t id) {
  auto* f = static_cast<Front*>(fp);
  std::lock_guard lock(f->forward_mu);
  auto it = f->forwarding.find(id);
  if (it != f->forwarding.end()) cancel_forward(it->second);
}

void fg_set_accepting(void* fp, int accepting) { static_cast<Front*>(fp)->accepting = accepting != 0; }

void fg_shutdown(void* fp, double grace_s) {
  auto* f = static_cast<Front*>(fp);
  if (f->stopped) return;
  f->stopped = true;
  f->accepting = false;
  // Calls still running at the deadline are cancelled; the queues' threads run them to their end meanwhile.
  f->server->Shutdown(SysClock::now() + std::chrono::microseconds(int64_t(grace_s * 1e6)));
  f->server->Wait();
  // Wait does not wait for the call objects: a call cancelled at the deadline (a relayed stream, say) still
  // has events to come on its queue (its end, its upstream call's failed read), and handling them starts
  // operations (the upstream's Finish, the request for the next call). gRPC aborts the process on an
  // operation started on a queue that is shut down (call.cc: grpc_cq_begin_op), so the queues close only
  // after the last call object is freed. Each one ends: the server cancelled its call, a call's end cancels
  // its upstream call, and a request for a call after Shutdown fails at once.
  while (f->live_calls.load() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  // Routed calls: none new; those in flight are cancelled, and end on their queues before those close.
  {
    std::lock_guard lock(f->forward_mu);
    f->forward_closed = true;
    for (auto& [id, fw] : f->forwarding) cancel_forward(fw);
  }
  while (true) {
    {
      std::lock_guard lock(f->forward_mu);
      if (f->forwarding.empty()) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  for (auto& cq : f->cqs) cq->Shutdown();
  for (auto& t : f->threads) t.join();
}

void fg_free(void* fp) {
  auto* f = static_cast<Front*>(fp);
  fg_shutdown(fp, 0);
  f->server.reset();
  for (Forward* fw : f->forwarded) delete fw;  // ended, never taken
  if (f->forward_fd >= 0) close(f->forward_fd);
  delete f;
}

#pragma GCC visibility pop
}  // extern "C"
