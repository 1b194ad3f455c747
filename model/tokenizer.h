// llama2.c tokenizer.bin (SentencePiece BPE export): int32 max_token_length, then per
// token until end of file: float32 score, int32 byte length, bytes. Id 0 <unk>, 1 BOS,
// 2 EOS; ids 3..258 are the byte-fallback tokens of bytes 0..255, stored either as
// "<0xHH>" (llama2.c's export) or as the byte / its Latin-1 UTF-8 form (other exports).
#pragma once
#include <string>
#include <unordered_map>
#include <vector>

namespace mprefill {

// The llama2.c tokenizer that ships beside a model: DIR/tokenizer.bin for a model
// directory DIR or a checkpoint file in DIR; "" when there is none (or for random:...).
std::string tokenizer_beside(const std::string& model_path);

class Tokenizer {
 public:
  static constexpr int kBos = 1, kEos = 2;

  // Throws std::runtime_error naming the file on a missing, truncated or corrupt file,
  // or when expected_vocab > 0 and the token count differs.
  static Tokenizer load(const std::string& path, int expected_vocab = 0);

  // As llama2.c run.c encode(): optional BOS, a dummy-prefix " " token when text is
  // non-empty, UTF-8 codepoints looked up (unknown ones as byte tokens, byte + 3), then
  // repeatedly merge the adjacent pair whose concatenation is the best-scoring piece
  // (leftmost on ties) until none remains. Control and byte tokens are never looked up
  // by text nor merged. O(n log n) in the text length.
  std::vector<int> encode(const std::string& text, bool bos) const;
  // Text of token id following prev: a leading space is dropped after BOS; byte tokens
  // give their raw byte. Throws on an id outside [0, vocab_size()).
  std::string decode_token(int prev, int id) const;
  // Concatenated text of ids; BOS/EOS are skipped and the start counts as following BOS,
  // so decode(encode(s, b)) == s.
  std::string decode(const std::vector<int>& ids) const;

  int vocab_size() const { return static_cast<int>(pieces_.size()); }
  const std::string& piece(int id) const { return pieces_.at(id); }
  float score(int id) const { return scores_.at(id); }

 private:
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::vector<int> byte_of_;                     // raw byte of a byte token, else -1
  std::unordered_map<std::string, int> lookup_;  // text pieces (no control/byte tokens)
  bool byte_fallback_ = false;                   // ids 3..258 are the 256 byte tokens
  int max_token_length_ = 0;

  void check_id(int id) const;
};

}  // namespace mprefill
