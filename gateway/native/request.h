// The gateway's rules for a ModelInferRequest, read from its wire format in place across gRPC's slices, with their
// messages: the only copy (the front refuses with them; Python asks through fg_check_infer and fg_check_tensor).
// A part of front.cc, which includes it (in its anonymous namespace) with what it needs first: <grpcpp/grpcpp.h>,
// <string>, <vector>. The fuzz target fuzz/fuzz_request.cc reaches it through front.cc.
#pragma once

// Reads protobuf wire format across a ByteBuffer's slices without copying them. A reader may be limited to the
// next n bytes (sub): a nested message read in place.
class Reader {
 public:
  explicit Reader(const std::vector<grpc::Slice>& s) : s_(&s) {}
  bool done() {
    while (i_ < s_->size() && off_ >= (*s_)[i_].size()) { ++i_; off_ = 0; }
    return left_ == 0 || i_ >= s_->size();
  }
  bool byte(uint8_t* b) {
    if (done()) return false;
    *b = (*s_)[i_].begin()[off_++];
    --left_;
    return true;
  }
  bool varint(uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      uint8_t b;
      if (!byte(&b)) return false;
      *v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return true;
    }
    return false;
  }
  bool skip(uint64_t n) {
    if (n > left_) return false;
    while (n > 0) {
      if (done()) return false;
      uint64_t here = std::min<uint64_t>(n, (*s_)[i_].size() - off_);
      off_ += here;
      n -= here;
      left_ -= here;
    }
    return true;
  }
  bool read(uint64_t n, std::string* out) {
    out->clear();
    if (n > left_) return false;
    while (n > 0) {
      if (done()) return false;
      uint64_t here = std::min<uint64_t>(n, (*s_)[i_].size() - off_);
      out->append(reinterpret_cast<const char*>((*s_)[i_].begin()) + off_, here);
      off_ += here;
      n -= here;
      left_ -= here;
    }
    return true;
  }
  // A length-delimited field's bytes as a reader of their own, this one moved past them.
  bool sub(Reader* out) {
    uint64_t len;
    if (!varint(&len)) return false;
    *out = *this;
    out->left_ = len;
    return skip(len);
  }
  bool skip_field(uint32_t wire) {
    uint64_t v;
    switch (wire) {
      case 0: return varint(&v);
      case 1: return skip(8);
      case 2: return varint(&v) && skip(v);
      case 5: return skip(4);
      default: return false;
    }
  }

 private:
  const std::vector<grpc::Slice>* s_;
  size_t i_ = 0, off_ = 0;
  uint64_t left_ = UINT64_MAX;
};

// What the hot path needs from a ModelInferRequest that passed the checks below.
struct Head {
  bool tensors = true;  // only raw numeric tensors: a worker's fast port takes it; else its main port
  std::string model, version;
};

bool parse_version(const std::string& s, int64_t* v) {
  if (s.empty() || s.size() > 18) return false;
  int64_t out = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    out = out * 10 + (c - '0');
  }
  *v = out;
  return out > 0;
}

int element_bytes(const std::string& datatype) {  // -1: unknown; 0: BYTES (length-prefixed items)
  const fovea::oip::DType* d = fovea::oip::dtype(datatype.c_str());
  return d ? d->size : -1;
}

bool valid_name(const std::string& s) {  // fovea/names.py NAME_RE, and no ".."
  if (s.empty() || s.size() > 63 || s.find("..") != std::string::npos) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (i > 0 && (c == '.' || c == '_' || c == '-'));
    if (!ok) return false;
  }
  return true;
}

