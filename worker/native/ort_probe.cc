// Proves each entry of ort_api.h against the real libonnxruntime: calls it the way ort_loop.cc does and
// prints, one JSON object a line, what it observed. tests/worker/test_ort_api.py runs it and checks each
// observation against ONNX Runtime's Python API on the same models, or against what only that function
// would do (an error naming its subject, a value read back, memory given back, threads started).
//
//   ort_probe LIBONNXRUNTIME RUN_MODEL BIG_MODEL WEIGHTS_MODEL
//
// RUN_MODEL: input x FP32 [2,3,5]; outputs doubled = 2x (FP32) and truncated = Cast(x, INT64).
// BIG_MODEL: input x FP32 [1]; output s = ReduceSum(Expand(x, [kBigFloats])), a 128 MB intermediate.
// WEIGHTS_MODEL: any model whose weights are a few MB (a session that is not released shows in RSS).

#include <dirent.h>
#include <dlfcn.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "ort_api.h"

using namespace fv_ort;  // NOLINT

namespace {

const void* const* g_api = nullptr;
#define ORT(name) FV_ORT(g_api, name)

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += char(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += char(c);
    }
  }
  return out + "\"";
}

// One observation: {"proof": name, ...fields}, fields already JSON.
void emit(const std::string& proof, const std::vector<std::pair<std::string, std::string>>& fields) {
  std::string line = "{\"proof\": " + quote(proof);
  for (auto& [k, v] : fields) line += ", " + quote(k) + ": " + v;
  std::printf("%s}\n", line.c_str());
  std::fflush(stdout);
}

// Code and message of a status (code 0 and "" for success); frees it.
std::pair<int, std::string> status(OrtStatus* st) {
  if (!st) return {0, ""};
  std::pair<int, std::string> out{ORT(GetErrorCode)(st), ORT(GetErrorMessage)(st)};
  ORT(ReleaseStatus)(st);
  return out;
}

void must(OrtStatus* st, const char* what) {
  auto [code, message] = status(st);
  if (code) {
    std::fprintf(stderr, "%s failed: %d %s\n", what, code, message.c_str());
    std::exit(2);
  }
}

long rss_kb() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  return -1;
}

int threads() {
  int n = 0;
  if (DIR* d = opendir("/proc/self/task")) {
    while (dirent* e = readdir(d))
      if (e->d_name[0] != '.') n++;
    closedir(d);
  }
  return n;
}

// The thread count once it holds still for 20 ms (at most 2 s): a pool's threads that a released session joined
// can still be listed for a moment (slowly under the sanitizers), and would count against the next session.
int settled_threads() {
  int n = threads();
  for (int i = 0; i < 100; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    int again = threads();
    if (again == n) break;
    n = again;
  }
  return n;
}

