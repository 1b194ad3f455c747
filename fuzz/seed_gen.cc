// Writes the seed corpora of the fuzz targets from the real encoders (launch/fuzz.sh runs
// it before each campaign):
//   fuzz_seed_gen FRAMES_DIR SAFETENSORS_DIR
// FRAMES_DIR: frames made by wire::encode_frame for every message kind a peer sends
// (hello exchange, client, worker group, decoder, KV stream), alone and as the stream of
// a whole session, each behind the 3 control bytes frame_fuzz reads first.
// SAFETENSORS_DIR: files written by write_safetensors (F32 / BF16 / F16, Llama tensor
// names), and the header of a stories15M-shaped checkpoint cut off after its header.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "kv/crc32c.h"
#include "model/safetensors.h"
#include "proto/wire.h"

namespace {

namespace v1 = ::mprefill::v1;
namespace wire = ::mprefill::wire;
namespace fs = std::filesystem;

v1::Envelope env() {
  v1::Envelope e;
  e.set_version(wire::kProtocolVersion);
  return e;
}

v1::KvContract contract() {
  v1::KvContract kv;
  auto* m = kv.mutable_model();
  m->set_name("random:tiny:7");
  m->set_n_layers(2);
  m->set_hidden(16);
  m->set_n_heads(4);
  m->set_n_kv_heads(2);
  m->set_head_dim(4);
  m->set_vocab(512);
  m->set_max_position(1 << 20);
  m->set_weights_digest("0123456789abcdef");
  kv.set_kv_dtype(v1::F32);
  kv.set_layout("token-major");
  kv.set_page_tokens(4);
  return kv;
}

// frame_fuzz's page store: 2 layers x 2 KV heads x head_dim 4, pages of 4 tokens.
v1::Envelope page(int layer, int64_t begin, int64_t end) {
  auto e = env();
  auto* p = e.mutable_kv_page();
  auto* h = p->mutable_header();
  h->set_job_id(1);
  h->set_layer(layer);
  h->add_kv_heads(0);
  h->add_kv_heads(1);
  h->set_token_begin(begin);
  h->set_token_end(end);
  h->set_dtype(v1::F32);
  h->set_layout("token-major");
  h->set_page_tokens(4);
  h->set_head_dim(4);
  std::vector<float> k((end - begin) * 2 * 4), v(k.size());
  for (size_t i = 0; i < k.size(); ++i) {
    k[i] = 0.25f * static_cast<float>(i);
    v[i] = -0.5f * static_cast<float>(i);
  }
  p->set_k(std::string(reinterpret_cast<const char*>(k.data()), k.size() * 4));
  p->set_v(std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4));
  h->set_crc32c(mprefill::kv::crc32c(p->v().data(), p->v().size(),
                                     mprefill::kv::crc32c(p->k().data(), p->k().size())));
  h->set_sender_rank(0);
  return e;
}

