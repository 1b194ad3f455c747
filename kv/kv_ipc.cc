#include "kv/kv_ipc.h"

#include <unistd.h>

#include <fstream>
#include <stdexcept>

namespace mprefill::kv {
namespace {

uint64_t align256(uint64_t x) { return (x + 255) / 256 * 256; }

}  // namespace

std::string host_identity() {
  char name[256] = {};
  if (gethostname(name, sizeof name - 1) != 0) name[0] = '\0';
  std::string boot;
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  if (f) std::getline(f, boot);
  return std::string(name) + "/" + boot;
}

IpcRegionLayout IpcRegionLayout::make(const KvStoreShape& shape, int64_t n_tokens, int senders) {
  shape.validate();
  if (n_tokens < 1) throw std::invalid_argument("IPC KV region: n_tokens must be >= 1");
  if (senders < 1) throw std::invalid_argument("IPC KV region: senders must be >= 1");
  IpcRegionLayout L;
  L.n_tokens = n_tokens;
  L.n_layers = shape.n_layers;
  L.n_kv_heads = shape.n_kv_heads;
  L.head_dim = shape.head_dim;
  L.elem_bytes = static_cast<int>(shape.elem_bytes());
  L.senders = senders;
  const int64_t blocks = (n_tokens + shape.page_tokens - 1) / shape.page_tokens;
  if (blocks + kIpcExtraSumSlots > (int64_t{1} << 30))
    throw std::invalid_argument("IPC KV region: too many pages per layer");
  L.sum_slots = static_cast<int>(blocks + kIpcExtraSumSlots);
  const uint64_t tensor = uint64_t(n_tokens) * L.row_bytes();
  L.v_offset = align256(tensor);
  L.layer_stride = align256(L.v_offset + tensor);
  L.sums_offset = L.kv_bytes();
  L.region_bytes =
      align256(L.sums_offset + uint64_t(L.n_layers) * senders * uint64_t(L.sum_slots) * 8);
  return L;
}

void IpcRegionLayout::to_offer(v1::KvIpcOffer* o) const {
  o->set_region_bytes(region_bytes);
  o->set_n_tokens(n_tokens);
  o->set_n_layers(n_layers);
  o->set_n_kv_heads(n_kv_heads);
  o->set_head_dim(head_dim);
  o->set_elem_bytes(elem_bytes);
  o->set_layer_stride(layer_stride);
  o->set_v_offset(v_offset);
  o->set_sums_offset(sums_offset);
  o->set_sum_slots(sum_slots);
  o->set_senders(senders);
}

std::string IpcRegionLayout::from_offer(const v1::KvIpcOffer& o, const v1::KvContract& c,
                                        IpcRegionLayout* out) {
  const auto& m = c.model();
  const int esz = c.kv_dtype() == v1::BF16 ? 2 : c.kv_dtype() == v1::F32 ? 4 : 0;
  if (o.n_layers() != m.n_layers() || o.n_kv_heads() != m.n_kv_heads() ||
      o.head_dim() != m.head_dim() || o.elem_bytes() != esz)
    return "IPC offer shape (layers " + std::to_string(o.n_layers()) + ", kv heads " +
           std::to_string(o.n_kv_heads()) + ", head_dim " + std::to_string(o.head_dim()) + ", " +
           std::to_string(o.elem_bytes()) + "-byte elements) is not the KV contract's";
  if (o.n_tokens() < 1 || o.senders() < 1 || o.sum_slots() < 1)
    return "IPC offer with no tokens, senders or checksum slots";
  IpcRegionLayout L;
  L.n_tokens = o.n_tokens();
  L.n_layers = o.n_layers();
  L.n_kv_heads = o.n_kv_heads();
  L.head_dim = o.head_dim();
  L.elem_bytes = o.elem_bytes();
  L.senders = o.senders();
  L.sum_slots = o.sum_slots();
  L.layer_stride = o.layer_stride();
  L.v_offset = o.v_offset();
  L.sums_offset = o.sums_offset();
  L.region_bytes = o.region_bytes();
  const uint64_t tensor = uint64_t(L.n_tokens) * L.row_bytes();
  // Every write the sender may make must land inside the region (no overflow: the
  // factors are bounded by the contract and a 2^62-byte KV, checked by the decoder).
  if (L.v_offset < tensor || L.layer_stride < L.v_offset + tensor || L.sums_offset < L.kv_bytes() ||
      L.region_bytes < L.sums_offset + uint64_t(L.n_layers) * L.senders * uint64_t(L.sum_slots) * 8)
    return "IPC offer offsets are inconsistent (region " + std::to_string(L.region_bytes) +
           " bytes, layer stride " + std::to_string(L.layer_stride) + ", V at " +
           std::to_string(L.v_offset) + ", checksums at " + std::to_string(L.sums_offset) + ")";
  *out = L;
  return "";
}

std::string ipc_setup_refusal(const std::string& setup_bytes, const std::string& decoder_host_id) {
  v1::KvIpcSetup s;
  if (setup_bytes.empty() || !s.ParseFromString(setup_bytes))
    return "the ipc stream carries no KvIpcSetup in transport_setup";
  if (s.host_id().empty() || s.host_id() != decoder_host_id)
    return "ipc needs the worker rank and the decoder on one host: worker host '" + s.host_id() +
           "', decoder host '" + decoder_host_id + "'";
  return "";
}

}  // namespace mprefill::kv