std::string read_file(const char* path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

OrtSessionOptions* options(int intra, bool arena) {
  OrtSessionOptions* so = nullptr;
  must(ORT(CreateSessionOptions)(&so), "CreateSessionOptions");
  must(ORT(SetIntraOpNumThreads)(so, intra), "SetIntraOpNumThreads");
  must(ORT(SetInterOpNumThreads)(so, 1), "SetInterOpNumThreads");
  must(arena ? ORT(EnableCpuMemArena)(so) : ORT(DisableCpuMemArena)(so), "arena");
  return so;
}

OrtSession* session(OrtEnv* env, const std::string& model, OrtSessionOptions* so) {
  OrtSession* s = nullptr;
  must(ORT(CreateSessionFromArray)(env, model.data(), model.size(), so, &s), "CreateSessionFromArray");
  return s;
}

template <typename T>
std::string json_list(const T* p, size_t n) {
  std::string out = "[";
  for (size_t i = 0; i < n; ++i) out += (i ? ", " : "") + std::to_string(p[i]);
  return out + "]";
}

// A GPU provider's four entries (CUDA's, TensorRT's), which need no GPU to tell apart: on a library built
// without the provider, creating options fails saying so; on onnxruntime-gpu's, creating them works, updating
// them loads the provider's own library (which fails without CUDA's libraries, naming it), and appending them
// says the append failed. tag: "cuda" or "tensorrt", in each observation's name.
template <typename Options, typename Create, typename Update, typename Append, typename Release>
void prove_provider(const std::string& tag, Create create, Update update, Append append, Release release) {
  Options* options = nullptr;
  auto [code, message] = status(create(&options));
  emit("create_" + tag + "_options",
       {{"code", std::to_string(code)}, {"message", quote(message)}, {"made", options ? "true" : "false"}});
  if (!options) return;
  const char* keys[] = {"device_id"};
  const char* values[] = {"0"};
  auto [ucode, umessage] = status(update(options, keys, values, 1));
  emit("update_" + tag + "_options", {{"code", std::to_string(ucode)}, {"message", quote(umessage)}});
  OrtSessionOptions* so = nullptr;
  must(ORT(CreateSessionOptions)(&so), "CreateSessionOptions");
  auto [acode, amessage] = status(append(so, options));
  emit("append_" + tag, {{"code", std::to_string(acode)}, {"message", quote(amessage)}});
  ORT(ReleaseSessionOptions)(so);
  release(options);
  // Options released, then options kept: only the second grows.
  long before = rss_kb();
  for (int i = 0; i < 1000000; ++i) {
    Options* o = nullptr;
    must(create(&o), "create options");
    release(o);
  }
  const long released_kb = rss_kb() - before;
  std::vector<Options*> kept(200000, nullptr);
  before = rss_kb();
  for (auto*& o : kept) must(create(&o), "create options");
  const long kept_kb = rss_kb() - before;
  for (auto* o : kept) release(o);
  emit("release_" + tag + "_options", {{"kept", "200000"}, {"kept_growth_kb", std::to_string(kept_kb)},
                                       {"released", "1000000"}, {"rss_growth_kb", std::to_string(released_kb)}});
}

void prove_gpu_providers() {
  OrtEnv* env = nullptr;
  must(ORT(CreateEnv)(kLogError + 1, "probe", &env), "CreateEnv");  // FATAL only: the failures below are expected
  prove_provider<OrtCUDAProviderOptionsV2>("cuda", ORT(CreateCUDAProviderOptions), ORT(UpdateCUDAProviderOptions),
                                           ORT(SessionOptionsAppendExecutionProvider_CUDA_V2),
                                           ORT(ReleaseCUDAProviderOptions));
  prove_provider<OrtTensorRTProviderOptionsV2>(
      "tensorrt", ORT(CreateTensorRTProviderOptions), ORT(UpdateTensorRTProviderOptions),
      ORT(SessionOptionsAppendExecutionProvider_TensorRT_V2), ORT(ReleaseTensorRTProviderOptions));
}

}  // namespace