std::vector<std::pair<std::string, v1::Envelope>> messages() {
  std::vector<std::pair<std::string, v1::Envelope>> out;
  const std::string nonce(32, '\x5a');
  {
    auto e = wire::make_server_hello(nonce, true);
    out.emplace_back("server_hello", e);
  }
  for (v1::Role role : {v1::CLIENT, v1::WORKER, v1::DECODER}) {
    auto e = env();
    auto* h = e.mutable_client_hello();
    h->set_version(wire::kProtocolVersion);
    h->set_role(role);
    h->set_name("peer-" + std::to_string(role));
    // frame_fuzz checks hellos against this secret and nonce: the right proof.
    h->set_client_nonce(std::string(32, static_cast<char>('a' + role)));
    h->set_proof(wire::hello_proof("fuzz-secret-0123456789abcdef", wire::binding_of(*h, nonce)));
    out.emplace_back("client_hello_" + std::to_string(role), e);
  }
  {
    auto e = env();
    e.mutable_hello_accepted()->set_server("mprefill-coordinator");
    out.emplace_back("hello_accepted", e);
  }
  out.emplace_back("error", wire::make_error(7, v1::INVALID_ARGUMENT, "token id 9999 at 3"));
  {
    auto e = env();
    auto* s = e.mutable_submit();
    for (int i = 0; i < 24; ++i) s->add_token_ids(1 + (i * 37) % 500);
    s->mutable_options()->set_decode_tokens(4);
    s->mutable_options()->set_sparse("auto");
    s->mutable_options()->mutable_sampling()->set_temperature(0.7f);
    s->mutable_options()->mutable_sampling()->set_top_p(0.9f);
    s->mutable_options()->add_stop_ids(2);
    s->mutable_options()->set_want_progress(true);
    s->set_client_tag("seed");
    out.emplace_back("submit_ids", e);
    auto t = env();
    t.mutable_submit()->set_text("Once upon a time");
    out.emplace_back("submit_text", t);
  }
  {
    auto e = env();
    e.mutable_status_request()->set_job_id(0);
    out.emplace_back("status_request", e);
    auto c = env();
    c.mutable_cancel()->set_job_id(3);
    out.emplace_back("cancel", c);
  }
  {
    auto e = env();
    auto* r = e.mutable_worker_register();
    r->set_group("g0");
    r->set_world(2);
    r->set_tp(1);
    r->set_sp(2);
    for (int i = 0; i < 2; ++i) {
      auto* ri = r->add_ranks();
      ri->set_rank(i);
      ri->set_hostname("localhost");
      ri->set_device("cpu");
      ri->set_free_memory_bytes(uint64_t{8} << 30);
    }
    *r->mutable_kv() = contract();
    r->add_kv_transports("tcp");
    out.emplace_back("worker_register", e);
  }
  {
    auto e = env();
    auto* r = e.mutable_decoder_register();
    r->set_name("d0");
    r->set_host("127.0.0.1");
    r->set_kv_port(40000);
    r->set_capacity_bytes(uint64_t{1} << 30);
    r->set_max_jobs(4);
    *r->mutable_kv() = contract();
    out.emplace_back("decoder_register", e);
  }
  {
    auto e = env();
    auto* a = e.mutable_assignment();
    a->set_job_id(1);
    for (int i = 0; i < 10; ++i) a->add_token_ids(i + 1);
    a->mutable_plan()->set_tp(1);
    a->mutable_plan()->set_sp(1);
    a->mutable_decoder()->set_host("127.0.0.1");
    a->mutable_decoder()->set_port(40000);
    out.emplace_back("assignment", e);
  }
  {
    auto e = env();
    e.mutable_worker_progress()->set_job_id(1);
    e.mutable_worker_progress()->set_layer(1);
    e.mutable_worker_progress()->set_n_layers(2);
    out.emplace_back("worker_progress", e);
    auto d = env();
    d.mutable_worker_done()->set_job_id(1);
    d.mutable_worker_done()->set_first_token_id(42);
    d.mutable_worker_done()->add_ranks()->set_total_ms(12.5);
    out.emplace_back("worker_done", d);
    auto f = env();
    f.mutable_worker_failed()->set_job_id(1);
    f.mutable_worker_failed()->set_rank(1);
    f.mutable_worker_failed()->set_message("rank 1 died");
    out.emplace_back("worker_failed", f);
    auto h = env();
    h.mutable_heartbeat()->set_seq(9);
    h.mutable_heartbeat()->set_unix_ms(1700000000000);
    out.emplace_back("heartbeat", h);
  }
  {
    auto e = env();
    e.mutable_expect()->set_job_id(1);
    e.mutable_expect()->set_prompt_tokens(10);
    e.mutable_expect()->set_n_layers(2);
    e.mutable_expect()->set_senders(1);
    out.emplace_back("expect", e);
    auto k = env();
    k.mutable_kv_hello()->set_job_id(1);
    *k.mutable_kv_hello()->mutable_kv() = contract();
    out.emplace_back("kv_hello", k);
    auto a = env();
    a.mutable_layer_ack()->set_job_id(1);
    a.mutable_layer_ack()->set_layer(0);
    out.emplace_back("layer_ack", a);
    auto d = env();
    d.mutable_decode_done()->set_job_id(1);
    d.mutable_decode_done()->add_generated_ids(42);
    d.mutable_decode_done()->set_stopped_by("length");
    out.emplace_back("decode_done", d);
  }
  out.emplace_back("kv_page_l0_0_4", page(0, 0, 4));
  out.emplace_back("kv_page_l1_4_8", page(1, 4, 8));
  out.emplace_back("kv_page_l0_8_10", page(0, 8, 10));
  return out;
}

