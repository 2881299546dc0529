// The front's API keys: those Python verified with the registry (by the SHA-256 of the secret, never the
// secret), what each may do here, and each key's share of the pending-call slots. The one copy of the
// authorisation rule for calls the front answers (gateway/auth.py words the refusals of those it passes on).
// A part of front.cc, which includes it (in its anonymous namespace) after now_ns(), <fnmatch.h>, <mutex>,
// <shared_mutex>, <string>, <unordered_map> and <vector>.
#pragma once

constexpr int kRoleInfer = 1;  // fovea.v1.Role.ROLE_INFER

// Whether a key with these model patterns may use model: patterns are fnmatch(3)'s (no escapes), the grammar key
// creation accepts; none: every model. The gateway's one copy (Python's checks ask it, fg_model_allowed).
template <class Patterns>
bool model_allowed(const Patterns& patterns, const char* model) {
  if (patterns.empty()) return true;
  for (const auto& p : patterns)
    if (fnmatch(p.c_str(), model, FNM_NOESCAPE) == 0) return true;
  return false;
}

struct Key {
  std::string key_id;
  int role = 0;
  std::vector<std::string> patterns;
  int64_t expires_ns = 0;  // the key's expiry or the end of its time in this cache, whichever is first
  bool native = true;      // false: a key with rate limits, verified but served by the Python server
};

class Keys {
 public:
  // By the SHA-256 of the secret (fg_put_key, fg_put_limited_key; bounds already checked).
  void put(const std::string& digest, Key key) {
    std::unique_lock lock(mu_);
    keys_[digest] = std::move(key);
  }

  void drop(const std::string& key_id) {
    std::unique_lock lock(mu_);
    for (auto it = keys_.begin(); it != keys_.end();)
      it = it->second.key_id == key_id ? keys_.erase(it) : std::next(it);
  }

  void clear() {
    std::unique_lock lock(mu_);
    keys_.clear();
  }

  // Whether the key with this digest (of its secret) was verified by Python and may infer on the model now.
  bool admit(const std::string& digest, const std::string& model) {
    std::shared_lock lock(mu_);
    auto it = keys_.find(digest);
    if (it == keys_.end()) return false;
    const Key& k = it->second;
    if (!k.native || k.role < kRoleInfer || (k.expires_ns && k.expires_ns <= now_ns())) return false;
    return model_allowed(k.patterns, model.c_str());
  }

  // Whether this key's calls may be answered here (a key without limits, not expired, allowed to infer),
  // before its model is known: a Classify of any other key goes to Python without its body being copied.
  bool native_key(const std::string& digest) {
    std::shared_lock lock(mu_);
    auto it = keys_.find(digest);
    if (it == keys_.end()) return false;
    const Key& k = it->second;
    return k.native && k.role >= kRoleInfer && (!k.expires_ns || k.expires_ns > now_ns());
  }

  // Whether Python verified this key and it has not expired here: its call's body may be read.
  bool known(const std::string& digest) {
    std::shared_lock lock(mu_);
    auto it = keys_.find(digest);
    return it != keys_.end() && (!it->second.expires_ns || it->second.expires_ns > now_ns());
  }

  // Calls in progress per key (by digest): one key's calls, however slow or idle (a stream that sends nothing,
  // say), cannot take every pending-call slot from the other callers. max_per_key <= 0: no per-key bound.
  int64_t max_per_key = 0;

  bool take_slot(const std::string& digest) {
    if (max_per_key <= 0) return true;
    std::lock_guard lock(slots_mu_);
    int64_t& n = slots_[digest];
    if (n >= max_per_key) return false;
    ++n;
    return true;
  }

  void give_slot(const std::string& digest) {
    std::lock_guard lock(slots_mu_);
    auto it = slots_.find(digest);
    if (it != slots_.end() && --it->second <= 0) slots_.erase(it);
  }

 private:
  std::shared_mutex mu_;
  std::unordered_map<std::string, Key> keys_;  // SHA-256 of the secret -> key
  std::mutex slots_mu_;
  std::unordered_map<std::string, int64_t> slots_;
};
