// The worker's relay (see relay.h). Python's server listens on a unix socket in a private directory; the
// front's public port takes every call and hands Python, unchanged, the ones it does not answer itself:
// ModelInfer with typed contents or encoded images, streams, health, reflection, metadata and the rest.
// Messages, the caller's metadata and deadline go up; Python's initial metadata, messages, status and
// trailing metadata (a 'fovea-unserved: 1' on a refusal) come back as they were sent.
//
// As in the gateway's front: one completion queue and its thread run every relayed call on both sides,
// each event on that thread only, so a call needs no lock. A stream is relayed message by message, one
// message in flight each way, so flow control reaches from the caller to Python and back; a unary call
// is relayed the same way (one message, then the half-close).

#include "relay.h"

#include "auth.h"

#include <chrono>

namespace fovea {

namespace {

using grpc::Status;
using SysClock = std::chrono::system_clock;

// Headers gRPC sets itself on each hop.
bool reserved(const std::string& k) {
  return k.empty() || k[0] == ':' || k.rfind("grpc-", 0) == 0 || k == "te" || k == "content-type" ||
         k == "user-agent";
}

// The upstream call's context: the caller's deadline and metadata as they came.
template <class ServerContext>
std::unique_ptr<grpc::ClientContext> upstream_context(const ServerContext& ctx) {
  auto up = std::make_unique<grpc::ClientContext>();
  if (ctx.deadline() != SysClock::time_point::max()) up->set_deadline(ctx.deadline());
  for (const auto& [k, v] : ctx.client_metadata()) {
    std::string key(k.data(), k.size());
    if (!reserved(key)) up->AddMetadata(key, std::string(v.data(), v.size()));
  }
  return up;
}

template <class ServerContext>
void copy_metadata(const grpc::ClientContext& up, ServerContext* ctx, bool trailing) {
  const auto& md = trailing ? up.GetServerTrailingMetadata() : up.GetServerInitialMetadata();
  for (const auto& [k, v] : md) {
    std::string key(k.data(), k.size());
    if (reserved(key)) continue;
    if (trailing) {
      ctx->AddTrailingMetadata(key, std::string(v.data(), v.size()));
    } else {
      ctx->AddInitialMetadata(key, std::string(v.data(), v.size()));
    }
  }
}

// One call of a method the front's own service does not take, from its arrival to its end.
class Stream {
 public:
  enum Event { kNew, kDone, kFinish, kRead, kWrite, kUpStart, kUpRead, kUpWrite, kUpWritesDone, kUpFinish, kEvents };
  struct Tag final : RelayOp {
    Stream* call = nullptr;
    Event event = kNew;
    void done(bool ok) override { call->run(event, ok); }
  };

  explicit Stream(Relay* r) : r_(r) {
    for (int e = 0; e < kEvents; ++e) {
      tags_[e].call = this;
      tags_[e].event = Event(e);
    }
    r->live++;
    // Before the call starts, or gRPC never reports its end; it reports it only for a call that started.
    ctx_.AsyncNotifyWhenDone(&tags_[kDone]);
    r->service.RequestCall(&ctx_, &stream_, r->cq.get(), r->cq.get(), start(kNew));
  }
  ~Stream() { r_->live--; }

 private:
  void* start(Event e) {  // an operation reports e when it completes
    ops_++;
    return &tags_[e];
  }

  // Runs one event, then frees the call once no operation of it is outstanding.
  void run(Event e, bool ok) {
    ops_--;
    on(e, ok);
    if (ops_ == 0) delete this;
  }

  void on(Event e, bool ok) {
    switch (e) {
      case kNew:
        if (!ok) return;  // the server is shutting down
        ops_++;           // its end (kDone), asked for in the constructor
        new Stream(r_);   // the next call this queue takes
        if (!open_method(ctx_.method())) {  // the one check of a relayed call: Python's server makes none
          Status auth = authenticate(ctx_, r_->tokens);
          if (!auth.ok()) {
            stream_.Finish(auth, start(kFinish));
            return;
          }
        }
        up_ = upstream_context(ctx_);
        bidi_ = r_->stub->PrepareCall(up_.get(), ctx_.method(), r_->cq.get());
        up_pending_ = true;
        bidi_->StartCall(start(kUpStart));
        return;
      case kDone:  // the call ended; if the caller cancelled it (or the server's grace ran out), so is upstream
        if (ctx_.IsCancelled() && up_pending_) up_->TryCancel();
        return;
      case kFinish:
        return;
      case kUpStart:
        if (!ok) {
          bidi_->Finish(&up_status_, start(kUpFinish));
          return;
        }
        bidi_->Read(&resp_, start(kUpRead));
        stream_.Read(&req_, start(kRead));
        return;
      case kRead:               // from the caller
        if (up_closed_) return;  // upstream ended: its status finishes the call
        if (ok) {
          bidi_->Write(req_, start(kUpWrite));  // the next read from the caller waits for this write
        } else {
          bidi_->WritesDone(start(kUpWritesDone));  // the caller half-closed
        }
        return;
      case kUpWrite:
        if (ok && !up_closed_) stream_.Read(&req_, start(kRead));  // else its status finishes the call
        return;
      case kUpWritesDone:
        return;
      case kUpRead:
        if (ok) {
          if (!initial_copied_) copy_metadata(*up_, &ctx_, false);
          initial_copied_ = true;
          stream_.Write(resp_, start(kWrite));
        } else {
          up_closed_ = true;
          bidi_->Finish(&up_status_, start(kUpFinish));
        }
        return;
      case kWrite:
        if (!ok) up_->TryCancel();  // the caller is gone; the next read ends the upstream call
        bidi_->Read(&resp_, start(kUpRead));
        return;
      case kUpFinish:
        up_pending_ = false;
        if (!initial_copied_) copy_metadata(*up_, &ctx_, false);
        initial_copied_ = true;
        copy_metadata(*up_, &ctx_, true);
        stream_.Finish(up_status_, start(kFinish));
        return;
      default:
        return;
    }
  }

