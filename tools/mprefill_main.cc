// mprefill: command-line front end. `mprefill generate` runs the single-process CPU engine
// on a prompt (text through the llama2.c tokenizer, or token ids) and prints the
// continuation, or one JSON object with --json.
//
// Exit status: 0 success; 1 a runtime error (one line "mprefill: error: ..." on stderr);
// 2 a usage error (that line plus a short usage).
#include <cstdio>
#include <exception>
#include <iostream>
#include <new>
#include <string>

#include "tools/cli_args.h"
#include "tools/generate.h"
#include "tools/service_cli.h"  // submit / status / cancel / run

namespace {

using mprefill::cli::one_line;
using mprefill::cli::parse_int;
using mprefill::cli::UsageError;

using mprefill::cli::DeviceError;
using mprefill::cli::GenerateArgs;
using mprefill::cli::run_generate;

const char* kUsage =
    "usage: mprefill <command> [options]\n"
    "commands:\n"
    "  generate   prefill a prompt and decode a continuation on the CPU engine\n"
    "run 'mprefill generate --help' for its options\n";

const char* kGenerateUsage =
    "usage: mprefill generate --model PATH [--tokenizer PATH]\n"
    "                         (--prompt TEXT | --prompt-ids 1,2,3 | --prompt-file FILE)\n"
    "                         [--decode N] [--sparse dense|auto|adaptive:TAU|FILE.json]\n"
    "                         [--dense-below N]\n"
    "                         [--temperature T] [--top-p P] [--seed S] [--stop-ids a,b]\n"
    "                         [--max-prompt N] [--device cpu|cuda] [--threads N] [--json]\n"
    "                         [--audit-heads K] [--progress]\n"
    "  --model PATH        HF directory (config.json + safetensors), llama2.c .bin (or its\n"
    "                      directory), or random:NAME[:SEED] (random weights of a named\n"
    "                      shape: tiny, stories15m, llama3-8b)\n"
    "  --tokenizer PATH    llama2.c tokenizer.bin for --prompt/--prompt-file (BOS is\n"
    "                      prepended; default: tokenizer.bin beside the model)\n"
    "  --decode N          tokens to decode after the first one (default 16)\n"
    "  --sparse SPEC       per-head pattern policy: dense (default), auto (vertical-slash\n"
    "                      1000/6096 on every head), adaptive:TAU[:V:S] (vertical-slash on\n"
    "                      every head: per prompt the fewest columns / diagonals whose\n"
    "                      estimated attention mass reaches TAU in (0, 1], at most V / S,\n"
    "                      default auto's), xattn:TAU[:K[:S]] (block-sparse on every head:\n"
    "                      per query block the fewest key blocks whose antidiagonal mass of\n"
    "                      stride S (default 8) reaches TAU, at most K, default 100) or an\n"
    "                      MInference per-head JSON (with optional \"tau\", \"score\":\n"
    "                      configs/minference/README.md)\n"
    "  --dense-below N     prompts shorter than N tokens run dense (default 32768)\n"
    "  --temperature T     0 = greedy (default); --top-p P in (0, 1]; --seed S\n"
    "  --stop-ids a,b      stop after emitting one of these ids\n"
    "  --max-prompt N      prompt length limit (default: the model's max position)\n"
    "  --device cpu|cuda   engine (default cpu)\n"
    "  --threads N         CPU worker threads (default: all cores or MPREFILL_THREADS)\n"
    "  --json              print one JSON object on stdout\n"
    "  --progress          prefill progress on stderr (default: when stderr is a terminal)\n"
    "  --audit-heads K     audit K non-dense heads per layer against dense attention on 4\n"
    "                      sampled query blocks: recall and relative output difference\n"
    "                      per head (cpu engine)\n";

GenerateArgs parse_generate(int argc, char** argv) {
  GenerateArgs a;
  mprefill::cli::FlagReader r(argc, argv);
  while (r.next()) {
    const std::string& flag = r.flag();
    if (flag == "--help" || flag == "-h") {
      a.help = true;
    } else if (flag == "--json") {
      a.json = true;
    } else if (flag == "--progress") {
      a.progress = true;
    } else if (flag == "--model") {
      a.model = r.value();
    } else if (flag == "--tokenizer") {
      a.tokenizer = r.value();
    } else if (a.take(r)) {  // --prompt*, --decode, --sparse, sampling, ...
    } else if (flag == "--max-prompt") {
      a.max_prompt = parse_int(flag, r.value(), 1, int64_t{1} << 40);
    } else if (flag == "--device") {
      a.device = r.value();
      if (a.device != "cpu" && a.device != "cuda")
        throw UsageError("--device must be cpu or cuda, got '" + a.device + "'");
    } else if (flag == "--threads") {
      a.threads = static_cast<int>(parse_int(flag, r.value(), 1, 4096));
    } else {
      throw UsageError("unknown option '" + r.arg() + "'");
    }
  }
  if (a.help) return a;
  if (a.model.empty()) throw UsageError("--model is required");
  a.require_one_prompt();
  if (a.audit_heads > 0 && a.device != "cpu")
    throw UsageError("--audit-heads runs on the cpu engine only (--device cpu)");
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  std::ios::sync_with_stdio(true);
  const char* service_usage = mprefill::cli::kServiceCommandsUsage;
  if (argc < 2) {
    std::fputs("mprefill: error: no command given\n", stderr);
    std::fputs(kUsage, stderr);
    std::fputs(service_usage, stderr);
    return 2;
  }
  const std::string cmd = argv[1];
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::fputs(kUsage, stdout);
    std::fputs(service_usage, stdout);
    return 0;
  }
  if (mprefill::cli::is_service_command(cmd))
    return mprefill::cli::service_main(cmd, argc - 2, argv + 2);
  if (cmd != "generate") {
    std::fprintf(stderr, "mprefill: error: unknown command '%s'\n", one_line(cmd).c_str());
    std::fputs(kUsage, stderr);
    std::fputs(service_usage, stderr);
    return 2;
  }
  try {
    const GenerateArgs a = parse_generate(argc - 2, argv + 2);
    if (a.help) {
      std::fputs(kGenerateUsage, stdout);
      return 0;
    }
    return run_generate(a);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "mprefill: error: %s\n", one_line(e.what()).c_str());
    std::fputs(kGenerateUsage, stderr);
    return 2;
  } catch (const DeviceError& e) {
    std::fprintf(stderr, "mprefill: error: %s\n", one_line(e.what()).c_str());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fputs("mprefill: error: out of memory\n", stderr);
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mprefill: error: %s\n", one_line(e.what()).c_str());
    return 1;
  }
}
