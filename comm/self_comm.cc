#include "comm/self_comm.h"

#include <cstring>
#include <string>

namespace mprefill::comm {
namespace {

class SelfCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const char* backend() const override { return "self"; }

  Status all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp,
                    StreamHandle) override {
    return copy(send, recv, count, dtype);
  }
  Status all_gather(const void* send, void* recv, size_t count, DType dtype,
                    StreamHandle) override {
    return copy(send, recv, count, dtype);
  }
  Status broadcast(void*, size_t, DType, int root, StreamHandle) override {
    return root == 0 ? Status::kOk : no_peer("broadcast from", root);
  }
  Status send(const void*, size_t, DType, int peer, StreamHandle) override {
    return no_peer("send to", peer);
  }
  Status recv(void*, size_t, DType, int peer, StreamHandle) override {
    return no_peer("recv from", peer);
  }
  Status group_start() override { return Status::kOk; }
  Status group_end() override { return Status::kOk; }
  Status synchronize(StreamHandle) override { return Status::kOk; }
  std::unique_ptr<Communicator> split(int, int) override {
    return std::make_unique<SelfCommunicator>();
  }

 private:
  Status copy(const void* send, void* recv, size_t count, DType dtype) {
    if (count > 0 && (!send || !recv)) {
      last_error_ = "rank 0: null buffer";
      return Status::kInvalidArgument;
    }
    if (send != recv && count > 0)
      std::memmove(recv, send, count * static_cast<size_t>(dtype_size(dtype)));
    return Status::kOk;
  }
  Status no_peer(const char* what, int peer) {
    last_error_ =
        std::string("rank 0: ") + what + " peer " + std::to_string(peer) + " in a one-rank group";
    return Status::kInvalidArgument;
  }
};

}  // namespace

std::unique_ptr<Communicator> make_self_communicator() {
  return std::make_unique<SelfCommunicator>();
}

}  // namespace mprefill::comm
