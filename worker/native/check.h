// Request checks and the classification encoding of the fast port, apart from the server, so that
// front.cc and the fuzz targets (fuzz/) run the same code. Nothing here allocates more than the
// request's own size or does arithmetic on a request number before it is bounded.
#pragma once

#include <grpcpp/support/status.h>

#include <cstdint>
#include <string>
#include <vector>

#include "front.h"
#include "inference/grpc_predict_v2.pb.h"

namespace fovea {

struct TensorSpec {
  std::string name, dtype;
  std::vector<int64_t> shape;  // -1 = any; dimension 0 is the batch
  size_t elem = 0;             // bytes per element; 0 for an unknown data type
};

struct ModelSpec {
  std::string name;
  int max_batch = 1;
  std::vector<TensorSpec> inputs, outputs;
};

// What validate learnt about a valid request.
struct Checked {
  int n = 0;               // samples
  int order[kMaxTensors];  // request input index for each model input
};

size_t dtype_size(const std::string& dtype);
std::string shape_str(const std::vector<int64_t>& shape);

// Elements per sample of an output (the product of dimensions 1..), or -1 when a dimension is
// dynamic, the shape has no batch dimension, or the product passes 2^40.
int64_t row_width(const std::vector<int64_t>& shape);

// The classification k an output request asks for: 0 when it asks for none. Only for a request
// validate accepted.
int64_t requested_k(const inference::ModelInferRequest::InferRequestedOutputTensor& want);

// Whether every input of a request comes as raw_input_contents and none is BYTES, the form the native
// front batches; typed contents and encoded images (BYTES) are relayed to Python.
bool raw_tensors(const inference::ModelInferRequest& req);

// Typed contents (fp32_contents and the like) read into raw_input_contents, in place, so that the call takes the
// path of raw tensors: only when no input comes raw and every input has contents of a numeric datatype that
// may come typed (not FP16, BF16 or BYTES); otherwise the request is left as it is, and *read is false.
// INVALID_ARGUMENT when an input's value count does not match its shape, or a value does not fit its datatype.
grpc::Status read_contents(inference::ModelInferRequest* req, bool* read);

// Checks a request against a model: inputs (names, types, shapes, byte sizes, batch) and requested
// outputs (known, each once, classification k an int64 in [1, the output's width] on an FP32 output).
grpc::Status validate(const ModelSpec& m, const inference::ModelInferRequest& req, Checked* out);

// The classification extension on n samples of an FP32 output, width scores each (rows holds n * width):
// the top k of each, appended to out. INVALID_ARGUMENT when k is not in [1, width] (validate checked k
// against the declared output; the computed one can be narrower where a dimension is dynamic).
grpc::Status classify(const float* rows, int n, int64_t width, int64_t k, bool probabilities,
                      const std::vector<std::string>& labels, const std::string& output, std::string* out);

// The classification extension for one sample's row of scores: the top k as BYTES elements
// "score:index[:label]" appended to out. Needs 1 <= k <= width; returns false (and appends
// nothing) otherwise.
bool top_k(const float* row, int64_t width, int64_t k, bool probabilities, const std::vector<std::string>& labels,
           std::string* out);

}  // namespace fovea
