#include "cli/flags.h"

#include <fstream>
#include <sstream>

namespace mprefill::cli {

std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

int64_t parse_int(const std::string& flag, const std::string& s, int64_t lo, int64_t hi) {
  size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (s.empty() || used != s.size())
    throw UsageError(flag + " expects an integer, got '" + s + "'");
  if (v < lo || v > hi)
    throw UsageError(flag + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                     "], got " + s);
  return v;
}

double parse_float(const std::string& flag, const std::string& s) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (s.empty() || used != s.size()) throw UsageError(flag + " expects a number, got '" + s + "'");
  return v;
}

std::vector<int> parse_id_list(const std::string& flag, const std::string& s) {
  std::vector<int> out;
  if (s.empty()) return out;
  size_t start = 0;
  while (true) {
    const size_t comma = s.find(',', start);
    std::string item =
        s.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    while (!item.empty() && item.front() == ' ') item.erase(item.begin());
    while (!item.empty() && item.back() == ' ') item.pop_back();
    out.push_back(static_cast<int>(parse_int(flag, item, -2147483648LL, 2147483647LL)));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

std::string read_text_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::ostringstream s;
  s << f.rdbuf();
  std::string text = s.str();
  if (!text.empty() && text.back() == '\n') text.pop_back();
  if (!text.empty() && text.back() == '\r') text.pop_back();
  return text;
}

bool FlagReader::next() {
  if (i_ + 1 >= argc_) return false;
  flag_ = argv_[++i_];
  inline_value_.reset();
  if (flag_.rfind("--", 0) == 0) {
    const size_t eq = flag_.find('=');
    if (eq != std::string::npos) {
      inline_value_ = flag_.substr(eq + 1);
      flag_.resize(eq);
    }
  }
  return true;
}

std::string FlagReader::value() {
  if (inline_value_) return *inline_value_;
  if (i_ + 1 >= argc_) throw UsageError(flag_ + " needs a value");
  return argv_[++i_];
}

}  // namespace mprefill::cli
