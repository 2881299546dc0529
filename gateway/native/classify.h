// Classify's wire format for the gateway's native front (front.cc): reading a fovea.v1.ClassifyRequest, its
// limits (the gateway's one copy, with their messages: the Python server asks them too, fg_check_classify), the
// image header check, the BYTES ModelInferRequest a worker's main port takes, and turning the worker's answer
// into a ClassifyResponse. Whatever this file cannot accept goes to the Python server, which answers or refuses
// it (it reads the headers of the formats this file does not: WebP, BMP, GIF, TIFF).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace classify {

// Classify's limits (gateway/config.py).
struct Limits {
  int64_t max_images = 64;  // max_images_per_call
  int64_t default_top_k = 5;
  int64_t max_top_k = 100;
  int64_t max_image_bytes = 20 << 20;
  int64_t max_image_pixels = 40000000;
};

// The first of a call's limits its images break (count, top_k, each image's bytes; all before any header is
// read), as its INVALID_ARGUMENT message, or "" when none; *top_k gets the call's k (asked, else the default).
// size_of(i): image i's bytes.
template <class SizeOf>
std::string limits_refusal(const Limits& l, int64_t n, SizeOf size_of, uint64_t asked, uint64_t* top_k) {
  if (n <= 0) return "no images: send at least one encoded image";
  if (n > l.max_images)
    return std::to_string(n) + " images in one call; the limit is " + std::to_string(l.max_images);
  *top_k = asked ? asked : uint64_t(l.default_top_k);
  if (*top_k > uint64_t(l.max_top_k))
    return "top_k " + std::to_string(*top_k) + " exceeds the limit of " + std::to_string(l.max_top_k);
  for (int64_t i = 0; i < n; ++i) {
    uint64_t size = size_of(i);
    if (size > uint64_t(l.max_image_bytes))
      return "image " + std::to_string(i) + " is " + std::to_string(size) + " bytes; the limit is " +
             std::to_string(l.max_image_bytes);
  }
  return {};
}

// The message for image i of width x height pixels past the limit, else "".
inline std::string pixels_refusal(const Limits& l, int64_t i, uint64_t width, uint64_t height) {
  const uint64_t pixels = width * height;  // each under 2^31 (image_dims; Python's readers) so no overflow
  if (pixels <= uint64_t(l.max_image_pixels)) return {};
  return "image " + std::to_string(i) + " is " + std::to_string(width) + "x" + std::to_string(height) + " = " +
         std::to_string(pixels) + " pixels; the limit is " + std::to_string(l.max_image_pixels);
}

// Protobuf wire format over one contiguous string.
class Wire {
 public:
  explicit Wire(const std::string& s) : p_(s.data()), end_(s.data() + s.size()) {}
  Wire(const char* p, size_t n) : p_(p), end_(p + n) {}
  bool done() const { return p_ >= end_; }
  bool varint(uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p_ >= end_) return false;
      uint8_t b = uint8_t(*p_++);
      *v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return true;
    }
    return false;
  }
  // A length-delimited field's bytes, in place (valid while the input lives).
  bool bytes(const char** p, size_t* n) {
    uint64_t len;
    if (!varint(&len) || len > uint64_t(end_ - p_)) return false;
    *p = p_;
    *n = size_t(len);
    p_ += len;
    return true;
  }
  bool skip(uint32_t wire) {
    uint64_t v;
    const char* p;
    size_t n;
    switch (wire) {
      case 0: return varint(&v);
      case 1: return advance(8);
      case 2: return bytes(&p, &n);
      case 5: return advance(4);
      default: return false;
    }
  }

 private:
  bool advance(size_t n) {
    if (n > size_t(end_ - p_)) return false;
    p_ += n;
    return true;
  }
  const char* p_;
  const char* end_;
};

inline void put_varint(std::string& s, uint64_t v) {
  while (v >= 0x80) {
    s.push_back(char(v | 0x80));
    v >>= 7;
  }
  s.push_back(char(v));
}
inline void put_tag(std::string& s, int field, int wire) { put_varint(s, uint64_t(field) << 3 | uint64_t(wire)); }
inline void put_bytes(std::string& s, int field, const char* p, size_t n) {
  put_tag(s, field, 2);
  put_varint(s, n);
  s.append(p, n);
}
inline void put_bytes(std::string& s, int field, const std::string& b) { put_bytes(s, field, b.data(), b.size()); }

// One image of a ClassifyRequest, pointing into the request's bytes.
struct Image {
  const char* data = nullptr;
  size_t size = 0;
  std::string id;
};

struct Request {
  std::string model, alias;
  uint64_t version = 0, top_k = 0;
  std::vector<Image> images;
};