void write(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!f) throw std::runtime_error("cannot write " + p.string());
}

// Control bytes of frame_fuzz: chunking, max frame (index 3: the 64 MiB default), job
// tokens (10, checksum fixed up).
std::string control(char chunk) { return std::string{chunk, 3, 9}; }

void frame_seeds(const fs::path& dir) {
  fs::create_directories(dir);
  const auto msgs = messages();
  std::string session;
  for (const auto& [name, e] : msgs) {
    const std::string f = wire::encode_frame(e);
    write(dir / (name + ".bin"), control(0) + f);
    session += f;
  }
  write(dir / "session_whole.bin", control(0) + session);
  write(dir / "session_chunked.bin", control(7) + session);
  // Pages of one job that complete layer 0, then a duplicate.
  const std::string pages = wire::encode_frame(page(0, 0, 4)) + wire::encode_frame(page(0, 4, 8)) +
                            wire::encode_frame(page(0, 8, 10)) + wire::encode_frame(page(0, 8, 10));
  write(dir / "pages_layer0.bin", control(0) + pages);
}

void safetensors_seeds(const fs::path& dir) {
  fs::create_directories(dir);
  std::vector<float> a(4 * 6), b(6), c(3 * 2 * 2);
  for (size_t i = 0; i < a.size(); ++i) a[i] = 0.1f * static_cast<float>(i) - 1.f;
  for (size_t i = 0; i < b.size(); ++i) b[i] = 1.f + static_cast<float>(i);
  for (size_t i = 0; i < c.size(); ++i) c[i] = -0.3f * static_cast<float>(i);
  using mprefill::DType;
  for (DType t : {DType::kF32, DType::kBF16, DType::kF16}) {
    const std::vector<mprefill::SafetensorsEntry> entries = {
        {"model.embed_tokens.weight", t, {4, 6}, a.data()},
        {"model.norm.weight", t, {6}, b.data()},
        {"model.layers.0.self_attn.k_proj.weight", t, {3, 2, 2}, c.data()},
    };
    const std::string name = t == DType::kF32 ? "f32" : t == DType::kBF16 ? "bf16" : "f16";
    mprefill::write_safetensors((dir / (name + ".safetensors")).string(), entries);
  }
  // Scalar and empty tensors.
  const float one = 1.f;
  mprefill::write_safetensors(
      (dir / "scalar_empty.safetensors").string(),
      {{"scalar", DType::kF32, {}, &one}, {"empty", DType::kF32, {0, 4}, &one}},
      {{"format", "pt"}, {"note", "seed"}});
  // A stories15M-shaped header (real tensor names and shapes, all six layers), cut off
  // after the header: the reader must refuse the data offsets.
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  uint64_t off = 0;
  auto add = [&](const std::string& n, std::vector<int64_t> shape) {
    uint64_t numel = 1;
    std::string s;
    for (size_t i = 0; i < shape.size(); ++i) {
      numel *= static_cast<uint64_t>(shape[i]);
      s += (i ? "," : "") + std::to_string(shape[i]);
    }
    header += ",\"" + n + "\":{\"dtype\":\"F32\",\"shape\":[" + s + "],\"data_offsets\":[" +
              std::to_string(off) + "," + std::to_string(off + 4 * numel) + "]}";
    off += 4 * numel;
  };
  add("model.embed_tokens.weight", {32000, 288});
  for (int l = 0; l < 6; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {288});
    add(p + "self_attn.q_proj.weight", {288, 288});
    add(p + "self_attn.k_proj.weight", {288, 288});
    add(p + "self_attn.v_proj.weight", {288, 288});
    add(p + "self_attn.o_proj.weight", {288, 288});
    add(p + "post_attention_layernorm.weight", {288});
    add(p + "mlp.gate_proj.weight", {768, 288});
    add(p + "mlp.up_proj.weight", {768, 288});
    add(p + "mlp.down_proj.weight", {288, 768});
  }
  add("model.norm.weight", {288});
  header += "}";
  std::string file(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  write(dir / "stories15m_header_only.safetensors", file + header);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: fuzz_seed_gen FRAMES_DIR SAFETENSORS_DIR\n");
    return 2;
  }
  try {
    frame_seeds(argv[1]);
    safetensors_seeds(argv[2]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz_seed_gen: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
