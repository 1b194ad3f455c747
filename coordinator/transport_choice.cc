#include "coordinator/transport_choice.h"

#include <algorithm>

namespace mprefill::coord {
namespace {

bool serves(const KvPeerSite& p, const std::string& t) {
  return std::find(p.transports.begin(), p.transports.end(), t) != p.transports.end();
}

std::string host_of(const KvPeerSite& p) { return p.host_ids.empty() ? "" : p.host_ids.front(); }

}  // namespace

bool known_kv_request(const std::string& r) {
  return r.empty() || r == "auto" || known_kv_transport(r);
}

bool known_kv_transport(const std::string& t) { return t == "tcp" || t == "nccl" || t == "ipc"; }

KvPeerSite site_of(const v1::WorkerRegister& g) {
  KvPeerSite s{{g.kv_transports().begin(), g.kv_transports().end()}, {}};
  for (const auto& r : g.ranks()) s.host_ids.push_back(r.host_id());
  if (s.transports.empty()) s.transports.push_back("tcp");
  return s;
}

KvPeerSite site_of(const v1::DecoderRegister& d) {
  KvPeerSite s{{d.kv_transports().begin(), d.kv_transports().end()}, {d.host_id()}};
  if (s.transports.empty()) s.transports.push_back("tcp");
  return s;
}

bool same_host(const KvPeerSite& g, const KvPeerSite& d) {
  if (g.host_ids.empty() || d.host_ids.size() != 1 || d.host_ids[0].empty()) return false;
  for (const std::string& h : g.host_ids)
    if (h != d.host_ids[0]) return false;
  return true;
}

KvTransportChoice choose_kv_transport(const std::string& requested, const KvPeerSite& group,
                                      const KvPeerSite& decoder) {
  const std::string want = requested.empty() ? "tcp" : requested;
  auto both = [&](const std::string& t) -> std::string {
    if (!serves(group, t)) return "the worker group does not send KV over " + t;
    if (!serves(decoder, t)) return "the decoder does not take KV over " + t;
    return "";
  };
  auto ipc_refusal = [&]() -> std::string {
    std::string why = both("ipc");
    if (!why.empty()) return why;
    if (!same_host(group, decoder)) {
      std::string gh;
      for (const std::string& h : group.host_ids)
        if (h != host_of(decoder)) gh = h;
      return "ipc needs the worker group and the decoder on one host (decoder host '" +
             host_of(decoder) + "', a rank on '" + gh + "')";
    }
    return "";
  };
  if (want == "auto") {
    const std::string no_ipc = ipc_refusal();
    if (no_ipc.empty()) return {"ipc", ""};
    const std::string no_tcp = both("tcp");
    if (no_tcp.empty()) return {"tcp", no_ipc};
    return {"", no_tcp};
  }
  if (!known_kv_transport(want))
    return {"", "kv_transport must be tcp, nccl, ipc or auto, not '" + want + "'"};
  const std::string why = want == "ipc" ? ipc_refusal() : both(want);
  if (!why.empty()) return {"", why};
  return {want, ""};
}

}  // namespace mprefill::coord
