// Transport "ipc" without a GPU (issue 15): the coordinator's choice of a pair's KV
// transport (coordinator/transport_choice.h), the host identity and the worker's setup
// check (kv/kv_ipc.h), the region layout both ends agree on and its checks of an offer,
// and the paged store's bookkeeping of pages whose bytes live on a device (mark()).
#include <gtest/gtest.h>

#include <fstream>

#include "coordinator/transport_choice.h"
#include "kv/kv_handoff.h"
#include "kv/kv_ipc.h"
#include "kv/kv_store.h"

namespace {

using namespace mprefill;
using coord::choose_kv_transport;
using coord::KvPeerSite;

KvPeerSite peer(std::vector<std::string> t, std::vector<std::string> hosts) {
  return KvPeerSite{std::move(t), std::move(hosts)};
}

TEST(KvTransportChoice, IpcOnlyForPeersOfOneHost) {
  const auto g = peer({"tcp", "ipc"}, {"a/1", "a/1"});
  const auto near = peer({"tcp", "ipc"}, {"a/1"});
  const auto far = peer({"tcp", "ipc"}, {"b/2"});
  const auto tcp_only = peer({"tcp"}, {"a/1"});
  EXPECT_EQ(choose_kv_transport("ipc", g, near).transport, "ipc");
  EXPECT_EQ(choose_kv_transport("auto", g, near).transport, "ipc");
  const auto no = choose_kv_transport("ipc", g, far);
  EXPECT_EQ(no.transport, "");
  EXPECT_NE(no.why.find("'b/2'"), std::string::npos) << no.why;
  EXPECT_NE(no.why.find("'a/1'"), std::string::npos) << no.why;
  // auto falls back to tcp and says why not ipc.
  const auto fb = choose_kv_transport("auto", g, far);
  EXPECT_EQ(fb.transport, "tcp");
  EXPECT_NE(fb.why.find("one host"), std::string::npos) << fb.why;
  EXPECT_EQ(choose_kv_transport("auto", g, tcp_only).transport, "tcp");
  EXPECT_NE(choose_kv_transport("ipc", g, tcp_only).why.find("decoder does not take KV over ipc"),
            std::string::npos);
  // One rank of the group on another host: no ipc for the group.
  const auto split = peer({"tcp", "ipc"}, {"a/1", "b/2"});
  EXPECT_EQ(choose_kv_transport("auto", split, near).transport, "tcp");
  // Unknown hosts never count as the same host.
  const auto anon = peer({"tcp", "ipc"}, {""});
  EXPECT_EQ(choose_kv_transport("auto", anon, peer({"tcp", "ipc"}, {""})).transport, "tcp");
  EXPECT_FALSE(coord::same_host(peer({"ipc"}, {}), near));
}

TEST(KvTransportChoice, ExplicitRequestsAreHonouredOrRefused) {
  const auto g = peer({"tcp", "nccl"}, {"a/1"});
  const auto d = peer({"tcp"}, {"a/1"});
  EXPECT_EQ(choose_kv_transport("", g, d).transport, "tcp");
  EXPECT_EQ(choose_kv_transport("tcp", g, d).transport, "tcp");
  const auto n = choose_kv_transport("nccl", g, d);
  EXPECT_EQ(n.transport, "");
  EXPECT_EQ(n.why, "the decoder does not take KV over nccl");
  EXPECT_EQ(choose_kv_transport("nccl", g, peer({"tcp", "nccl"}, {"z"})).transport, "nccl");
  EXPECT_EQ(choose_kv_transport("rdma", g, d).transport, "");
  EXPECT_TRUE(coord::known_kv_request("auto"));
  EXPECT_TRUE(coord::known_kv_request(""));
  EXPECT_FALSE(coord::known_kv_request("rdma"));
  EXPECT_FALSE(coord::known_kv_transport("auto"));  // a peer registers real transports only
  // Registration messages: transports default to tcp, ranks' host ids are read.
  v1::WorkerRegister wr;
  wr.add_ranks()->set_host_id("h/1");
  wr.add_ranks()->set_host_id("h/1");
  const auto site = coord::site_of(wr);
  EXPECT_EQ(site.transports, std::vector<std::string>{"tcp"});
  EXPECT_EQ(site.host_ids.size(), 2u);
}

TEST(KvIpc, HostIdentityNamesHostAndBoot) {
  const std::string id = kv::host_identity();
  EXPECT_EQ(id, kv::host_identity());
  const size_t slash = id.find('/');
  ASSERT_NE(slash, std::string::npos) << id;
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::string boot;
  if (f && std::getline(f, boot)) EXPECT_EQ(id.substr(slash + 1), boot);
}

TEST(KvIpc, SetupIsRefusedFromAnotherHost) {
  const std::string me = kv::host_identity();
  v1::KvIpcSetup s;
  s.set_host_id(me);
  s.set_pid(1);
  EXPECT_EQ(kv::ipc_setup_refusal(s.SerializeAsString(), me), "");
  s.set_host_id("elsewhere/0");
  const std::string why = kv::ipc_setup_refusal(s.SerializeAsString(), me);
  EXPECT_NE(why.find("one host"), std::string::npos) << why;
  EXPECT_NE(why.find("elsewhere/0"), std::string::npos) << why;
  EXPECT_NE(kv::ipc_setup_refusal("", me), "");
  EXPECT_NE(kv::ipc_setup_refusal(std::string("\xff\xff\xff", 3), me), "");
}

kv::KvStoreShape shape(int layers, int kvh, int hd, int P, DType dt = DType::kBF16) {
  kv::KvStoreShape s;
  s.n_layers = layers;
  s.n_kv_heads = kvh;
  s.head_dim = hd;
  s.page_tokens = P;
  s.dtype = dt;
  return s;
}

v1::KvContract contract_of(const kv::KvStoreShape& s) {
  ModelFingerprint fp;
  fp.n_layers = s.n_layers;
  fp.n_kv_heads = s.n_kv_heads;
  fp.head_dim = s.head_dim;
  fp.kv_dtype = s.dtype;
  return make_kv_contract(fp, s.page_tokens);
}

TEST(KvIpc, RegionLayoutHoldsEveryCellAndEveryChecksumSlot) {
  const auto sh = shape(5, 3, 40, 64);
  const auto L = kv::IpcRegionLayout::make(sh, 777, 3);
  EXPECT_EQ(L.row_bytes(), 3u * 40 * 2);
  EXPECT_EQ(L.sum_slots, 13 + kv::kIpcExtraSumSlots);  // ceil(777 / 64) pages + spare
  for (uint64_t off : {L.v_offset, L.layer_stride, L.sums_offset, L.region_bytes})
    EXPECT_EQ(off % 256, 0u);
  // The last cell of V of the last layer ends inside the KV part, before the table.
  const uint64_t last = L.kv_offset(4, true, 776, 2) + 40 * 2;
  EXPECT_LE(last, L.sums_offset);
  EXPECT_GE(L.kv_offset(0, true, 0, 0), L.kv_offset(0, false, 776, 2) + 80);
  EXPECT_LE(L.sum_offset(4, 2, L.sum_slots - 1) + 8, L.region_bytes);
  // Exactly the job's KV bytes (plus alignment), nothing per page.
  EXPECT_LT(L.sums_offset - sh.kv_bytes(777), 5u * 2 * 256);
  EXPECT_THROW(kv::IpcRegionLayout::make(sh, 0, 1), std::invalid_argument);
  EXPECT_THROW(kv::IpcRegionLayout::make(sh, 10, 0), std::invalid_argument);
}

TEST(KvIpc, OfferIsCheckedAgainstTheContractAndItsOwnOffsets) {
  const auto sh = shape(5, 3, 40, 64);
  const auto L = kv::IpcRegionLayout::make(sh, 777, 3);
  v1::KvIpcOffer o;
  L.to_offer(&o);
  kv::IpcRegionLayout back;
  ASSERT_EQ(kv::IpcRegionLayout::from_offer(o, contract_of(sh), &back), "");
  EXPECT_EQ(back.region_bytes, L.region_bytes);
  EXPECT_EQ(back.kv_offset(3, true, 100, 1), L.kv_offset(3, true, 100, 1));
  EXPECT_EQ(back.sum_offset(2, 1, 5), L.sum_offset(2, 1, 5));
  // Another shape than the contract's.
  EXPECT_NE(
      kv::IpcRegionLayout::from_offer(o, contract_of(shape(5, 3, 40, 64, DType::kF32)), &back), "");
  EXPECT_NE(kv::IpcRegionLayout::from_offer(o, contract_of(shape(4, 3, 40, 64)), &back), "");
  // Offsets that would let a sender write past the region or across K / V.
  auto broken = [&](auto f) {
    v1::KvIpcOffer b = o;
    f(&b);
    return kv::IpcRegionLayout::from_offer(b, contract_of(sh), &back);
  };
  const uint64_t table_end = L.sum_offset(L.n_layers - 1, L.senders - 1, L.sum_slots - 1) + 8;
  EXPECT_EQ(broken([&](v1::KvIpcOffer* b) { b->set_region_bytes(table_end); }), "");
  EXPECT_NE(broken([&](v1::KvIpcOffer* b) { b->set_region_bytes(table_end - 1); }), "");
  EXPECT_NE(broken([](v1::KvIpcOffer* b) { b->set_v_offset(100); }), "");
  EXPECT_NE(broken([](v1::KvIpcOffer* b) { b->set_n_tokens(100000); }), "");
  EXPECT_NE(broken([](v1::KvIpcOffer* b) { b->set_sum_slots(0); }), "");
  EXPECT_NE(broken([](v1::KvIpcOffer* b) { b->set_sums_offset(0); }), "");
}

TEST(KvIpc, StoreMarksPagesWhoseBytesLiveElsewhere) {
  const auto sh = shape(2, 3, 8, 4);
  kv::PagePool pool(sh, 1 << 20);
  kv::JobKvStore store(&pool, 10);
  auto page = [](int layer, std::vector<int> heads, int64_t b, int64_t e) {
    kv::PageIn p;
    p.layer = layer;
    p.kv_heads = std::move(heads);
    p.token_begin = b;
    p.token_end = e;
    p.head_dim = 8;
    p.dtype = DType::kBF16;
    return p;  // no bytes: k / v null, sizes 0
  };
  EXPECT_FALSE(store.mark(page(0, {0, 2}, 0, 4)));
  EXPECT_FALSE(store.mark(page(0, {0, 2}, 4, 8)));
  EXPECT_FALSE(store.mark(page(0, {0, 2}, 8, 10)));
  EXPECT_THROW(store.mark(page(0, {2}, 9, 10)), kv::PageError);    // overlap
  EXPECT_THROW(store.mark(page(0, {1}, 2, 6)), kv::PageError);     // spans two pages
  EXPECT_THROW(store.mark(page(0, {1}, 8, 11)), kv::PageError);    // past the prompt
  EXPECT_THROW(store.mark(page(0, {2, 1}, 0, 4)), kv::PageError);  // heads not ascending
  EXPECT_FALSE(store.mark(page(0, {1}, 0, 4)));
  EXPECT_FALSE(store.mark(page(0, {1}, 4, 8)));
  EXPECT_FALSE(store.layer_complete(0));
  EXPECT_TRUE(store.mark(page(0, {1}, 8, 10)));  // the layer's last cells
  EXPECT_TRUE(store.layer_complete(0));
  EXPECT_FALSE(store.layer_complete(1));
  EXPECT_EQ(store.bytes_received(), 2u * 10 * 3 * 8 * 2);
  store.release_layer(0);
  EXPECT_THROW(store.mark(page(0, {0}, 0, 1)), kv::PageError);  // after release
}

}  // namespace
