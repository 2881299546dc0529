// The worker's one check of a caller: every call on its port, answered by the front or relayed to Python,
// must carry one of the accepted internal tokens (auth.cc). Health and reflection need none.
#pragma once

#include <grpcpp/grpcpp.h>

#include <string>
#include <vector>

namespace fovea {

// Whether presented is one of accepted, in time independent of where they differ.
bool token_matches(const std::string& presented, const std::vector<std::string>& accepted);

// OK, or UNAUTHENTICATED with why: no 'authorization: Bearer <token>', or a token not accepted.
grpc::Status authenticate(const grpc::ServerContextBase& ctx, const std::vector<std::string>& tokens);

// Methods any caller may use: gRPC health checks (the gateways' probes, Kubernetes) and reflection.
bool open_method(const std::string& method);

}  // namespace fovea
