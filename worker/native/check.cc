// Request checks and the classification encoding of the fast port (see check.h).

#include "check.h"

#include "oip_dtypes.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <type_traits>

namespace fovea {

using grpc::Status;
using grpc::StatusCode;
using inference::ModelInferRequest;

namespace {

constexpr uint64_t kMaxBytes = uint64_t(1) << 40;  // no tensor this big can be in a message

Status invalid(const std::string& message) { return Status(StatusCode::INVALID_ARGUMENT, message); }

// A request's name, cut short for a message.
std::string quoted(const std::string& s) { return "'" + s.substr(0, 64) + (s.size() > 64 ? "...'" : "'"); }

Status check_input(const ModelSpec& m, const TensorSpec& spec, const ModelInferRequest& req, int found, int* n) {
  const auto& t = req.inputs(found);
  if (t.datatype() != spec.dtype)
    return invalid("input '" + spec.name + "' must be " + spec.dtype + ", got " + t.datatype().substr(0, 16));
  const auto& dims = t.shape();
  bool ok = size_t(dims.size()) == spec.shape.size();
  for (int d = 1; ok && d < dims.size(); ++d) ok = spec.shape[d] <= 0 ? dims[d] >= 0 : dims[d] == spec.shape[d];
  if (!ok) {
    // The request's shape is only printed once its rank is known to be small.
    std::vector<int64_t> shape(dims.begin(), dims.begin() + std::min(dims.size(), kMaxRank + 1));
    return invalid("input '" + spec.name + "' must have shape " + shape_str(spec.shape) + " (-1 = any), got " +
                   shape_str(shape) + (dims.size() > kMaxRank + 1 ? " ..." : ""));
  }
  const std::vector<int64_t> shape(dims.begin(), dims.end());
  if (shape.empty() || shape[0] < 1) return invalid("input '" + spec.name + "' needs a batch dimension of at least 1");
  if (*n != -1 && shape[0] != *n) return invalid("all inputs must have the same batch size");
  if (shape[0] > m.max_batch)
    return invalid("batch of " + std::to_string(shape[0]) + " exceeds max_batch_size " + std::to_string(m.max_batch));
  *n = int(shape[0]);  // in [1, max_batch]
  // Byte size before anything else touches the data; no product may wrap around.
  uint64_t expected = spec.elem;
  for (int64_t d : shape) {
    if (d != 0 && expected > kMaxBytes / uint64_t(d)) {
      expected = kMaxBytes + 1;
      break;
    }
    expected *= uint64_t(d);
  }
  const size_t got = req.raw_input_contents(found).size();
  if (got != expected)
    return invalid("input '" + spec.name + "' has " + std::to_string(got) + " bytes; shape " + shape_str(shape) +
                   " of " + spec.dtype + " needs " +
                   (expected > kMaxBytes ? std::string("more than 2^40") : std::to_string(expected)));
  return Status::OK;
}

Status check_output(const ModelSpec& m, const ModelInferRequest::InferRequestedOutputTensor& o) {
  const TensorSpec* spec = nullptr;
  for (const auto& s : m.outputs)
    if (s.name == o.name()) spec = &s;
  if (!spec) return invalid("model " + m.name + " has no output " + quoted(o.name()));
  auto p = o.parameters().find("classification");
  if (p == o.parameters().end()) return Status::OK;
  if (p->second.parameter_choice_case() != inference::InferParameter::kInt64Param)
    return invalid("classification parameter must be a positive integer (int64_param)");
  const int64_t k = p->second.int64_param();
  if (!spec->dtype.empty() && spec->dtype != "FP32")
    return invalid("classification needs an FP32 output; '" + spec->name + "' is " + spec->dtype);
  const int64_t width = row_width(spec->shape);
  if (k < 1 || (width >= 0 && k > width))
    return invalid("classification parameter must be a positive integer, at most " +
                   (width >= 0 ? std::to_string(width) : std::string("the width")) + " (the width of output '" +
                   spec->name + "'); got " + std::to_string(k));
  return Status::OK;
}

}  // namespace

size_t dtype_size(const std::string& d) {
  const oip::DType* t = oip::dtype(d.c_str());
  return t && t->numeric ? size_t(t->size) : 0;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

int64_t row_width(const std::vector<int64_t>& shape) {
  if (shape.empty()) return -1;
  int64_t width = 1;
  for (size_t d = 1; d < shape.size(); ++d) {
    if (shape[d] < 0) return -1;
    if (shape[d] != 0 && width > int64_t(kMaxBytes) / shape[d]) return -1;
    width *= shape[d];
  }
  return width;
}

int64_t requested_k(const ModelInferRequest::InferRequestedOutputTensor& want) {
  auto p = want.parameters().find("classification");
  return p == want.parameters().end() ? 0 : p->second.int64_param();
}

namespace {

// An input's values as raw bytes of type T, each checked to fit T.
template <typename T, typename Values>
Status put_values(const Values& values, const std::string& name, const std::string& dtype, std::string* out) {
  out->resize(size_t(values.size()) * sizeof(T));
  char* p = out->data();
  for (const auto v : values) {
    if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool> && sizeof(T) < sizeof(v)) {  // narrowing
      if (v < std::numeric_limits<T>::min() || v > std::numeric_limits<T>::max())
        return invalid("input " + quoted(name) + ": value " + std::to_string(v) + " is out of range for " + dtype);
    }
    const T x = static_cast<T>(v);
    std::memcpy(p, &x, sizeof(T));
    p += sizeof(T);
  }
  return Status::OK;
}

// The raw bytes of one input's typed contents; *known false for a datatype that cannot come typed.
Status contents_bytes(const ModelInferRequest::InferInputTensor& t, bool* known, std::string* out) {
  const auto& c = t.contents();
  const std::string& d = t.datatype();
  const std::string& name = t.name();
  *known = true;
  if (d == "FP32") return put_values<float>(c.fp32_contents(), name, d, out);
  if (d == "FP64") return put_values<double>(c.fp64_contents(), name, d, out);
  if (d == "INT32") return put_values<int32_t>(c.int_contents(), name, d, out);
  if (d == "INT16") return put_values<int16_t>(c.int_contents(), name, d, out);
  if (d == "INT8") return put_values<int8_t>(c.int_contents(), name, d, out);
  if (d == "INT64") return put_values<int64_t>(c.int64_contents(), name, d, out);
  if (d == "UINT32") return put_values<uint32_t>(c.uint_contents(), name, d, out);
  if (d == "UINT16") return put_values<uint16_t>(c.uint_contents(), name, d, out);
  if (d == "UINT8") return put_values<uint8_t>(c.uint_contents(), name, d, out);
  if (d == "UINT64") return put_values<uint64_t>(c.uint64_contents(), name, d, out);
  if (d == "BOOL") return put_values<bool>(c.bool_contents(), name, d, out);
  if (d == "FP16" || d == "BF16")  // the protocol has no typed field for them
    return invalid("input " + quoted(name) + ": " + d + " data must be sent as raw_input_contents");
  *known = false;
  return Status::OK;
}

// Values an input's shape needs, or -1 past 2^40 or for a negative dimension.
int64_t elements(const google::protobuf::RepeatedField<int64_t>& dims) {
  uint64_t count = 1;
  for (int64_t d : dims) {
    if (d < 0 || (d != 0 && count > kMaxBytes / uint64_t(d))) return -1;
    count *= uint64_t(d);
  }
  return int64_t(count);
}

}  // namespace

Status read_contents(ModelInferRequest* req, bool* read) {
  *read = false;
  if (req->raw_input_contents_size() > 0 || req->inputs_size() == 0) return Status::OK;
  std::vector<std::string> raws(size_t(req->inputs_size()));
  for (int i = 0; i < req->inputs_size(); ++i) {
    const auto& t = req->inputs(i);
    if (!t.has_contents()) return Status::OK;
    bool known = false;
    Status st = contents_bytes(t, &known, &raws[size_t(i)]);
    if (!st.ok()) return st;
    if (!known) return Status::OK;
    const int64_t need = elements(t.shape());
    const size_t have = raws[size_t(i)].size() / size_t(dtype_size(t.datatype()));
    if (need < 0 || uint64_t(need) != have) {
      std::vector<int64_t> shape(t.shape().begin(), t.shape().begin() + std::min(t.shape_size(), kMaxRank + 1));
      return invalid("input " + quoted(t.name()) + ": " + std::to_string(have) + " values for shape " +
                     shape_str(shape) + (t.shape_size() > kMaxRank + 1 ? " ..." : "") + " (" +
                     (need < 0 ? std::string("more than 2^40") : std::to_string(need)) + " needed)");
    }
  }
  for (int i = 0; i < req->inputs_size(); ++i) {
    req->mutable_inputs(i)->clear_contents();
    req->add_raw_input_contents()->swap(raws[size_t(i)]);
  }
  *read = true;
  return Status::OK;
}

bool raw_tensors(const ModelInferRequest& req) {
  if (req.inputs_size() == 0 || req.raw_input_contents_size() != req.inputs_size()) return false;
  for (const auto& t : req.inputs())
    if (t.has_contents() || t.datatype() == "BYTES") return false;
  return true;
}

Status validate(const ModelSpec& m, const ModelInferRequest& req, Checked* out) {
  const int nin = int(m.inputs.size());
  if (req.inputs_size() != nin)
    return invalid("model " + m.name + " takes " + std::to_string(nin) + " input(s); got " +
                   std::to_string(req.inputs_size()));
  if (req.raw_input_contents_size() != nin)
    return invalid("raw_input_contents must have one entry per input");
  int n = -1;
  for (int s = 0; s < nin; ++s) {
    const TensorSpec& spec = m.inputs[s];
    int found = -1;
    for (int i = 0; i < nin; ++i)
      if (req.inputs(i).name() == spec.name) found = i;
    if (found < 0) return invalid("missing input '" + spec.name + "' of model " + m.name);
    Status st = check_input(m, spec, req, found, &n);
    if (!st.ok()) return st;
    out->order[s] = found;
  }
  out->n = n;
  // Each output at most once: a request cannot make the answer bigger than the model's outputs.
  if (size_t(req.outputs_size()) > m.outputs.size())
    return invalid("model " + m.name + " has " + std::to_string(m.outputs.size()) + " output(s); " +
                   std::to_string(req.outputs_size()) + " requested");
  for (int i = 0; i < req.outputs_size(); ++i) {
    for (int j = 0; j < i; ++j)
      if (req.outputs(j).name() == req.outputs(i).name())
        return invalid("output " + quoted(req.outputs(i).name()) + " is requested twice");
    Status st = check_output(m, req.outputs(i));
    if (!st.ok()) return st;
  }
  return Status::OK;
}

Status classify(const float* rows, int n, int64_t width, int64_t k, bool probabilities,
                const std::vector<std::string>& labels, const std::string& output, std::string* out) {
  if (k < 1 || k > width)
    return invalid("classification parameter must be a positive integer, at most " + std::to_string(width) +
                   " (the width of output '" + output + "'); got " + std::to_string(k));
  for (int i = 0; i < n; ++i) top_k(rows + int64_t(i) * width, width, k, probabilities, labels, out);
  return Status::OK;
}

bool top_k(const float* row, int64_t width, int64_t k, bool probabilities, const std::vector<std::string>& labels,
           std::string* out) {
  if (width < 1 || k < 1 || k > width) return false;
  std::vector<float> p(row, row + width);
  if (!probabilities) {
    float mx = *std::max_element(p.begin(), p.end());
    double sum = 0;
    for (auto& v : p) sum += (v = std::exp(v - mx));
    for (auto& v : p) v = float(v / sum);
  }
  std::vector<int64_t> idx(size_t(width), 0);
  for (int64_t i = 0; i < width; ++i) idx[i] = i;
  // Highest first, ties by index, NaN last (as NumPy's stable argsort on the main port): a strict weak
  // order even with NaN, which partial_sort needs.
  auto before = [&](int64_t a, int64_t b) {
    bool na = std::isnan(p[a]), nb = std::isnan(p[b]);
    if (na != nb) return nb;
    if (!na && p[a] != p[b]) return p[a] > p[b];
    return a < b;
  };
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), before);
  char buf[128];  // "%.6f" of any float is at most 47 characters, an index at most 19 more
  for (int64_t j = 0; j < k; ++j) {
    int64_t i = idx[j];
    std::snprintf(buf, sizeof buf, "%.6f:%lld", double(p[i]), static_cast<long long>(i));
    std::string item = buf;
    if (i < int64_t(labels.size()) && !labels[i].empty()) item += ":" + labels[i];
    uint32_t len = uint32_t(item.size());
    out->append(reinterpret_cast<const char*>(&len), 4);  // BYTES framing: little-endian length
    out->append(item);
  }
  return true;
}

}  // namespace fovea
