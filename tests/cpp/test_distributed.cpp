// fxp-train --distributed's process group (train/distributed.h): where a
// process stands from torchrun's and SLURM's environment, and the collectives
// and the replica check, with three Gloo ranks as threads of this process.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <exception>
#include <map>
#include <thread>

#include "train/distributed.h"

#include "test_util.h"

namespace {

using fxp::testing::expect_error;
namespace ft = fxp::train;

ft::EnvironmentLookup environment(std::map<std::string, std::string> variables) {
  return [variables](const std::string& name) -> std::optional<std::string> {
    const auto it = variables.find(name);
    return it == variables.end() ? std::nullopt : std::optional<std::string>(it->second);
  };
}

TEST(ProcessPlace, TorchrunsVariables) {
  const auto place = ft::process_place_from_environment(environment(
      {{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "node7"}, {"MASTER_PORT", "1234"}}));
  EXPECT_EQ(place.rank, 3);
  EXPECT_EQ(place.world_size, 8);
  EXPECT_EQ(place.local_rank, 1);
  EXPECT_EQ(place.master_addr, "node7");
  EXPECT_EQ(place.master_port, 1234);
}

TEST(ProcessPlace, UnderTorchrunsAgentEveryRankIsAClientAndEachRestartHasItsKeys) {
  const auto place = ft::process_place_from_environment(
      environment({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "n"}, {"TORCHELASTIC_USE_AGENT_STORE", "True"},
                   {"TORCHELASTIC_RESTART_COUNT", "3"}}));
  EXPECT_TRUE(place.agent_store);
  EXPECT_EQ(place.store_prefix, "fxp/attempt_3");
  const auto plain = ft::process_place_from_environment(environment({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "n"}}));
  EXPECT_FALSE(plain.agent_store);
  EXPECT_EQ(plain.store_prefix, "fxp");
}

TEST(ProcessPlace, SlurmsVariablesWhenTorchrunsAreAbsentAndPort29500ByDefault) {
  const auto place = ft::process_place_from_environment(environment(
      {{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "6"}, {"SLURM_LOCALID", "2"}, {"MASTER_ADDR", "n1"}}));
  EXPECT_EQ(place.rank, 5);
  EXPECT_EQ(place.world_size, 6);
  EXPECT_EQ(place.local_rank, 2);
  EXPECT_EQ(place.master_port, 29500);
  // torchrun's win where both are set (torchrun inside a SLURM allocation).
  const auto both = ft::process_place_from_environment(environment(
      {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "6"}, {"MASTER_ADDR", "n1"}}));
  EXPECT_EQ(both.rank, 0);
  EXPECT_EQ(both.world_size, 2);
  EXPECT_EQ(both.local_rank, 0);
}

TEST(ProcessPlace, BadOrMissingVariablesAreNamed) {
  auto place = [](std::map<std::string, std::string> v) {
    return [v] { ft::process_place_from_environment(environment(v)); };
  };
  expect_error(place({{"MASTER_ADDR", "n"}}), "launch fxp-train with torchrun (RANK, WORLD_SIZE)");
  expect_error(place({{"RANK", "0"}, {"WORLD_SIZE", "2"}}), "MASTER_ADDR is not set");
  expect_error(place({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "n"}}), "RANK 2 is outside 0..1");
  expect_error(place({{"RANK", "x"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "n"}}), "RANK must be an integer, but is 'x'");
  expect_error(place({{"RANK", "0"}, {"WORLD_SIZE", "2 "}, {"MASTER_ADDR", "n"}}), "WORLD_SIZE must be an integer");
  expect_error(place({{"RANK", "0"}, {"WORLD_SIZE", "0"}, {"MASTER_ADDR", "n"}}), "WORLD_SIZE must be at least 1");
  expect_error(place({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"MASTER_ADDR", "n"}, {"MASTER_PORT", "70000"}}),
               "MASTER_PORT must be in 1..65535");
  expect_error(place({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}, {"SLURM_LOCALID", "-1"}, {"MASTER_ADDR", "n"}}),
               "SLURM_LOCALID must not be negative");
}

// A port no one listens on now.
int64_t free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  socklen_t length = sizeof address;
  EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address), 0);
  EXPECT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length), 0);
  ::close(fd);
  return ntohs(address.sin_port);
}

