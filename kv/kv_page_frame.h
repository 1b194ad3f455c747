// Reading a KvPage frame in place (the KV port's fast path): the envelope bytes of one
// frame (wire::Connection::recv_raw) -> the page header and views of its K and V bytes, no
// copy. Only the shape encode_kv_page_frame writes (Envelope{version, kv_page{header, k,
// v}}, each field once) is read here; anything else is left to the protobuf parser, so the
// meaning of a frame never depends on which path read it.
#pragma once
#include <string>
#include <string_view>

#include "proto/wire.h"

namespace mprefill::kv {

namespace v1 = ::mprefill::v1;

struct KvPageView {
  v1::KvPageHeader header;
  std::string_view k, v;  // into the frame's bytes
};

// true: `envelope` is a KvPage frame of this protocol version, *out filled. false: not one
// (another message, another version, an unusual encoding): parse it as an Envelope.
bool read_kv_page_frame(std::string_view envelope, KvPageView* out);

}  // namespace mprefill::kv