int main(int argc, char** argv) {
  const bool cuda = argc == 3 && std::strcmp(argv[1], "cuda") == 0;
  if (argc != 5 && !cuda) {
    std::fprintf(stderr,
                 "usage: ort_probe LIBONNXRUNTIME RUN_MODEL BIG_MODEL WEIGHTS_MODEL\n"
                 "       ort_probe cuda LIBONNXRUNTIME (the GPU providers' entries only)\n");
    return 2;
  }
  if (cuda) argv++;
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) return std::fprintf(stderr, "%s\n", dlerror()), 2;
  auto get_base = reinterpret_cast<const ApiBase* (*)()>(dlsym(lib, "OrtGetApiBase"));
  const ApiBase* base = get_base ? get_base() : nullptr;
  if (!base) return std::fprintf(stderr, "no OrtGetApiBase\n"), 2;
  emit("version", {{"version", quote(base->GetVersionString())}, {"checked", quote(checked_list())}});
  g_api = static_cast<const void* const*>(base->GetApi(kApiVersion));
  if (!g_api) return std::fprintf(stderr, "no API version %u\n", kApiVersion), 2;
  std::string table = "[";
  for (const Entry& e : kEntries) table += std::string(table.size() > 1 ? ", " : "") + "[" + quote(e.name) + ", " +
                                           std::to_string(e.position) + "]";
  emit("table", {{"entries", table + "]"}});
  if (cuda) {
    prove_gpu_providers();
    emit("done", {});
    return 0;
  }

  // CreateStatus, GetErrorCode, GetErrorMessage: a status made with a code and message reads them back.
  {
    OrtStatus* st = ORT(CreateStatus)(10, "fovea probe: made by CreateStatus");
    int code = ORT(GetErrorCode)(st);
    std::string message = ORT(GetErrorMessage)(st);
    ORT(ReleaseStatus)(st);
    emit("status_round_trip", {{"code", std::to_string(code)}, {"message", quote(message)}});
  }
  // ReleaseStatus: a million statuses made and released leave RSS where it was (each is ~100 bytes).
  {
    long before = rss_kb();
    for (int i = 0; i < 1000000; ++i) ORT(ReleaseStatus)(ORT(CreateStatus)(1, "fovea probe: released at once"));
    emit("release_status", {{"count", "1000000"}, {"rss_growth_kb", std::to_string(rss_kb() - before)}});
  }
  // CreateEnv: the environment is a process-wide singleton, so a second call hands back the same one.
  OrtEnv* env = nullptr;
  OrtEnv* again = nullptr;
  auto [env_code, env_message] = status(ORT(CreateEnv)(kLogError, "fovea-probe", &env));
  status(ORT(CreateEnv)(kLogError, "fovea-probe-again", &again));
  (void)env_message;
  emit("create_env", {{"code", std::to_string(env_code)},
                      {"non_null", env ? "true" : "false"},
                      {"same_instance", env && env == again ? "true" : "false"}});

  // CreateSessionFromArray on bytes that are no model: ONNX Runtime's INVALID_PROTOBUF and its message.
  {
    OrtSessionOptions* so = options(1, true);
    OrtSession* s = nullptr;
    const char junk[] = "not a model at all";
    auto [code, message] = status(ORT(CreateSessionFromArray)(env, junk, sizeof junk - 1, so, &s));
    ORT(ReleaseSessionOptions)(so);
    emit("bad_model", {{"code", std::to_string(code)}, {"message", quote(message)}});
  }
  // Options that only these entries refuse, with messages naming what they set.
  {
    OrtSessionOptions* so = nullptr;
    must(ORT(CreateSessionOptions)(&so), "CreateSessionOptions");
    auto [level_code, level_message] = status(ORT(SetSessionGraphOptimizationLevel)(so, 7));
    auto [key_code, key_message] = status(ORT(AddSessionConfigEntry)(so, "", "1"));
    auto [ok_code, ok_message] = status(ORT(AddSessionConfigEntry)(so, "session.intra_op.allow_spinning", "0"));
    ORT(ReleaseSessionOptions)(so);
    emit("option_refusals", {{"optimization_level_7", quote(std::to_string(level_code) + " " + level_message)},
                             {"config_empty_key", quote(std::to_string(key_code) + " " + key_message)},
                             {"config_good_key", quote(std::to_string(ok_code) + " " + ok_message)}});
  }
  const std::string run_model = read_file(argv[2]);
  // SetIntraOpNumThreads and SetInterOpNumThreads: a session's intra-op pool starts intra - 1 threads (the
  // caller's is the last); the inter-op count starts none in sequential execution, so swapping the two
  // entries would show.
  {
    std::vector<std::pair<std::string, std::string>> started;
    for (auto [intra, inter] : {std::pair{1, 1}, {4, 1}, {1, 4}}) {
      OrtSessionOptions* so = nullptr;
      must(ORT(CreateSessionOptions)(&so), "CreateSessionOptions");
      must(ORT(SetIntraOpNumThreads)(so, intra), "SetIntraOpNumThreads");
      must(ORT(SetInterOpNumThreads)(so, inter), "SetInterOpNumThreads");
      int before = settled_threads();
      OrtSession* s = session(env, run_model, so);
      started.push_back({"intra_" + std::to_string(intra) + "_inter_" + std::to_string(inter),
                         std::to_string(threads() - before)});
      ORT(ReleaseSession)(s);
      ORT(ReleaseSessionOptions)(so);
    }
    emit("threads_started", started);
  }
  // SetSessionGraphOptimizationLevel on a valid level is accepted (the refusal above names it).
  {
    OrtSessionOptions* so = options(1, true);
    int code = status(ORT(SetSessionGraphOptimizationLevel)(so, 0)).first;
    ORT(ReleaseSessionOptions)(so);
    emit("optimization_level_0", {{"code", std::to_string(code)}});
  }

  // CreateCpuMemoryInfo, CreateTensorWithDataAsOrtValue, Run, and reading the outputs back.
  OrtMemoryInfo* cpu = nullptr;
  must(ORT(CreateCpuMemoryInfo)(kArenaAllocator, kMemTypeDefault, &cpu), "CreateCpuMemoryInfo");
  {
    OrtSessionOptions* so = options(1, true);
    OrtSession* s = session(env, run_model, so);
    ORT(ReleaseSessionOptions)(so);
    std::vector<float> x(30);
    for (int i = 0; i < 30; ++i) x[size_t(i)] = float(i) * 0.5f - 3.0f;
    const int64_t shape[] = {2, 3, 5};
    OrtValue* in = nullptr;
    must(ORT(CreateTensorWithDataAsOrtValue)(cpu, x.data(), x.size() * sizeof(float), shape, 3, 1, &in),
         "CreateTensorWithDataAsOrtValue");
    const char* in_names[] = {"x"};
    const char* out_names[] = {"doubled", "truncated"};
    OrtValue* outs[2] = {nullptr, nullptr};
    const OrtValue* ins[] = {in};
    must(ORT(Run)(s, nullptr, in_names, ins, 1, out_names, 2, outs), "Run");
    for (int o = 0; o < 2; ++o) {
      OrtTensorTypeAndShapeInfo* info = nullptr;
      must(ORT(GetTensorTypeAndShape)(outs[o], &info), "GetTensorTypeAndShape");
      int type = 0;
      size_t rank = 0;
      must(ORT(GetTensorElementType)(info, &type), "GetTensorElementType");
      must(ORT(GetDimensionsCount)(info, &rank), "GetDimensionsCount");
      std::vector<int64_t> dims(rank);
      must(ORT(GetDimensions)(info, dims.data(), rank), "GetDimensions");
      ORT(ReleaseTensorTypeAndShapeInfo)(info);
      void* data = nullptr;
      must(ORT(GetTensorMutableData)(outs[o], &data), "GetTensorMutableData");
      size_t n = 1;
      for (int64_t d : dims) n *= size_t(d);
      std::string values = type == 1   ? json_list(static_cast<const float*>(data), n)
                           : type == 7 ? json_list(static_cast<const int64_t*>(data), n)
                                       : "null";
      emit("run_output", {{"name", quote(out_names[o])},
                          {"element_type", std::to_string(type)},
                          {"rank", std::to_string(rank)},
                          {"dims", json_list(dims.data(), rank)},
                          {"values", values}});
      ORT(ReleaseValue)(outs[o]);
    }
    // An input of the wrong element type: Run's own refusal, naming the input.
    OrtValue* wrong = nullptr;
    must(ORT(CreateTensorWithDataAsOrtValue)(cpu, x.data(), x.size() * sizeof(float), shape, 3, 6, &wrong),
         "CreateTensorWithDataAsOrtValue");
    const OrtValue* wrong_ins[] = {wrong};
    OrtValue* none[2] = {nullptr, nullptr};
    auto [code, message] = status(ORT(Run)(s, nullptr, in_names, wrong_ins, 1, out_names, 2, none));
    emit("run_wrong_type", {{"code", std::to_string(code)}, {"message", quote(message)}});
    // Release loops: each leaks what it makes if its release is not the right function.
    long before = rss_kb();
    for (int i = 0; i < 200000; ++i) {
      OrtTensorTypeAndShapeInfo* info = nullptr;
      must(ORT(GetTensorTypeAndShape)(in, &info), "GetTensorTypeAndShape");
      ORT(ReleaseTensorTypeAndShapeInfo)(info);
    }
    emit("release_type_info", {{"count", "200000"}, {"rss_growth_kb", std::to_string(rss_kb() - before)}});
    ORT(ReleaseValue)(wrong);
    ORT(ReleaseValue)(in);
    ORT(ReleaseSession)(s);
  }
  // ReleaseValue: 300 runs' outputs of 12.6 MB together, released as they come.
  const std::string big_model = read_file(argv[3]);
  {
    OrtSessionOptions* so = options(1, false);
    OrtSession* s = session(env, run_model, so);
    ORT(ReleaseSessionOptions)(so);
    std::vector<float> x(2 * 3 * 5 * 35000, 1.0f);  // 4.2 MB in; out 4.2 MB of FP32 and 8.4 MB of INT64
    const int64_t shape[] = {2 * 35000, 3, 5};
    OrtValue* in = nullptr;
    must(ORT(CreateTensorWithDataAsOrtValue)(cpu, x.data(), x.size() * sizeof(float), shape, 3, 1, &in), "tensor");
    const char* in_names[] = {"x"};
    const char* out_names[] = {"doubled", "truncated"};
    const OrtValue* ins[] = {in};
    long before = rss_kb();
    for (int i = 0; i < 300; ++i) {
      OrtValue* outs[2] = {nullptr, nullptr};
      must(ORT(Run)(s, nullptr, in_names, ins, 1, out_names, 2, outs), "Run");
      ORT(ReleaseValue)(outs[0]);
      ORT(ReleaseValue)(outs[1]);
    }
    emit("release_value",
         {{"count", "300"}, {"bytes_each", "12600000"}, {"rss_growth_kb", std::to_string(rss_kb() - before)}});
    ORT(ReleaseValue)(in);
    ORT(ReleaseSession)(s);
  }
  // EnableCpuMemArena and DisableCpuMemArena: the arena keeps a run's 128 MB intermediate; without it the
  // memory goes back. Enable is called after Disable, so that it is seen to turn the arena back on.
  {
    std::vector<std::pair<std::string, std::string>> kept;
    for (bool arena : {false, true}) {
      OrtSessionOptions* so = nullptr;
      must(ORT(CreateSessionOptions)(&so), "CreateSessionOptions");
      must(ORT(SetIntraOpNumThreads)(so, 1), "SetIntraOpNumThreads");
      must(ORT(DisableCpuMemArena)(so), "DisableCpuMemArena");
      if (arena) must(ORT(EnableCpuMemArena)(so), "EnableCpuMemArena");
      OrtSession* s = session(env, big_model, so);
      ORT(ReleaseSessionOptions)(so);
      float one = 1.0f;
      const int64_t shape[] = {1};
      OrtValue* in = nullptr;
      must(ORT(CreateTensorWithDataAsOrtValue)(cpu, &one, sizeof one, shape, 1, 1, &in), "tensor");
      const char* in_names[] = {"x"};
      const char* out_names[] = {"s"};
      const OrtValue* ins[] = {in};
      OrtValue* out = nullptr;
      long before = rss_kb();
      must(ORT(Run)(s, nullptr, in_names, ins, 1, out_names, 1, &out), "Run");
      float* sum = nullptr;
      must(ORT(GetTensorMutableData)(out, reinterpret_cast<void**>(&sum)), "GetTensorMutableData");
      kept.push_back({arena ? "arena_kept_kb" : "no_arena_kept_kb", std::to_string(rss_kb() - before)});
      kept.push_back({arena ? "arena_sum" : "no_arena_sum", std::to_string(double(*sum))});
      ORT(ReleaseValue)(out);
      ORT(ReleaseValue)(in);
      ORT(ReleaseSession)(s);
    }
    emit("arena", kept);
  }
  // ReleaseSession and ReleaseSessionOptions: sessions on a model with MBs of weights, and options, made
  // and released in turn.
  const std::string weights_model = read_file(argv[4]);
  {
    long before = rss_kb();
    for (int i = 0; i < 40; ++i) {
      OrtSessionOptions* so = options(1, false);
      OrtSession* s = session(env, weights_model, so);
      ORT(ReleaseSessionOptions)(so);
      ORT(ReleaseSession)(s);
    }
    emit("release_session", {{"count", "40"}, {"model_bytes", std::to_string(weights_model.size())},
                             {"rss_growth_kb", std::to_string(rss_kb() - before)}});
    before = rss_kb();
    for (int i = 0; i < 100000; ++i) {
      OrtSessionOptions* so = nullptr;
      must(ORT(CreateSessionOptions)(&so), "CreateSessionOptions");
      must(ORT(AddSessionConfigEntry)(so, "session.intra_op.allow_spinning", "0"), "AddSessionConfigEntry");
      ORT(ReleaseSessionOptions)(so);
    }
    emit("release_session_options", {{"count", "100000"}, {"rss_growth_kb", std::to_string(rss_kb() - before)}});
  }
  emit("done", {});
  return 0;
}
