// mprefill-bench in a build without CUDA: the `handoff` subcommand (handoff_bench.cc); the
// kernel and prefill benchmarks need the CUDA backend.
#include <cstdio>
#include <string>

namespace mprefill {
int handoff_bench_main(int argc, char** argv);
}

int main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "";
  if (cmd == "handoff") return mprefill::handoff_bench_main(argc, argv);
  if (cmd == "attention" || cmd == "prefill") {
    std::fprintf(stderr, "mprefill-bench: '%s' needs a CUDA build; this one serves handoff\n",
                 cmd.c_str());
    return 1;
  }
  std::fprintf(stderr, "usage: mprefill-bench handoff [options] (--help for them)\n");
  return cmd.empty() || cmd == "--help" || cmd == "-h" ? (cmd.empty() ? 1 : 0) : 2;
}
