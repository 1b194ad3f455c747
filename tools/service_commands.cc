#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <stdexcept>

#include "tools/service_client.h"

namespace mprefill::cli {

using Clock = std::chrono::steady_clock;

wire::Credential secret_of(const ServiceArgs& a) {
  if (!a.secret_file.empty() && !a.key_file.empty())
    throw UsageError("--secret-file and --key-file exclude each other");
  if (!a.key_file.empty()) return wire::load_key_file(a.key_file);
  return {"", a.secret_file.empty() ? std::string() : wire::load_secret_file(a.secret_file)};
}

int cmd_submit(const ServiceArgs& a) {
  std::optional<Tokenizer> tok;
  if (!a.tokenizer.empty()) tok = Tokenizer::load(a.tokenizer);
  const PromptInput p = make_prompt(a, tok);
  const bool bar = !a.json && isatty(STDERR_FILENO);
  const v1::Envelope submit = make_submit(a, p, bar);  // reads a --sparse file before dialling
  SigintGuard guard;
  auto c = dial(a.coordinator, secret_of(a), a.tls);
  const Outcome o = follow_job(*c, submit, a.timeout_s, bar, a.no_wait);
  return print_outcome(o, a, p, tok);
}

v1::StatusReply request_status(wire::Connection& c, uint64_t job) {
  v1::Envelope env;
  env.mutable_status_request()->set_job_id(job);
  c.send(env, 10000);
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (Clock::now() < deadline) {
    v1::Envelope r;
    if (!c.recv(&r, 200)) continue;
    if (r.has_status_reply()) return r.status_reply();
    if (r.has_error())
      throw std::runtime_error(v1::ErrorCode_Name(r.error().code()) + ": " + r.error().message());
  }
  throw std::runtime_error("no status reply within 10 s");
}

namespace {

nlohmann::json job_json(const v1::JobStatus& j) {
  return {{"job_id", j.job_id()},
          {"status", v1::JobState_Name(j.state())},
          {"layer", j.layer()},
          {"n_layers", j.n_layers()},
          {"prompt_tokens", j.prompt_tokens()},
          {"group", j.group()},
          {"decoder", j.decoder()},
          {"error", j.error()}};
}

}  // namespace

int cmd_status(const ServiceArgs& a) {
  auto c = dial(a.coordinator, secret_of(a), a.tls);
  const v1::StatusReply r = request_status(*c, a.job);
  if (a.json) {
    nlohmann::json j = {{"jobs", nlohmann::json::array()},
                        {"groups", nlohmann::json::array()},
                        {"decoders", nlohmann::json::array()}};
    for (const auto& s : r.jobs()) j["jobs"].push_back(job_json(s));
    for (const auto& g : r.groups())
      j["groups"].push_back({{"name", g.name()},
                             {"tp", g.tp()},
                             {"sp", g.sp()},
                             {"device", g.device()},
                             {"busy", g.busy()},
                             {"alive", g.alive()}});
    for (const auto& d : r.decoders())
      j["decoders"].push_back({{"name", d.name()},
                               {"endpoint", d.endpoint()},
                               {"active_jobs", d.active_jobs()},
                               {"alive", d.alive()}});
    std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
    return 0;
  }
  if (a.job == 0) {
    std::printf("worker groups: %d\n", r.groups_size());
    for (const auto& g : r.groups())
      std::printf("  %-16s tp %d x sp %d  %-12s %s\n", g.name().c_str(), g.tp(), g.sp(),
                  g.device().c_str(), g.busy() ? "busy" : "idle");
    std::printf("decoders: %d\n", r.decoders_size());
    for (const auto& d : r.decoders())
      std::printf("  %-16s %-22s %d active job(s)\n", d.name().c_str(), d.endpoint().c_str(),
                  d.active_jobs());
    std::printf("jobs: %d\n", r.jobs_size());
  }
  for (const auto& j : r.jobs())
    std::printf("  job %-6llu %-11s layer %d/%d  %lld tokens  group %s  decoder %s%s%s\n",
                static_cast<unsigned long long>(j.job_id()), v1::JobState_Name(j.state()).c_str(),
                j.layer(), j.n_layers(), static_cast<long long>(j.prompt_tokens()),
                j.group().empty() ? "-" : j.group().c_str(),
                j.decoder().empty() ? "-" : j.decoder().c_str(), j.error().empty() ? "" : "  ",
                one_line(j.error()).c_str());
  return 0;
}

int cmd_cancel(const ServiceArgs& a) {
  auto c = dial(a.coordinator, secret_of(a), a.tls);
  v1::Envelope env;
  env.mutable_cancel()->set_job_id(a.job);
  c->send(env, 10000);
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (Clock::now() < deadline) {
    v1::Envelope r;
    if (!c->recv(&r, 200)) continue;
    if (r.has_error()) {
      std::fprintf(stderr, "mprefill: error: %s: %s\n",
                   v1::ErrorCode_Name(r.error().code()).c_str(),
                   one_line(r.error().message()).c_str());
      return 1;
    }
    if (r.has_status_reply() && r.status_reply().jobs_size() == 1) {
      const auto& j = r.status_reply().jobs(0);
      if (a.json)
        std::cout << job_json(j).dump() << std::endl;
      else
        std::printf("job %llu %s\n", static_cast<unsigned long long>(j.job_id()),
                    v1::JobState_Name(j.state()).c_str());
      return j.state() == v1::CANCELLED ? 0 : 1;
    }
  }
  std::fputs("mprefill: error: no answer to the cancel within 10 s\n", stderr);
  return 1;
}

}  // namespace mprefill::cli