// Runs body(group) on `world` Gloo ranks, one thread each; skips where this build has no Gloo.
void on_ranks(int64_t world, const std::function<void(ft::ProcessGroup&)>& body) {
  const int64_t port = free_port();
  std::vector<std::exception_ptr> errors(world);
  std::vector<std::thread> ranks;
  for (int64_t r = 0; r < world; ++r) {
    ranks.emplace_back([&, r] {
      try {
        const auto group = ft::ProcessGroup::join({r, world, 0, "127.0.0.1", port}, torch::kCPU, std::chrono::seconds(60));
        body(*group);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : ranks) t.join();
  for (const auto& e : errors) {
    if (!e) continue;
    try {
      std::rethrow_exception(e);
    } catch (const std::invalid_argument& error) {
      if (std::string(error.what()).find("without Gloo's headers") != std::string::npos) GTEST_SKIP() << error.what();
      FAIL() << error.what();
    } catch (const std::exception& error) {
      FAIL() << error.what();
    }
  }
}

TEST(ProcessGroup, SumsEveryDtypeInPlaceOnEveryRank) {
  on_ranks(3, [](ft::ProcessGroup& g) {
    const double r = static_cast<double>(g.rank());
    torch::Tensor a = torch::full({5}, r + 1, torch::kFloat32);
    torch::Tensor b = torch::arange(6, torch::kFloat32).reshape({2, 3}).t() * (r + 1);  // not contiguous
    torch::Tensor c = torch::full({}, r, torch::kFloat64);
    torch::Tensor d = torch::full({2}, static_cast<int64_t>(1) << (40 + g.rank()), torch::kLong);
    g.all_reduce_sum({a, b, c, d});
    EXPECT_TRUE(torch::equal(a, torch::full({5}, 6.0f)));
    EXPECT_TRUE(torch::equal(b, torch::arange(6, torch::kFloat32).reshape({2, 3}).t() * 6));
    EXPECT_EQ(c.item<double>(), 3.0);
    EXPECT_EQ(d[0].item<int64_t>(), 7ll << 40);
  });
}

TEST(ProcessGroup, BroadcastsRank0sBitsOfEveryDtype) {
  on_ranks(3, [](ft::ProcessGroup& g) {
    const bool root = g.rank() == 0;
    // Odd byte counts (int16 x 3, bool x 1, uint8 x 5) keep the next tensor aligned; int16 is not a Gloo dtype.
    torch::Tensor shorts = root ? torch::tensor({-3, 7, 32767}, torch::kShort) : torch::zeros({3}, torch::kShort);
    torch::Tensor flag = torch::full({1}, root, torch::kBool);
    torch::Tensor bytes = torch::full({5}, root ? 200 : 1, torch::kUInt8);
    torch::Tensor nan = torch::full({}, root ? NAN : 0.0, torch::kFloat64);
    torch::Tensor floats = torch::full({2, 2}, root ? -0.0f : 1.0f);
    g.broadcast_from_rank0({shorts, flag, bytes, nan, floats});
    EXPECT_TRUE(torch::equal(shorts, torch::tensor({-3, 7, 32767}, torch::kShort)));
    EXPECT_TRUE(flag.item<bool>());
    EXPECT_TRUE(torch::equal(bytes, torch::full({5}, 200, torch::kUInt8)));
    EXPECT_TRUE(std::isnan(nan.item<double>()));
    EXPECT_TRUE(std::signbit(floats[1][1].item<float>()));
  });
}

TEST(ProcessGroup, ReplicaCheckNamesWhatDiffersInBitsOnAnyRank) {
  on_ranks(3, [](ft::ProcessGroup& g) {
    const torch::Tensor same = torch::arange(10, torch::kFloat32);
    const torch::Tensor nan = torch::full({3}, NAN);
    EXPECT_TRUE(ft::replica_differences(g, {{"same", same}, {"nan", nan}}).empty());
    // Rank 2 alone differs in one bit of one tensor; -0 differs from 0 on rank 1.
    torch::Tensor last_bit = torch::ones({4}, torch::kFloat32);
    if (g.rank() == 2) last_bit[3] = std::nextafter(1.0f, 2.0f);
    const torch::Tensor zero = torch::full({1}, g.rank() == 1 ? -0.0f : 0.0f);
    const auto differ = ft::replica_differences(g, {{"same", same}, {"last bit", last_bit}, {"zero", zero}});
    EXPECT_EQ(differ, (std::vector<std::string>{"last bit", "zero"}));  // on every rank
  });
}

TEST(ProcessGroup, PublishedValuesReachTheOtherRanks) {
  on_ranks(2, [](ft::ProcessGroup& g) {
    if (g.rank() == 0) g.publish("greeting", "from rank 0");
    EXPECT_EQ(g.wait_for("greeting"), "from rank 0");
    EXPECT_EQ(g.backend(), "gloo");
    EXPECT_EQ(g.size(), 2);
  });
}

}  // namespace
