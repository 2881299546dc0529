// The front's routing table and its workers: which versions an alias sends calls to (the canary pick),
// which workers serve each version and how loaded each is (the power of two choices), and which are set aside
// after failing (ejection; Python's probe re-admits them). The one copy of these rules for every call the
// gateway routes: the front's own and those Python sends through fg_forward_send.
// A part of front.cc, which includes it (in its anonymous namespace) after now_ns(), rng(), <grpcpp/grpcpp.h>,
// <grpcpp/generic/generic_stub.h>, canary.h and the standard headers it uses.
#pragma once

struct Worker {
  std::string address;                      // its fast port
  std::string main_address;                 // its main port
  std::shared_ptr<grpc::Channel> stub_channel, main_channel;
  std::unique_ptr<grpc::GenericStub> stub;  // to the fast port
  std::unique_ptr<grpc::GenericStub> main;  // to its main port, for images and typed contents
  std::atomic<int> in_flight{0};  // this front's calls on it now
  std::atomic<int> elsewhere{0};  // other gateways' calls on it, as its last heartbeat let this front judge
  std::atomic<int> failures{0};
  std::atomic<int64_t> ejected_until_ns{0};
  int64_t redialed_ns = 0;  // when a routing table last cut its reconnect wait short (routes_mu_)
};

// What Classify needs of a model version that takes images: its input and output tensors' names and the
// output's width (the classes; 0 when unknown).
struct ImageModel {
  std::string input, output;
  int64_t width = 0;
};

struct Routes {
  std::unordered_map<std::string, std::vector<std::pair<int64_t, double>>> production;  // model -> versions, weights
  std::unordered_map<std::string, std::vector<std::shared_ptr<Worker>>> serving;         // "model\nversion" -> workers
  std::unordered_map<std::string, ImageModel> images;  // "model\nversion" -> its tensors, for Classify
};

// reconnect_ms: the first and the longest wait before dialling a worker again (fg_config; {0, 0}: gRPC's own).
grpc::ChannelArguments channel_args(int max_message_bytes, std::pair<int, int> reconnect_ms) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  if (reconnect_ms.first > 0) {
    args.SetInt("grpc.initial_reconnect_backoff_ms", reconnect_ms.first);
    args.SetInt("grpc.min_reconnect_backoff_ms", reconnect_ms.first);
    args.SetInt("grpc.max_reconnect_backoff_ms", reconnect_ms.second);
  }
  args.SetInt("grpc.http2.max_frame_size", 1 << 20);
  args.SetInt("grpc.http2.lookahead_bytes", 8 << 20);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // one connection per gateway, not shared with grpcio's
  return args;
}

class Router {
 public:
  // Set before the first table (fg_start).
  int max_message_bytes = 0;
  std::pair<int, int> reconnect_ms{0, 0};  // gateway/config.py RECONNECT_S unless set
  int eject_after = 3;
  // TLS to the workers (their CA, and this gateway's certificate for mutual TLS); null: plaintext.
  std::shared_ptr<grpc::ChannelCredentials> worker_creds;

  // The table now: a call keeps the one it started with, through its retry.
  std::shared_ptr<const Routes> current() {
    std::lock_guard lock(routes_mu_);
    return routes_;
  }

  // Power of two choices over the workers serving model/version, skipping those tried or ejected.
  std::shared_ptr<Worker> choose(const Routes& r, const std::string& model, int64_t version, const std::string& tried) {
    auto it = r.serving.find(model + "\n" + std::to_string(version));
    if (it == r.serving.end()) return nullptr;
    std::vector<std::shared_ptr<Worker>> ok, ejected;
    int64_t now = now_ns();
    for (const auto& w : it->second) {
      if (!tried.empty() && tried == w->address) continue;
      (w->ejected_until_ns.load() > now ? ejected : ok).push_back(w);
    }
    auto& pool = ok.empty() ? ejected : ok;
    if (pool.empty()) return nullptr;
    if (pool.size() == 1) return pool[0];
    size_t a = rng()() % pool.size(), b = rng()() % (pool.size() - 1);
    if (b >= a) ++b;
    // This front's calls, counted live, plus what other gateways had on it at its last heartbeat. The live
    // count always decides between workers the others leave equal: a heartbeat up to a second old must
    // not outweigh it (a floor taken from it hid the live count, and one worker took 61% of an even load).
    auto load = [](const Worker& w) { return w.in_flight.load() + w.elsewhere.load(); };
    return load(*pool[a]) <= load(*pool[b]) ? pool[a] : pool[b];
  }

  // The version a call for model without one goes to: a production alias target, by weight; 0: no alias.
  int64_t pick_version(const Routes& r, const std::string& model) {
    auto it = r.production.find(model);
    if (it == r.production.end() || it->second.empty()) return 0;
    const auto& targets = it->second;
    if (targets.size() == 1) return targets[0].first;
    double unit = std::uniform_real_distribution<double>(0, 1)(rng());
    return targets[fovea::canary::pick(targets, [](const auto& t) { return t.second; }, unit)].first;
  }