// Reads a ClassifyRequest (image.proto: model 1, version 2, alias 3, images 4 {data 1, id 2}, top_k 5). False
// for anything unexpected (a wrong wire type, a top_k past uint32): Python parses it and answers.
inline bool read_request(const std::string& body, Request* r) {
  Wire w(body);
  while (!w.done()) {
    uint64_t tag, v;
    const char* p;
    size_t n;
    if (!w.varint(&tag)) return false;
    uint32_t field = uint32_t(tag >> 3), wire = uint32_t(tag & 7);
    if (field == 1 && wire == 2) {
      if (!w.bytes(&p, &n) || n > 256) return false;
      r->model.assign(p, n);
    } else if (field == 2 && wire == 0) {
      if (!w.varint(&r->version)) return false;
    } else if (field == 3 && wire == 2) {
      if (!w.bytes(&p, &n) || n > 256) return false;
      r->alias.assign(p, n);
    } else if (field == 4 && wire == 2) {
      if (!w.bytes(&p, &n)) return false;
      Wire m(p, n);
      Image img;
      while (!m.done()) {
        uint64_t mtag;
        if (!m.varint(&mtag)) return false;
        uint32_t mf = uint32_t(mtag >> 3), mw = uint32_t(mtag & 7);
        const char* q;
        size_t k;
        if (mf == 1 && mw == 2) {
          if (!m.bytes(&img.data, &img.size)) return false;
        } else if (mf == 2 && mw == 2) {
          if (!m.bytes(&q, &k) || k > 4096) return false;
          img.id.assign(q, k);
        } else if (!m.skip(mw)) {
          return false;
        }
      }
      r->images.push_back(std::move(img));
    } else if (field == 5 && wire == 0) {
      if (!w.varint(&v) || v > 0xffffffffu) return false;
      r->top_k = v;
    } else if (!w.skip(wire)) {
      return false;
    }
  }
  return true;
}

inline uint64_t be(const unsigned char* p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v = v << 8 | p[i];
  return v;
}

