// See auth.h. The messages follow fovea/rpc.py's bearer_token and internal_authenticator (the registry's
// check), so a refused caller reads much the same from every Fovea service.

#include "auth.h"

#include <strings.h>

#include <cstdint>

namespace fovea {

bool token_matches(const std::string& presented, const std::vector<std::string>& accepted) {
  // Constant time over every accepted token: no early exit on length or content.
  bool found = false;
  for (const auto& t : accepted) {
    if (t.empty()) continue;
    unsigned diff = presented.size() ^ t.size();
    for (size_t i = 0; i < presented.size(); ++i) diff |= uint8_t(presented[i]) ^ uint8_t(t[i % t.size()]);
    found |= diff == 0;
  }
  return found;
}

grpc::Status authenticate(const grpc::ServerContextBase& ctx, const std::vector<std::string>& tokens) {
  using grpc::StatusCode;
  const auto& md = ctx.client_metadata();
  auto auth = md.find("authorization");
  if (auth == md.end())
    return grpc::Status(StatusCode::UNAUTHENTICATED, "missing credentials: send metadata 'authorization: Bearer <token>'");
  std::string value(auth->second.data(), auth->second.size());
  if (value.size() < 8 || strncasecmp(value.c_str(), "bearer ", 7) != 0)
    return grpc::Status(StatusCode::UNAUTHENTICATED, "malformed credentials: expected 'authorization: Bearer <token>'");
  std::string token = value.substr(7);
  token.erase(0, token.find_first_not_of(' '));
  token.erase(token.find_last_not_of(' ') + 1);
  if (!token_matches(token, tokens))
    return grpc::Status(StatusCode::UNAUTHENTICATED,
                        "invalid internal credentials: this service only takes calls from Fovea services");
  return grpc::Status::OK;
}

bool open_method(const std::string& method) {
  return method.rfind("/grpc.health.v1.", 0) == 0 || method.rfind("/grpc.reflection.", 0) == 0;
}

}  // namespace fovea