  // A call on w ended: ok, or UNAVAILABLE. eject_after failures in a row set it aside.
  void record(Worker& w, bool ok) {
    if (ok) {
      w.failures = 0;
      return;
    }
    if (++w.failures < eject_after) return;
    int64_t now = now_ns(), until = w.ejected_until_ns.load();
    // Set aside until Python's health probe re-admits it (fg_readmit); report it once per ejection.
    if (until <= now && w.ejected_until_ns.compare_exchange_strong(until, now + int64_t(kEjectFallbackS * 1e9))) {
      std::lock_guard lock(ejected_mu_);
      ejected_.push_back(w.address);
    }
  }

  // Python's probe found the worker (by fast address) serving: route to it again.
  void readmit(const std::string& address) {
    std::lock_guard lock(routes_mu_);
    for (auto& [key, w] : workers_)
      if (w->address == address) {
        w->failures = 0;
        w->ejected_until_ns = 0;
      }
  }

  // The table Python sent (fg_set_routes; bounds already checked). Entries are kept as they come: an alias's
  // targets in order, a version's workers in order; a worker (by both addresses) keeps its channels across tables.
  void set_routes(const fg_routes& in) {
    auto r = std::make_shared<Routes>();
    std::lock_guard lock(routes_mu_);
    for (int64_t i = 0; i < in.n_aliases; ++i) {
      const fg_alias_target& a = in.aliases[i];
      r->production[a.model].emplace_back(a.version, a.weight);
    }
    for (int64_t i = 0; i < in.n_images; ++i) {
      const fg_image_model& m = in.images[i];
      r->images[std::string(m.model) + "\n" + std::to_string(m.version)] = ImageModel{m.input, m.output, m.width};
    }
    std::unordered_map<Worker*, int64_t> reported;  // a worker's queue over every version it serves
    for (int64_t i = 0; i < in.n_workers; ++i) {
      const fg_worker_route& e = in.workers[i];
      std::string address = e.fast_address, main = e.main_address;
      auto& w = workers_[address + "\n" + main];
      if (!w) {
        w = std::make_shared<Worker>();
        w->address = address;
        w->main_address = main;
        auto creds = worker_creds ? worker_creds : grpc::InsecureChannelCredentials();
        w->stub_channel = grpc::CreateCustomChannel(address, creds, channel_args(max_message_bytes, reconnect_ms));
        w->main_channel = grpc::CreateCustomChannel(main, creds, channel_args(max_message_bytes, reconnect_ms));
        w->stub = std::make_unique<grpc::GenericStub>(w->stub_channel);
        w->main = std::make_unique<grpc::GenericStub>(w->main_channel);
      }
      // The registry has just heard from it: a channel still waiting out its reconnect backoff (the worker
      // restarted, or was out of reach) dials now rather than failing every call until the wait ends. At most
      // once a second: tables come with every worker's heartbeats, and a worker this gateway cannot reach
      // while the registry can must not be dialled at their rate.
      int64_t now = now_ns();
      if (now - w->redialed_ns >= kRedialEveryNs)
        for (grpc::Channel* c : {w->stub_channel.get(), w->main_channel.get()})
          if (c->GetState(false) == GRPC_CHANNEL_TRANSIENT_FAILURE) {
            grpc::experimental::ChannelResetConnectionBackoff(c);
            w->redialed_ns = now;
          }
      reported[w.get()] += std::clamp<int64_t>(e.queue_depth, 0, kMaxReportedQueue);
      r->serving[std::string(e.model) + "\n" + std::to_string(e.version)].push_back(w);
    }
    // The reported queue counts this front's calls too: what exceeds its count now is other gateways'.
    for (auto [w, queued] : reported)
      w->elsewhere = int(std::clamp<int64_t>(queued - w->in_flight.load(), 0, kMaxReportedQueue));
    routes_ = r;
    // Workers that left: what set one aside ends with it (Python's probe of it stopped with its registration),
    // so one that registers again starts clean even while a call still holds it here. Their channels close
    // once no call holds them.
    std::set<const Worker*> listed;
    for (const auto& [key, ws] : r->serving)
      for (const auto& w : ws) listed.insert(w.get());
    for (auto it = workers_.begin(); it != workers_.end();) {
      if (listed.count(it->second.get())) {
        ++it;
        continue;
      }
      it->second->failures = 0;
      it->second->ejected_until_ns = 0;
      it = it->second.use_count() == 1 ? workers_.erase(it) : std::next(it);
    }
  }

  // Up to cap fast addresses of workers ejected since Python last asked (Python probes them); the rest stay.
  std::vector<std::string> take_ejected(size_t cap) {
    std::lock_guard lock(ejected_mu_);
    size_t n = std::min(cap, ejected_.size());
    std::vector<std::string> out(ejected_.begin(), ejected_.begin() + std::ptrdiff_t(n));
    ejected_.erase(ejected_.begin(), ejected_.begin() + std::ptrdiff_t(n));
    return out;
  }

 private:
  static constexpr double kEjectFallbackS = 60;  // in case no re-admission ever comes
  static constexpr int64_t kRedialEveryNs = 1000000000;  // a routing table cuts a reconnect wait short once a second
  static constexpr int64_t kMaxReportedQueue = 1 << 20;  // a heartbeat's queue counted up to this, so sums stay in int
  std::mutex routes_mu_;
  std::shared_ptr<const Routes> routes_ = std::make_shared<Routes>();
  std::unordered_map<std::string, std::shared_ptr<Worker>> workers_;  // by address: channels outlive table updates
  std::mutex ejected_mu_;
  std::vector<std::string> ejected_;
};