  Relay* r_;
  Tag tags_[kEvents];
  int ops_ = 0;  // operations started whose event has not come back yet
  grpc::GenericServerContext ctx_;
  grpc::GenericServerAsyncReaderWriter stream_{&ctx_};
  grpc::ByteBuffer req_, resp_;
  std::unique_ptr<grpc::ClientContext> up_;  // declared before the reader, so destroyed after it
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> bidi_;
  Status up_status_;
  bool up_pending_ = false;  // an upstream call is in progress (cancel it if the caller goes)
  bool up_closed_ = false;   // upstream sent its last message
  bool initial_copied_ = false;
};

}  // namespace

// A ModelInfer the front parsed and left to Python.
class RelayedUnary final : public RelayOp {
 public:
  RelayedUnary(Relay* r, grpc::CallbackServerContext* ctx, grpc::ByteBuffer* out, grpc::ServerUnaryReactor* reactor)
      : r_(r), ctx_(ctx), out_(out), reactor_(reactor), up_(upstream_context(*ctx)) {}

  void start(const std::string& method, const grpc::ByteBuffer& request) {
    reader_ = r_->stub->PrepareUnaryCall(up_.get(), method, request, r_->cq.get());
    reader_->StartCall();
    reader_->Finish(&resp_, &status_, this);
  }

  void cancel() { up_->TryCancel(); }

  void done(bool) override {
    {
      std::lock_guard lock(r_->unary_mu);
      r_->unaries.erase(this);
    }
    copy_metadata(*up_, ctx_, false);
    copy_metadata(*up_, ctx_, true);
    if (status_.ok()) out_->Swap(&resp_);
    reactor_->Finish(status_);
    reader_.reset();  // lives in the upstream call's arena: freed before its context
    r_->live--;
    delete this;
  }

 private:
  Relay* r_;
  grpc::CallbackServerContext* ctx_;
  grpc::ByteBuffer* out_;
  grpc::ServerUnaryReactor* reactor_;
  std::unique_ptr<grpc::ClientContext> up_;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> reader_;
  grpc::ByteBuffer resp_;
  Status status_;
};

Relay::Relay(grpc::ServerBuilder* builder, const std::string& upstream, int max_message_bytes,
             std::vector<std::string> tokens)
    : tokens(std::move(tokens)) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  args.SetInt("grpc.http2.max_frame_size", 1 << 20);
  args.SetInt("grpc.http2.lookahead_bytes", 8 << 20);
  // Python restarts never happen without this process: reconnect at once if its socket ever refuses.
  args.SetInt("grpc.initial_reconnect_backoff_ms", 100);
  args.SetInt("grpc.min_reconnect_backoff_ms", 100);
  args.SetInt("grpc.max_reconnect_backoff_ms", 1000);
  stub = std::make_unique<grpc::GenericStub>(
      grpc::CreateCustomChannel(upstream, grpc::InsecureChannelCredentials(), args));
  builder->RegisterAsyncGenericService(&service);
  cq = builder->AddCompletionQueue();
}

Relay::~Relay() { stop(); }

void Relay::start() {
  constexpr int kRequested = 16;  // calls the queue waits for at a time
  for (int i = 0; i < kRequested; ++i) new Stream(this);
  thread_ = std::thread([this] {
    void* tag;
    bool ok;
    while (cq->Next(&tag, &ok)) static_cast<RelayOp*>(tag)->done(ok);
  });
}

void Relay::unary(grpc::CallbackServerContext* ctx, const std::string& method, const grpc::ByteBuffer& request,
                  grpc::ByteBuffer* out, grpc::ServerUnaryReactor* reactor) {
  auto* call = new RelayedUnary(this, ctx, out, reactor);
  live++;
  {
    std::lock_guard lock(unary_mu);
    unaries.insert(call);
  }
  call->start(method, request);
}

void Relay::cancel_all() {
  std::lock_guard lock(unary_mu);
  for (auto* call : unaries) call->cancel();
}

void Relay::stop() {
  if (stopped_ || !cq) return;
  stopped_ = true;
  if (!thread_.joinable()) {  // never started: drain the requests the queue holds
    cq->Shutdown();
    void* tag;
    bool ok;
    while (cq->Next(&tag, &ok)) {
    }
    return;
  }
  // gRPC aborts the process on an operation started on a queue that is shut down, and a call object's
  // last events (its end, its upstream's failed read) start operations: the queue closes only after
  // the last call object is freed. Each one ends: the server cancelled its call, a call's end cancels
  // its upstream call, and a request for a call after the server's Shutdown fails at once.
  while (live.load() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  cq->Shutdown();
  thread_.join();
}

}  // namespace fovea
