// The worker's relay: every call the native front does not answer itself goes, byte for byte, to the
// worker's Python gRPC server on its private unix socket (relay.cc).
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace fovea {

// A completion-queue event of a relayed call.
struct RelayOp {
  virtual void done(bool ok) = 0;
  virtual ~RelayOp() = default;
};

class RelayedUnary;

class Relay {
 public:
  // Before BuildAndStart: registers a generic service (the methods the front's own service leaves out)
  // and its completion queue on builder. upstream: the Python server's address ("unix:/path"). tokens: the
  // internal tokens a caller must present (auth.h), checked here for every call but health and reflection,
  // so the Python server behind takes the relay's word for it.
  Relay(grpc::ServerBuilder* builder, const std::string& upstream, int max_message_bytes,
        std::vector<std::string> tokens);
  ~Relay();
  // After BuildAndStart: one thread takes every relayed call, both sides, so a call needs no lock.
  void start();
  // A ModelInfer the front read and leaves to Python (typed contents, BYTES, a version it does not
  // hold): request as it came; the reactor is finished with Python's answer, metadata included.
  void unary(grpc::CallbackServerContext* ctx, const std::string& method, const grpc::ByteBuffer& request,
             grpc::ByteBuffer* out, grpc::ServerUnaryReactor* reactor);
  // After the server's Shutdown deadline: cancels the relayed ModelInfer calls still open upstream (the
  // generic ones are cancelled with their server call), so that the server's Wait returns.
  void cancel_all();
  // After the server's Wait: waits for the last call object, then closes the queue and joins its thread.
  void stop();

  grpc::AsyncGenericService service;
  std::unique_ptr<grpc::ServerCompletionQueue> cq;
  std::unique_ptr<grpc::GenericStub> stub;
  std::atomic<int64_t> live{0};  // call objects: relayed calls in progress and those waiting for a call
  std::mutex unary_mu;
  std::set<RelayedUnary*> unaries;  // relayed ModelInfer calls in progress
  const std::vector<std::string> tokens;

 private:
  std::thread thread_;
  bool stopped_ = false;
};

}  // namespace fovea