// (width, height) of a PNG or an 8-bit baseline, extended or progressive JPEG, from its header, as Pillow and
// libjpeg-turbo read them (fovea/images.py image_size). False for any other format and for anything odd: the
// Python server reads those and says what is wrong. A JPEG's segments are walked to its first scan.
inline bool image_dims(const char* data, size_t size, uint64_t* width, uint64_t* height) {
  const auto* d = reinterpret_cast<const unsigned char*>(data);
  static const unsigned char kPng[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (size >= 24 && std::memcmp(d, kPng, 8) == 0 && be(d + 8, 4) == 13 && std::memcmp(d + 12, "IHDR", 4) == 0) {
    *width = be(d + 16, 4);
    *height = be(d + 20, 4);
    return *width > 0 && *height > 0 && *width < (1u << 31) && *height < (1u << 31);
  }
  if (size < 4 || d[0] != 0xff || d[1] != 0xd8 || d[2] != 0xff) return false;
  bool frame = false;
  size_t i = 2;
  while (i + 4 <= size) {
    if (d[i] != 0xff) return false;
    unsigned char m = d[i + 1];
    if (m == 0xff) {  // a fill byte before a marker
      ++i;
      continue;
    }
    if (m == 0xd8 || m == 0xd9 || m == 0x01 || (m >= 0xd0 && m <= 0xd7)) return false;  // not where a header is
    size_t len = size_t(be(d + i + 2, 2));
    if (len < 2 || i + 2 + len > size) return false;
    if (m == 0xda) return frame;  // the first scan: the header ends here
    if (m >= 0xc0 && m <= 0xcf && m != 0xc4 && m != 0xc8 && m != 0xcc) {
      if (frame || m > 0xc2 || len < 8) return false;  // lossless, hierarchical, arithmetic: Python decides
      int components = d[i + 9];
      if (d[i + 4] != 8 || components < 1 || components > 4 || len != size_t(8 + 3 * components)) return false;
      *height = be(d + i + 5, 2);
      *width = be(d + i + 7, 2);
      if (*width == 0 || *height == 0) return false;
      frame = true;
    }
    i += 2 + len;
  }
  return false;
}

// The ModelInferRequest for a worker's main port (gateway/service.py _classify_chunk): the images as one BYTES
// tensor of shape [n] (each element its 4-byte little-endian length, then its bytes), and the classification
// extension's k on the model's output.
inline std::string infer_request(const std::string& model, int64_t version, const std::string& input,
                                 const std::string& output, const std::vector<Image>& images, uint64_t k) {
  std::string out, part, raw;
  put_bytes(out, 1, model);
  put_bytes(out, 2, std::to_string(version));
  put_bytes(part, 1, input);
  put_bytes(part, 2, std::string("BYTES"));
  std::string shape;
  put_varint(shape, images.size());
  put_bytes(part, 3, shape);
  put_bytes(out, 5, part);
  std::string param, entry;
  put_tag(param, 2, 0);  // InferParameter.int64_param
  put_varint(param, k);
  put_bytes(entry, 1, std::string("classification"));
  put_bytes(entry, 2, param);
  part.clear();
  put_bytes(part, 1, output);
  put_bytes(part, 2, entry);
  put_bytes(out, 6, part);
  size_t total = 0;
  for (const auto& img : images) total += 4 + img.size;
  raw.reserve(total);
  for (const auto& img : images) {
    uint32_t n = uint32_t(img.size);
    for (int b = 0; b < 4; ++b) raw.push_back(char((n >> (8 * b)) & 0xff));
    raw.append(img.data, img.size);
  }
  put_bytes(out, 7, raw);
  return out;
}

// The worker's ModelInferResponse as a ClassifyResponse (model, version, one Classification per image with its
// labels, each "score:index:label" item read as gateway/service.py reads it). False when the answer is not
// what a classification looks like.
inline bool classify_response(const std::string& answer, const std::string& model, int64_t version,
                              const std::vector<std::string>& ids, std::string* out) {
  Wire w(answer);
  std::string answered_version;
  std::vector<uint64_t> shape;
  const char* raw = nullptr;
  size_t raw_size = 0;
  bool have_output = false, have_raw = false;
  while (!w.done()) {
    uint64_t tag;
    const char* p;
    size_t n;
    if (!w.varint(&tag)) return false;
    uint32_t field = uint32_t(tag >> 3), wire = uint32_t(tag & 7);
    if (field == 2 && wire == 2) {
      if (!w.bytes(&p, &n)) return false;
      answered_version.assign(p, n);
    } else if (field == 5 && wire == 2) {
      if (!w.bytes(&p, &n)) return false;
      if (have_output) continue;  // the first output is the classification
      have_output = true;
      Wire t(p, n);
      while (!t.done()) {
        uint64_t ttag, dim;
        if (!t.varint(&ttag)) return false;
        uint32_t tf = uint32_t(ttag >> 3), tw = uint32_t(ttag & 7);
        if (tf == 3 && tw == 2) {
          const char* q;
          size_t k;
          if (!t.bytes(&q, &k)) return false;
          Wire packed(q, k);
          while (!packed.done()) {
            if (!packed.varint(&dim)) return false;
            shape.push_back(dim);
          }
        } else if (tf == 3 && tw == 0) {
          if (!t.varint(&dim)) return false;
          shape.push_back(dim);
        } else if (!t.skip(tw)) {
          return false;
        }
      }
    } else if (field == 6 && wire == 2) {
      if (!w.bytes(&p, &n)) return false;
      if (!have_raw) raw = p, raw_size = n, have_raw = true;
    } else if (!w.skip(wire)) {
      return false;
    }
  }
  if (!have_raw || shape.size() < 2 || shape[0] > (1u << 20) || shape[1] > (1u << 20)) return false;
  uint64_t k = shape[1], count = shape[0] * shape[1];
  std::vector<std::pair<const char*, size_t>> items;
  for (size_t pos = 0; pos < raw_size;) {
    if (raw_size - pos < 4) return false;
    const auto* u = reinterpret_cast<const unsigned char*>(raw + pos);
    size_t n = size_t(u[0]) | size_t(u[1]) << 8 | size_t(u[2]) << 16 | size_t(u[3]) << 24;
    pos += 4;
    if (n > raw_size - pos) return false;
    items.emplace_back(raw + pos, n);
    pos += n;
  }
  if (items.size() != count) return false;
  if (!answered_version.empty()) {
    version = 0;
    for (char c : answered_version) {
      if (c < '0' || c > '9' || version > (int64_t(1) << 56)) return false;
      version = version * 10 + (c - '0');
    }
  }
  out->clear();
  put_bytes(*out, 1, model);
  if (version != 0) {
    put_tag(*out, 2, 0);
    put_varint(*out, uint64_t(version));
  }
  std::string result, label;
  for (size_t i = 0; i < ids.size(); ++i) {
    result.clear();
    if (!ids[i].empty()) put_bytes(result, 1, ids[i]);
    for (size_t j = i * k; j < std::min<uint64_t>((i + 1) * k, items.size()); ++j) {
      std::string item(items[j].first, items[j].second);  // "score:index:label"; the label may hold ':'
      size_t a = item.find(':');
      if (a == std::string::npos) return false;
      size_t b = item.find(':', a + 1);
      std::string score_text = item.substr(0, a);
      std::string index_text = item.substr(a + 1, b == std::string::npos ? std::string::npos : b - a - 1);
      char* end = nullptr;
      double score = std::strtod(score_text.c_str(), &end);
      if (score_text.empty() || *end != '\0' || index_text.empty() || index_text.size() > 10) return false;
      uint64_t index = 0;
      for (char c : index_text) {
        if (c < '0' || c > '9') return false;
        index = index * 10 + uint64_t(c - '0');
      }
      if (index > 0xffffffffu) return false;
      label.clear();
      if (b != std::string::npos && b + 1 < item.size()) put_bytes(label, 1, item.data() + b + 1, item.size() - b - 1);
      if (index != 0) {
        put_tag(label, 2, 0);
        put_varint(label, index);
      }
      float f = float(score);  // as Python's float() stored in the float field
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      if (bits != 0) {
        put_tag(label, 3, 5);
        for (int byte = 0; byte < 4; ++byte) label.push_back(char((bits >> (8 * byte)) & 0xff));
      }
      put_bytes(result, 2, label);
    }
    put_bytes(*out, 3, result);
  }
  return true;
}

}  // namespace classify
