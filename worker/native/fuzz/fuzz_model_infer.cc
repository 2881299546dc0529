// libFuzzer target: the worker fast port's reading of typed contents (read_contents) and request checks
// (validate, both in ../check.cc) and, for what they
// accept, the classification encoding (classify/top_k) on fake output rows, the way front.cc answers.
// The bytes are a serialized inference.ModelInferRequest; bytes that do not parse are dropped.
//
// scripts/fuzz.sh builds and runs it (see README.md here); it traps where a promise of check.h breaks.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <google/protobuf/stubs/logging.h>

#include "check.h"

namespace {

fovea::TensorSpec spec(const char* name, const char* dtype, std::vector<int64_t> shape) {
  return fovea::TensorSpec{name, dtype, std::move(shape), fovea::dtype_size(dtype)};
}

// An image classifier as the example has it, and a model with two inputs and a dynamic output.
const std::vector<fovea::ModelSpec>& models() {
  static const std::vector<fovea::ModelSpec> all = {
      {"colors", 4, {spec("input", "FP32", {-1, 3, 8, 8})}, {spec("logits", "FP32", {-1, 10})}},
      {"pair",
       8,
       {spec("a", "FP32", {-1, 4}), spec("b", "INT64", {-1, -1})},
       {spec("scores", "FP32", {-1, -1}), spec("ids", "INT64", {-1, 2})}},
  };
  return all;
}

const std::vector<std::string> kLabels = {"zero", "one", "", "three", "four", "five", "six", "seven"};

void check(bool ok) {
  if (!ok) __builtin_trap();
}

// Answers a valid request's classification outputs on fake rows made of its first input's bytes
// (so the fuzzer chooses the scores, NaN and infinities included).
void answer(const fovea::ModelSpec& m, const inference::ModelInferRequest& req, const fovea::Checked& c) {
  const std::string& raw = req.raw_input_contents(c.order[0]);
  for (const auto& want : req.outputs()) {
    const int64_t k = fovea::requested_k(want);
    if (k == 0) continue;
    const fovea::TensorSpec* out = nullptr;
    for (const auto& s : m.outputs)
      if (s.name == want.name()) out = &s;
    check(out != nullptr && out->dtype == "FP32" && k >= 1);
    int64_t width = fovea::row_width(out->shape);
    check(width < 0 || k <= width);
    if (width < 0) width = 1 + int64_t(raw.size() % 64);  // a dynamic width the model "computed"
    std::vector<float> rows(size_t(c.n * width), 0.0f);
    std::memcpy(rows.data(), raw.data(), std::min(raw.size(), rows.size() * sizeof(float)));
    std::string encoded;
    grpc::Status st = fovea::classify(rows.data(), c.n, width, k, raw.size() % 2 == 0, kLabels, out->name, &encoded);
    check(st.ok() == (k <= width));
    if (!st.ok()) continue;
    // n * k BYTES elements, each a 4-byte length and "score:index[:label]".
    size_t pos = 0, items = 0;
    while (pos < encoded.size()) {
      uint32_t len;
      check(pos + 4 <= encoded.size());
      std::memcpy(&len, encoded.data() + pos, 4);
      pos += 4 + len;
      check(pos <= encoded.size() && len > 0);
      ++items;
    }
    check(items == size_t(c.n) * size_t(k));
  }
}

}  // namespace

// Protobuf logs an error for every string field that is not UTF-8; printing them took most of the time.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  inference::ModelInferRequest req;
  if (!req.ParseFromArray(data, int(size))) return 0;
  // Typed contents are read into raw tensors first, as front.cc does for every call; what read_contents
  // promises: every input raw, of as many bytes as its values, and no typed contents left.
  const int typed_inputs = req.inputs_size();
  bool read = false;
  if (!fovea::read_contents(&req, &read).ok()) return 0;
  if (read) {
    check(req.raw_input_contents_size() == typed_inputs);
    for (int i = 0; i < typed_inputs; ++i) check(!req.inputs(i).has_contents());
  }
  for (const auto& m : models()) {
    fovea::Checked c;
    if (!fovea::validate(m, req, &c).ok()) continue;
    // What validate promises: a batch within bounds, every input once, its bytes as its shape says.
    check(c.n >= 1 && c.n <= m.max_batch);
    std::vector<bool> seen(m.inputs.size(), false);
    for (size_t s = 0; s < m.inputs.size(); ++s) {
      const int i = c.order[s];
      check(i >= 0 && i < req.inputs_size() && !seen[size_t(i)]);
      seen[size_t(i)] = true;
      check(req.inputs(i).shape(0) == c.n);
    }
    check(size_t(req.outputs_size()) <= m.outputs.size());
    answer(m, req, c);
  }
  return 0;
}