// ---- The gateway's rules for a ModelInferRequest, with their messages: the only copy. The front refuses a
// call of a key it admits with them; the Python server asks for them through fg_check_infer.
namespace check {

constexpr int kMaxInputs = 16, kMaxRank = 8, kMaxDepth = 100;  // kMaxDepth: protobuf's nesting limit
constexpr uint64_t kMaxElements = uint64_t(1) << 40;  // far above any message limit: guards the product
constexpr const char* kDatatypes =
    "BOOL, UINT8, INT8, UINT16, INT16, FP16, BF16, UINT32, INT32, FP32, UINT64, INT64, FP64, BYTES";
const std::string kNotAMessage = "the request is not a valid ModelInferRequest message";

// The code points of UTF-8 text (at most limit of them); false for text protobuf's parser refuses as a string:
// a bad sequence, an overlong form, a surrogate, past U+10FFFF.
bool code_points(const std::string& s, size_t limit, std::vector<uint32_t>* out) {
  size_t i = 0, n = s.size();
  while (i < n) {
    uint8_t c = uint8_t(s[i]);
    size_t len = c < 0x80 ? 1 : (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3 : (c & 0xf8) == 0xf0 ? 4 : 0;
    if (len == 0 || n - i < len) return false;
    uint32_t cp = len == 1 ? c : len == 2 ? c & 0x1f : len == 3 ? c & 0x0f : c & 0x07;
    for (size_t k = 1; k < len; ++k) {
      uint8_t b = uint8_t(s[i + k]);
      if ((b & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (b & 0x3f);
    }
    static const uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    if (out && out->size() < limit) out->push_back(cp);
    i += len;
  }
  return true;
}

bool valid_utf8(const std::string& s) { return code_points(s, 0, nullptr); }

// Python's ascii() of the text's first limit characters: repr's quotes and escapes, every character outside
// printable ASCII escaped (\xNN, \uNNNN, \UNNNNNNNN). What the messages show names with. Text: valid UTF-8.
std::string py_ascii(const std::string& text, size_t limit) {
  std::vector<uint32_t> cps;
  code_points(text, limit, &cps);
  bool single = false, dbl = false;
  for (uint32_t c : cps) single |= c == '\'', dbl |= c == '"';
  char quote = single && !dbl ? '"' : '\'';
  std::string out(1, quote);
  char buf[16];
  for (uint32_t c : cps) {
    if (c == uint32_t(quote) || c == '\\') {
      out += '\\';
      out += char(c);
    } else if (c == '\t' || c == '\n' || c == '\r') {
      out += c == '\t' ? "\\t" : c == '\n' ? "\\n" : "\\r";
    } else if (c >= 0x20 && c < 0x7f) {
      out += char(c);
    } else {
      snprintf(buf, sizeof buf, c < 0x100 ? "\\x%02x" : c < 0x10000 ? "\\u%04x" : "\\U%08x", unsigned(c));
      out += buf;
    }
  }
  return out + quote;
}

std::string shape_text(const std::vector<int64_t>& shape) {  // as Python prints a list of ints
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

// A tag: false for what protobuf's parser refuses (field 0, a tag past 32 bits, wire types 6 and 7).
bool tag(Reader& r, uint32_t* field, uint32_t* wire) {
  uint64_t t;
  if (!r.varint(&t) || t > 0xffffffffu) return false;
  *field = uint32_t(t >> 3);
  *wire = uint32_t(t & 7);
  return *field != 0 && *wire <= 5;
}

// A field the checks do not read, groups included (protobuf keeps them as unknown fields).
bool skip(Reader& r, uint32_t field, uint32_t wire, int depth) {
  if (wire == 4) return false;  // an end of a group that never began
  if (wire != 3) return r.skip_field(wire);
  if (depth >= kMaxDepth) return false;
  uint32_t f, w;
  while (tag(r, &f, &w)) {
    if (w == 4) return f == field;
    if (!skip(r, f, w, depth + 1)) return false;
  }
  return false;
}

bool string_field(Reader& r, std::string* out) {
  uint64_t len;
  return r.varint(&len) && r.read(len, out) && valid_utf8(*out);
}

// A packed repeated field: varints, or fixed values of `fixed` bytes each.
bool packed(Reader& r, int fixed, std::vector<int64_t>* out) {
  Reader p(r);
  if (!r.sub(&p)) return false;
  while (!p.done()) {
    uint64_t v;
    if (fixed ? !p.skip(uint64_t(fixed)) : !p.varint(&v)) return false;
    if (!fixed && out) out->push_back(int64_t(v));
  }
  return true;
}

// An InferParameter: *which gets the oneof's field that came last (1 bool, 2 int64, 3 string, 4 double,
// 5 uint64), *k the int64's value.
bool parameter(Reader r, int depth, int* which, int64_t* k) {
  uint32_t f, w;
  while (!r.done()) {
    if (!tag(r, &f, &w)) return false;
    uint64_t v;
    std::string s;
    if ((f == 1 || f == 2 || f == 5) && w == 0) {
      if (!r.varint(&v)) return false;
      if (f == 2) *k = int64_t(v);
    } else if (f == 3 && w == 2) {
      if (!string_field(r, &s)) return false;
    } else if (f == 4 && w == 1) {
      if (!r.skip(8)) return false;
    } else {
      if (!skip(r, f, w, depth)) return false;
      continue;
    }
    *which = int(f);
  }
  return true;
}

// A parameters map's entry (key 1, InferParameter 2). *classification: the entry is the classification
// parameter; then *which and *k as parameter() gives them.
bool map_entry(Reader& r, int depth, bool* classification, int* which, int64_t* k) {
  Reader e(r);
  if (!r.sub(&e)) return false;
  std::string key;
  int w_ = 0;
  int64_t k_ = 0;
  uint32_t f, w;
  while (!e.done()) {
    if (!tag(e, &f, &w)) return false;
    Reader value(e);
    if (f == 1 && w == 2) {
      if (!string_field(e, &key)) return false;
    } else if (f == 2 && w == 2) {
      if (!e.sub(&value) || !parameter(value, depth + 1, &w_, &k_)) return false;
    } else if (!skip(e, f, w, depth)) {
      return false;
    }
  }
  *classification = key == "classification";
  if (*classification) *which = w_, *k = k_;
  return true;
}

// InferTensorContents: well formed, nothing more (typed contents go to a worker's main port, which checks them).
bool contents(Reader r, int depth) {
  uint32_t f, w;
  while (!r.done()) {
    if (!tag(r, &f, &w)) return false;
    int fixed = f == 6 ? 4 : f == 7 ? 8 : 0;
    if (f >= 1 && f <= 7 && w == 2) {
      if (!packed(r, fixed, nullptr)) return false;
    } else if (f == 8 && w == 2) {
      if (!r.skip_field(2)) return false;
    } else if (!skip(r, f, w, depth)) {
      return false;
    }
  }
  return true;
}

struct Input {
  std::string name, datatype;
  std::vector<int64_t> shape;
  bool typed = false;  // typed contents
};

struct Output {
  std::string name;
  bool classification = false;
  int which = 0;
  int64_t k = 0;
};

struct Request {
  std::string model, version;
  std::vector<Input> inputs;  // the first kMaxInputs + 1: more are counted only
  size_t n_inputs = 0;
  std::vector<Output> outputs;
  std::vector<uint64_t> raws;  // each raw input's size
};

bool input(Reader r, Input* in) {
  uint32_t f, w;
  while (!r.done()) {
    if (!tag(r, &f, &w)) return false;
    uint64_t v;
    bool cls = false;
    int which = 0;
    int64_t k = 0;
    Reader nested(r);
    if (f == 1 && w == 2) {
      if (!string_field(r, &in->name)) return false;
    } else if (f == 2 && w == 2) {
      if (!string_field(r, &in->datatype)) return false;
    } else if (f == 3 && w == 2) {
      if (!packed(r, 0, &in->shape)) return false;
    } else if (f == 3 && w == 0) {
      if (!r.varint(&v)) return false;
      in->shape.push_back(int64_t(v));
    } else if (f == 4 && w == 2) {
      if (!map_entry(r, 2, &cls, &which, &k)) return false;
    } else if (f == 5 && w == 2) {
      in->typed = true;
      if (!r.sub(&nested) || !contents(nested, 2)) return false;
    } else if (!skip(r, f, w, 1)) {
      return false;
    }
  }
  return true;
}

bool output(Reader r, Output* out) {
  uint32_t f, w;
  while (!r.done()) {
    if (!tag(r, &f, &w)) return false;
    bool cls = false;
    int which = 0;
    int64_t k = 0;
    if (f == 1 && w == 2) {
      if (!string_field(r, &out->name)) return false;
    } else if (f == 2 && w == 2) {
      if (!map_entry(r, 2, &cls, &which, &k)) return false;
      if (cls) out->classification = true, out->which = which, out->k = k;  // a later entry replaces one
    } else if (!skip(r, f, w, 1)) {
      return false;
    }
  }
  return true;
}

// The whole message, as protobuf's parser reads it: false where it would refuse it.
bool parse(const std::vector<grpc::Slice>& slices, Request* req) {
  Reader r(slices);
  uint32_t f, w;
  std::string id;
  while (!r.done()) {
    if (!tag(r, &f, &w)) return false;
    bool cls = false;
    int which = 0;
    int64_t k = 0;
    Reader nested(r);
    if (f == 1 && w == 2) {
      if (!string_field(r, &req->model)) return false;
    } else if (f == 2 && w == 2) {
      if (!string_field(r, &req->version)) return false;
    } else if (f == 3 && w == 2) {
      if (!string_field(r, &id)) return false;
    } else if (f == 4 && w == 2) {
      if (!map_entry(r, 1, &cls, &which, &k)) return false;
    } else if (f == 5 && w == 2) {
      Input in;
      if (!r.sub(&nested) || !input(nested, &in)) return false;
      if (req->inputs.size() <= size_t(kMaxInputs)) req->inputs.push_back(std::move(in));
      ++req->n_inputs;
    } else if (f == 6 && w == 2) {
      req->outputs.emplace_back();
      if (!r.sub(&nested) || !output(nested, &req->outputs.back())) return false;
    } else if (f == 7 && w == 2) {
      uint64_t len;
      if (!r.varint(&len) || !r.skip(len)) return false;
      req->raws.push_back(len);
    } else if (!skip(r, f, w, 0)) {
      return false;
    }
  }
  return true;
}

std::string check_name(const std::string& model) {  // fovea/names.py check_name's message
  if (valid_name(model)) return "";
  return "invalid model name " + py_ascii(model, 80) +
         ": use 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit, with no '..'";
}

std::string check_version(const std::string& version) {
  int64_t v;
  if (version.empty() || parse_version(version, &v)) return "";
  return "model_version must be a positive number, got " + py_ascii(version, 40);
}

// An input's datatype and shape; *elements gets its element count.
std::string check_tensor(const Input& in, uint64_t* elements) {
  std::string name = "input " + py_ascii(in.name, 40);
  if (element_bytes(in.datatype) < 0)
    return name + " has unknown datatype " + py_ascii(in.datatype, 20) + "; expected one of " + kDatatypes;
  if (in.shape.empty() || in.shape.size() > size_t(kMaxRank))
    return name + " has " + std::to_string(in.shape.size()) + " dimensions; expected 1 to " +
           std::to_string(kMaxRank);
  uint64_t n = 1;
  for (int64_t d : in.shape) {  // in order, as Python multiplies: a later negative one may come too late
    if (d < 0) return name + " has a negative dimension in its shape " + shape_text(in.shape);
    if (d != 0 && n > kMaxElements / uint64_t(d))  // n * d > kMaxElements, without overflowing
      return name + " has too many elements in its shape " + shape_text(in.shape);
    n *= uint64_t(d);
  }
  *elements = n;
  return "";
}

std::string check_output(const Output& out, int64_t max_top_k) {
  if (!out.classification) return "";
  std::string name = "output " + py_ascii(out.name, 40);
  if (out.which != 2) return name + ": the classification parameter must be an int64_param";
  if (out.k < 1 || out.k > max_top_k)
    return name + ": classification asks for " + std::to_string(out.k) + " classes; expected 1 to " +
           std::to_string(max_top_k);
  return "";
}

// The request's rules, in the order the gateway has always refused them.
std::string check_rules(const Request& req, int64_t max_top_k) {
  std::string m = check_name(req.model);
  if (m.empty()) m = check_version(req.version);
  if (!m.empty()) return m;
  size_t n = req.n_inputs;
  if (n == 0) return "no inputs: a ModelInferRequest needs at least one input tensor";
  if (n > size_t(kMaxInputs)) return std::to_string(n) + " inputs; the limit is " + std::to_string(kMaxInputs);
  const auto& raws = req.raws;
  if (!raws.empty() && raws.size() != n)
    return std::to_string(raws.size()) + " raw_input_contents for " + std::to_string(n) +
           " inputs: send one per input, or none";
  for (size_t i = 0; i < n; ++i) {
    const Input& in = req.inputs[i];
    uint64_t elements = 0;
    if (!(m = check_tensor(in, &elements)).empty()) return m;
    uint64_t size = uint64_t(element_bytes(in.datatype));
    if (!raws.empty() && size && raws[i] != elements * size)
      return "input " + py_ascii(in.name, 40) + " has " + std::to_string(raws[i]) + " bytes of raw contents; shape " +
             shape_text(in.shape) + " of " + in.datatype + " needs " + std::to_string(elements * size);
  }
  for (const Output& out : req.outputs)
    if (!(m = check_output(out, max_top_k)).empty()) return m;
  return "";
}

// The images a valid call is charged for: an encoded image per element of a BYTES tensor, else a row of its
// batch dimension; the inputs of one call share their batch, so the most of any input. *over gets the refusal
// of an input past the per-call limit ("" when none is).
int64_t images(const Request& req, int64_t limit, std::string* over) {
  int64_t most = 0;
  for (const Input& in : req.inputs) {
    bool bytes = in.datatype == "BYTES";
    int64_t n = bytes ? 1 : in.shape[0];  // the checks passed: 1 to 8 dimensions, none negative, n <= 2^40
    if (bytes)
      for (int64_t d : in.shape) n *= d;
    if (n > limit && over->empty())
      *over = "input " + py_ascii(in.name, 40) + (bytes ? " holds " + std::to_string(n) + " images"
                                                        : " has a batch of " + std::to_string(n)) +
              "; the limit is " + std::to_string(limit) + " per call";
    most = std::max(most, n);
  }
  return most;
}

}  // namespace check

// A ModelInferRequest checked: the refusal of the first rule it breaks (rules), else the images it is charged
// for and the refusal of a count past the per-call limit (over_limit), which comes after the key's model access.
struct Checked {
  std::string rules, over_limit;
  int64_t images = 0;
  Head head;
};

Checked check_request(const std::vector<grpc::Slice>& slices, int64_t max_top_k, int64_t max_images) {
  Checked c;
  check::Request req;
  if (!check::parse(slices, &req)) {
    c.rules = check::kNotAMessage;
    return c;
  }
  c.rules = check::check_rules(req, max_top_k);
  if (!c.rules.empty()) return c;
  c.images = check::images(req, max_images, &c.over_limit);
  c.head.model = req.model;
  c.head.version = req.version;
  c.head.tensors = req.raws.size() == req.n_inputs;
  for (const auto& in : req.inputs) c.head.tensors &= in.datatype != "BYTES" && !in.typed;
  return c;
}
